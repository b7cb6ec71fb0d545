"""Attach a ControlNet to a Stable Diffusion 2.x checkpoint (tool_add_control.py with the SD2.1 config).

    python tool_add_control_sd21.py ./models/v2-1_512-ema-pruned.ckpt ./models/control_sd21_ini.ckpt
"""

import sys
from functools import partial

from cldm.cli import run_tool
from tool_add_control import ROOT, main

if __name__ == "__main__":
    sys.exit(run_tool(partial(main, default_config=ROOT / "models" / "cldm_v21.yaml")))

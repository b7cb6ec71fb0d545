"""Attach a ControlNet to a Stable Diffusion 2.x checkpoint (tool_add_control.py with the SD2.1 config).

    python tool_add_control_sd21.py ./models/v2-1_512-ema-pruned.ckpt ./models/control_sd21_ini.ckpt
"""

import sys
from pathlib import Path

from cldm.cli import run_tool
from cldm.control_weights import add_control_main

MODELS = Path(__file__).resolve().parent / "models"


def main(argv: list[str] | None = None) -> Path:
    return add_control_main(argv, MODELS / "cldm_v21.yaml", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(run_tool(main))

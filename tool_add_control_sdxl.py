"""Attach a ControlNet-XL to an SDXL checkpoint (tool_add_control.py with the SDXL config).

    python tool_add_control_sdxl.py ./models/sd_xl_base_1.0.safetensors ./models/control_sdxl_ini.safetensors

The input is Stability's file (stabilityai/stable-diffusion-xl-base-1.0, `sd_xl_base_1.0.safetensors`, float16);
the output keeps its dtype, so the ControlNet copy starts in float16 too (training loads it into float32).
"""

import sys
from pathlib import Path

from cldm.cli import run_tool
from cldm.control_weights import add_control_main

MODELS = Path(__file__).resolve().parent / "models"


def main(argv: list[str] | None = None) -> Path:
    return add_control_main(argv, MODELS / "cldm_xl.yaml", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(run_tool(main))

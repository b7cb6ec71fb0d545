"""Attach a ControlNet to a Stable Diffusion checkpoint; the control copy starts as the UNet's encoder.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tool_add_control.py ./models/sd_xl_base_1.0.safetensors ./models/control_sdxl_ini.safetensors \\
        --config ./models/cldm_xl.yaml

`control_model.X` is copied from `model.diffusion_model.X` (time_embed, SDXL's label_emb, input_blocks,
middle_block); the hint
block and the zero convs, which the UNet lacks, keep their fresh initialisation (the zero convs are zero).
"""

import sys
from pathlib import Path

from cldm.cli import run_tool
from cldm.control_weights import add_control_main

MODELS = Path(__file__).resolve().parent / "models"


def main(argv: list[str] | None = None) -> Path:
    return add_control_main(argv, MODELS / "cldm_v15.yaml", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(run_tool(main))

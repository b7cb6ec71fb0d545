"""Convert ControlNet weights between the original layout and a diffusers `ControlNetModel` folder.

    python tool_convert_diffusers.py to-diffusers ./models/control_sd15_canny.pth ./models/canny_diffusers
    python tool_convert_diffusers.py from-diffusers ./models/canny_diffusers ./models/control_canny.pth
    (add --config ./models/cldm_v21.yaml for SD2.x ControlNets, --force to overwrite)

to-diffusers reads a full ControlLDM checkpoint or a `control_model.*`-only file and writes
OUT_DIR/config.json and OUT_DIR/diffusion_pytorch_model.safetensors. from-diffusers writes a `control_model.*`
file (.safetensors, .ckpt or .pth by extension) that `load_checkpoint` puts into a ControlLDM built from the
same config.

The conversion itself is cldm/diffusers_convert.py: tensors are renamed, never changed, so a round trip is
bit-exact.
"""

import argparse
import logging
import sys
from pathlib import Path

from cldm.cli import run_tool
from cldm.diffusers_convert import DEFAULT_CONFIG, convert_from_diffusers, convert_to_diffusers

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to = commands.add_parser("to-diffusers", help="original checkpoint -> diffusers ControlNet folder")
    to.add_argument("input", help="full ControlLDM or control_model.* checkpoint (.ckpt/.pth/.safetensors)")
    to.add_argument("output", help="folder to write config.json and diffusion_pytorch_model.safetensors into")
    back = commands.add_parser("from-diffusers", help="diffusers ControlNet folder -> control_model.* file")
    back.add_argument("input", help="diffusers ControlNet folder (config.json + weights)")
    back.add_argument("output", help="checkpoint to write (.safetensors, .ckpt or .pth)")
    for command in (to, back):
        command.add_argument("--config", default=str(DEFAULT_CONFIG),
                             help="ControlLDM YAML the weights belong to")
        command.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)
    convert = convert_to_diffusers if args.command == "to-diffusers" else convert_from_diffusers
    out = convert(args.input, args.output, args.config, args.force)
    log.info("Wrote %s", out)
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main))

"""Convert ControlNet, T2I-Adapter, ControlNet-XS and ControlNet-Union weights between their original layouts and
diffusers' folders.

    python tool_convert_diffusers.py to-diffusers ./models/control_sd15_canny.pth ./models/canny_diffusers
    python tool_convert_diffusers.py from-diffusers ./models/canny_diffusers ./models/control_canny.pth
    (add --config ./models/cldm_v21.yaml for SD2.x ControlNets, --force to overwrite)

    python tool_convert_diffusers.py to-diffusers ./models/t2iadapter_depth_sd15v2.pth ./models/depth_adapter \
        --config ./models/cldm_v15_t2i.yaml
    python tool_convert_diffusers.py from-diffusers ./models/t2i-adapter-canny-sdxl-1.0 ./models/canny_xl.pth \
        --config ./models/cldm_xl_t2i.yaml

    python tool_convert_diffusers.py to-diffusers ./control_model.safetensors ./models/xs_canny \
        --config ./models/cldm_v21_xs.yaml
    python tool_convert_diffusers.py to-diffusers ./control_model.safetensors ./models/union_depth \
        --config ./models/cldm_xl_union.yaml

The --config's mode says what is converted. A ControlNet: to-diffusers reads a full ControlLDM checkpoint or a
`control_model.*`-only file and writes OUT_DIR/config.json and OUT_DIR/diffusion_pytorch_model.safetensors (a
`ControlNetModel`); from-diffusers writes a `control_model.*` file that `load_checkpoint` puts into a ControlLDM
built from the same config. A T2I-Adapter: to-diffusers reads TencentARC's layout or this project's export and
writes a `T2IAdapter` folder; from-diffusers reads such a folder (or its weights file alone) and writes
TencentARC's layout. A ControlNet-XS adapter: to-diffusers reads this project's export (already diffusers' weights)
or a training checkpoint and writes a `ControlNetXSAdapter` folder, with the config's heads and mix in config.json;
from-diffusers reads such a folder and writes its weights as one file with the folder's structure checked (diffusers'
layout is the only one published). A ControlNet-Union (--config models/cldm_xl_union.yaml) likewise: xinsir ships
only diffusers' layout, which this project's export has too; to-diffusers adds the `ControlNetUnionModel` config.json
to the weights (of an export, xinsir's file or a training checkpoint), from-diffusers checks a folder and writes its
weights as one file. Files are .safetensors, .ckpt or .pth by extension.

Each mode converts its own files (its ControlMode's to_diffusers / from_diffusers: cldm/diffusers_convert.py for a
ControlNet, cldm/t2i_adapter.py for a T2I-Adapter, cldm/controlnet_xs.py for ControlNet-XS, cldm/controlnet_union.py
for ControlNet-Union); a mode diffusers has no class for (control-LoRA, LLLite) is refused by name. Tensors are
renamed, never changed, so a round trip is bit-exact.
"""

import argparse
import logging
import sys
from pathlib import Path

from cldm.cli import run_tool
from cldm.diffusers_convert import DEFAULT_CONFIG
from cldm.modes import config_mode

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to = commands.add_parser("to-diffusers", help="a file of the config's mode -> a folder of diffusers' class for it")
    to.add_argument("input", help="a checkpoint or control file of the --config's mode (.ckpt/.pth/.safetensors)")
    to.add_argument("output", help="folder to write config.json and diffusion_pytorch_model.safetensors into")
    back = commands.add_parser("from-diffusers", help="a diffusers folder -> a file in the config's mode's layout")
    back.add_argument("input", help="diffusers folder (config.json + weights); for a T2I-Adapter also its weights "
                                    "file alone")
    back.add_argument("output", help="checkpoint to write (.safetensors, .ckpt or .pth)")
    for command in (to, back):
        command.add_argument("--config", default=str(DEFAULT_CONFIG),
                             help="ControlLDM YAML the weights belong to")
        command.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)
    mode = config_mode(args.config)  # the config's mode converts its own files (or refuses, naming itself)
    convert = mode.to_diffusers if args.command == "to-diffusers" else mode.from_diffusers
    out = convert(args.input, args.output, args.config, args.force)
    log.info("Wrote %s", out)
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main))

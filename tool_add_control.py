"""Attach a ControlNet to a Stable Diffusion checkpoint; the control copy starts as the UNet's encoder.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tool_add_control.py ./models/sd_xl_base_1.0.safetensors ./models/control_sdxl_ini.safetensors \\
        --config ./models/cldm_xl.yaml

`control_model.X` is copied from `model.diffusion_model.X` (time_embed, SDXL's label_emb, input_blocks,
middle_block); the hint
block and the zero convs, which the UNet lacks, keep their fresh initialisation (the zero convs are zero).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from cldm.cli import refuse_existing, run_tool
from cldm.control_weights import Fit, fillable, initial_state, unet_twin
from cldm.model import CONTROL_PREFIX, load_state_dict, save_state_dict
from ldm.checkpoint import EMA_PREFIX, require_finite

ROOT = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


def add_control(sd: dict[str, torch.Tensor], scratch: dict[str, torch.Tensor], fit: Fit
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every model key from the SD checkpoint, the control copy from its UNet, the rest as initialised.

    Tensors from the checkpoint keep its dtype (sd_xl_base_1.0 is float16: 7 GB, not 14 in float32).
    """
    out, added = {}, []
    for key, init in scratch.items():
        source = unet_twin(key, scratch) if key.startswith(CONTROL_PREFIX) else key
        if source is None or (source not in sd and fillable(key)):
            if init.is_meta:
                raise ValueError(f"{key} is neither in {fit.path} nor initialised by {fit.config}")
            out[key] = init
            added.append(key)
        elif (weight := fit.take(sd, source, init.shape)) is not None:
            # The copy gets its own memory: safetensors refuses tensors that share it.
            out[key] = weight.clone() if source != key else weight
    fit.check()
    return out, added


def main(argv: list[str] | None = None, default_config: str | Path = ROOT / "models" / "cldm_v15.yaml") -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="Stable Diffusion checkpoint (.ckpt/.pth/.safetensors)")
    parser.add_argument("output", help="ControlLDM checkpoint to write (.safetensors, else .ckpt format)")
    parser.add_argument("--config", default=str(default_config), help="model config (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)

    refuse_existing(args.output, args.force)
    # The EMA copy (3.4 of v1-5-pruned.ckpt's 7.7 GB) is never used.
    sd = {k: v for k, v in load_state_dict(args.input).items() if not k.startswith(EMA_PREFIX)}
    require_finite(sd, args.input)
    scratch = initial_state(args.config)
    out, added = add_control(sd, scratch, Fit(args.input, args.config))
    for key in added:
        log.info("These weights are newly added: %s", key)
    save_state_dict(out, args.output, force=args.force)
    log.info("Done: %s (%d keys, %d newly added).", args.output, len(out), len(added))
    return Path(args.output)


if __name__ == "__main__":
    sys.exit(run_tool(main))

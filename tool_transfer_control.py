r"""Transfer a ControlNet trained on a base SD model onto a community model of the same family.

    python tool_transfer_control.py --control ./models/control_sd15_openpose.pth \\
        --base ./models/v1-5-pruned.ckpt --target ./models/anything-v3.safetensors \\
        --out ./models/control_any3_openpose.ckpt
    (SDXL: add --config ./models/cldm_xl.yaml, with sd_xl_base_1.0.safetensors as --base)

The control copy of the UNet encoder moves by the community model's offset from the base
(UNET = model.diffusion_model):

    control_model.K := control[control_model.K] + target[UNET.K] - base[UNET.K]

while the hint block and zero convs are the control file's, and every other key is the community model's.
`--control` may be a full ControlLDM checkpoint (ControlNet 1.0) or `control_model.*` only (ControlNet 1.1).
Tensors keep the dtype of the file they come from.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from cldm.cli import refuse_existing, run_tool
from cldm.control_weights import Fit, fillable, initial_state, unet_twin
from cldm.model import CONTROL_PREFIX, load_state_dict, save_state_dict
from ldm.checkpoint import EMA_PREFIX, UNET_PREFIX, require_finite

ROOT = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


def transfer_control(control: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                     target: dict[str, torch.Tensor], scratch: dict[str, torch.Tensor],
                     fits: tuple[Fit, Fit, Fit]) -> dict[str, torch.Tensor]:
    """The ControlLDM state dict of `scratch`'s keys: offset control copy, everything else from `target`."""
    control_fit, base_fit, target_fit = fits
    out = {}
    for key, init in scratch.items():
        if key.startswith(CONTROL_PREFIX):
            weight = control_fit.take(control, key, init.shape)
            twin = unet_twin(key, scratch)
            if twin is None:
                out[key] = weight
                continue
            new, old = target_fit.take(target, twin, init.shape), base_fit.take(base, twin, init.shape)
            if weight is not None and new is not None and old is not None:
                # In float32: fp16 files would lose the small offsets.
                out[key] = (weight.float() + (new.float() - old.float())).to(weight.dtype)
        elif key not in target and fillable(key):
            out[key] = init
        else:
            out[key] = target_fit.take(target, key, init.shape)
    for fit in fits:
        fit.check()
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="ControlNet checkpoint trained on --base")
    parser.add_argument("--base", required=True, help="the SD checkpoint the ControlNet was trained on")
    parser.add_argument("--target", required=True, help="the community SD checkpoint to control")
    parser.add_argument("--out", required=True, help="checkpoint to write (.safetensors, else .ckpt)")
    parser.add_argument("--config", default=str(ROOT / "models" / "cldm_v15.yaml"),
                        help="ControlLDM config (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)

    refuse_existing(args.out, args.force)
    # Only what is used is kept: a 1.0 control file and v1-5-pruned.ckpt hold 5.7 and 7.7 GB.
    control = {k: v for k, v in load_state_dict(args.control).items() if k.startswith(CONTROL_PREFIX)}
    base = {k: v for k, v in load_state_dict(args.base).items() if k.startswith(UNET_PREFIX)}
    target = {k: v for k, v in load_state_dict(args.target).items() if not k.startswith(EMA_PREFIX)}
    for weights, path in ((control, args.control), (base, args.base), (target, args.target)):
        require_finite(weights, path)
    scratch = initial_state(args.config)
    fits = tuple(Fit(p, args.config) for p in (args.control, args.base, args.target))
    out = transfer_control(control, base, target, scratch, fits)
    save_state_dict(out, args.out, force=args.force)
    log.info("Done: %s (%d keys).", args.out, len(out))
    return Path(args.out)


if __name__ == "__main__":
    sys.exit(run_tool(main))

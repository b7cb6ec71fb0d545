"""Making ControlLDM checkpoints out of Stable Diffusion ones, key by key: tool_add_control.py (and its SD2.1
and SDXL variants) and what tool_transfer_control.py shares with it (the control copy's UNet twin, the keys a
checkpoint may lack, one error for all that does not fit)."""

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cldm.cli import refuse_existing
from cldm.model import CONTROL_PREFIX, create_model, load_state_dict, save_state_dict
from ldm.checkpoint import EMA_PREFIX, OPTIONAL_KEY_SUFFIXES, UNET_PREFIX, CheckpointError, require_finite
from ldm.util import get_obj_from_str

log = logging.getLogger(__name__)


def initial_state(config: str | Path) -> dict[str, torch.Tensor]:
    """Every key of the config's model at its initial value, without the whole model in memory: the model is
    built on the meta device, then its control network and its schedule again on the CPU. The base's tensors
    stay meta placeholders, as their values come from the SD checkpoint (SDXL: 5 GB here instead of 19)."""
    model = create_model(config, device="meta")
    with torch.device("cpu"):
        model.init_schedule()
        control = model.make_control_model(OmegaConf.load(config).model.params.control_stage_config)
    return model.state_dict() | {CONTROL_PREFIX + k: v for k, v in control.state_dict().items()}


def unet_twin(key: str, model_keys: dict | set) -> str | None:
    """The UNet key a control key is copied from (`control_model.X` -> `model.diffusion_model.X`), if any."""
    twin = UNET_PREFIX + key.removeprefix(CONTROL_PREFIX)
    return twin if key.startswith(CONTROL_PREFIX) and twin in model_keys else None


def fillable(key: str) -> bool:
    """Keys a checkpoint may lack: the diffusion schedule buffers (set by the config, e.g. SD1.5 has no
    `logvar`) and keys known to be optional (`...position_ids`)."""
    return "." not in key or key.endswith(OPTIONAL_KEY_SUFFIXES)


def base_family(config: str | Path) -> str:
    """Which Stable Diffusion a ControlLDM YAML builds on, by its text conditioning: SDXL's conditioner, SD2.x's
    OpenCLIP encoder, else SD1.x's CLIP."""
    params = OmegaConf.load(config).model.params
    if "conditioner_config" in params:
        return "SDXL"
    return "SD2.x" if params.cond_stage_config.target.endswith(".FrozenOpenCLIPEmbedder") else "SD1.x"


class Fit:
    """Collects the keys a checkpoint lacks and the shapes that differ, so that one error names them all."""

    def __init__(self, path: str | Path, config: str | Path):
        self.path, self.config = path, config
        self.family = base_family(config)
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def take(self, state_dict: dict[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor | None:
        if key not in state_dict:
            self.missing.append(key)
        elif state_dict[key].shape != shape:
            self.mismatched.append(f"{key} {tuple(state_dict[key].shape)} in file vs {tuple(shape)} in model")
        else:
            return state_dict[key]
        return None

    def check(self) -> None:
        found = (("keys missing", self.missing), ("shapes differ", self.mismatched))
        problems = [f"{len(items)} {what} ({'; '.join(items[:3])}{'; ...' if len(items) > 3 else ''})"
                    for what, items in found if items]
        if problems:
            raise CheckpointError(f"{self.path} does not fit {self.config}: {', '.join(problems)}",
                                  f"--config {self.config} builds on {self.family}: is the checkpoint an "
                                  f"{self.family} one? (SD1.x, SD2.x and SDXL each have their configs)")


def unet_copy_prefixes(config: str | Path) -> tuple[str, ...]:
    """The parts of the control network that start as the UNet's, for the model a config builds."""
    return get_obj_from_str(OmegaConf.load(config).model.target).unet_copy_prefixes


def add_control(sd: dict[str, torch.Tensor], scratch: dict[str, torch.Tensor], fit: Fit
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every model key from the SD checkpoint, the control copy (the parts its model class names) from its UNet,
    the rest as initialised.

    Tensors from the checkpoint keep its dtype (sd_xl_base_1.0 is float16: 7 GB, not 14 in float32).
    """
    copied = unet_copy_prefixes(fit.config)
    out, added = {}, []
    for key, init in scratch.items():
        if key.startswith(CONTROL_PREFIX):
            source = unet_twin(key, scratch) if key[len(CONTROL_PREFIX):].startswith(copied) else None
        else:
            source = key
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


def add_control_main(argv: list[str] | None, default_config: str | Path, description: str) -> Path:
    """The command line of tool_add_control.py and its SD2.1 / SDXL variants (which differ in the config)."""
    parser = argparse.ArgumentParser(description=description)
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

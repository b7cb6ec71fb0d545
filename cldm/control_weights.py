"""Making ControlLDM checkpoints out of Stable Diffusion ones, key by key: what tool_add_control.py and
tool_transfer_control.py share (the control copy's UNet twin, the keys a checkpoint may lack, one error for all
that does not fit)."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from cldm.model import CONTROL_PREFIX, create_model
from ldm.checkpoint import OPTIONAL_KEY_SUFFIXES, UNET_PREFIX, CheckpointError


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


class Fit:
    """Collects the keys a checkpoint lacks and the shapes that differ, so that one error names them all."""

    def __init__(self, path: str | Path, config: str | Path):
        self.path, self.config = path, config
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
                                  "is --config the right one for this checkpoint (SD1.x vs SD2.x)?")

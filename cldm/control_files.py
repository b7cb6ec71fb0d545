"""Control files as networks for a ControlUnit: the file's mode (cldm/modes.py) builds its network on a loaded
model. A ControlNet's structure is the copy of the model's UNet encoder (the config's control network, or its UNet);
a control-LoRA is tied to the model's UNet tensors; an LLLite network must fit the UNet's attention layers; a
T2I-Adapter's structure comes from its tensors and must fit the UNet's resolution levels.
Any other file gets one message that says what it holds and what was expected.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from cldm.control import ControlNetwork
from cldm.model import load_state_dict
from cldm.modes import recognise
from ldm.checkpoint import UserError, require_finite


def control_network(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                    config: str | os.PathLike | DictConfig, source: str | os.PathLike = "the file") -> ControlNetwork:
    """The network of a control file's tensors, ready for a ControlUnit on `model` (a ControlLDM of `config`):
    on the UNet's device and dtype, in eval mode, frozen. Raises UserError, naming `source`, for a file that holds
    no control weights, has non-finite ones, or does not fit the model."""
    found = recognise(state_dict, source)
    require_finite(state_dict, source)
    config = config if isinstance(config, DictConfig) else OmegaConf.load(config)
    reference = next(model.model.diffusion_model.parameters())
    try:
        net = found.mode.network(state_dict, model, config)
    except (ValueError, KeyError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{source} ({found.mode.name}) does not fit the model of this config: {detail}",
                        "a control file works only with the base model it was trained for (SD1.x, SD2.x, SDXL, ...)"
                        ) from err
    return net.to(device=reference.device, dtype=reference.dtype).eval().requires_grad_(False)


def load_control_network(path: str | os.PathLike, model: nn.Module,
                         config: str | os.PathLike | DictConfig) -> ControlNetwork:
    """The network of the control file at `path` for `model` (see control_network); unreadable files raise
    CheckpointError, saying what the file looks like."""
    return control_network(load_state_dict(path), model, config, source=Path(path))

"""The control modes, listed once: which mode a control file belongs to is asked of each of them.

Adding an architecture is its module (its network on the control contract and its ControlMode, cldm/control.py)
plus one entry in MODES (docs/modes.md).
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from cldm.cldm import CONTROLNET
from cldm.control import ControlMode
from cldm.controlnet_union import CONTROLNET_UNION
from cldm.controlnet_xs import CONTROLNET_XS
from cldm.lllite import LLLITE
from cldm.lora import CONTROL_LORA
from cldm.t2i_adapter import T2I_ADAPTER
from ldm.checkpoint import BASE_PREFIXES, UserError
from ldm.util import get_obj_from_str

MODES: tuple[ControlMode, ...] = (CONTROLNET, CONTROL_LORA, LLLITE, T2I_ADAPTER, CONTROLNET_XS, CONTROLNET_UNION)


@dataclass(frozen=True)
class Recognised:
    """The mode of a control file and the name of the mode's layout it is in."""

    mode: ControlMode
    layout: str

    def __str__(self) -> str:
        return f"{self.mode.name}, {self.layout} layout"


def config_mode(config_path: str | os.PathLike) -> ControlMode:
    """The mode of the model a YAML builds (its class's control_mode)."""
    target = OmegaConf.load(config_path).model.target
    return get_obj_from_str(target).control_mode


def expected_files() -> str:
    """What a control file may be, for messages."""
    return "; or ".join(mode.files for mode in MODES)


def recognise(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike = "the file") -> Recognised:
    """The one mode whose files the tensors are; a file of no mode, or of several, raises UserError naming
    `source` and what was expected."""
    found = [Recognised(mode, layout) for mode in MODES if (layout := mode.layout(state_dict)) is not None]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{source} holds the keys of {len(found)} kinds of control file at once "
                        f"({'; '.join(map(str, found))}): expected exactly one",
                        "a control file holds one network; split it, or give the files one by one")
    if any(k.startswith(BASE_PREFIXES) for k in state_dict):
        raise UserError(f"{source} is a Stable Diffusion checkpoint without control weights, not a control file",
                        "give it as the base model; a control file is " + expected_files())
    raise UserError(f"{source} holds no control weights: expected {expected_files()}; its keys are like "
                    f"{sorted(state_dict)[:3]}")

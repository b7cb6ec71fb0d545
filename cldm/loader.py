"""The one model loader: a config plus weight files of any kind -> a ready ControlLDM and one report; and a control
file -> a network for a ControlUnit on a loaded model.

A file holding base weights (`model.*`, the VAE, the text encoders) is a model checkpoint and loads by key name: a
Stable Diffusion checkpoint, a whole ControlLDM checkpoint (the original's, tool_add_control's, a Lightning one;
a training checkpoint of a run with EMA gives the EMA of its trained weights, except as a training's initial weights).
Any other file is a control file: the registry (cldm/modes.py) tells its mode, which must be the model's own, and
the mode loads it in whichever of its layouts it is. Every weight of the model must come from some file, except
the schedule buffers the config sets and, for a training's initial weights, what the mode trains from scratch.

As a unit's network, a ControlNet's structure is the copy of the model's UNet encoder (the config's control network,
or its UNet); a control-LoRA is tied to the model's UNet tensors; an LLLite network must fit the UNet's attention
layers; a T2I-Adapter's structure comes from its tensors and must fit the UNet's resolution levels.
"""

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from cldm.cldm import ControlLDM
from cldm.control import ControlMode, ControlNetwork
from cldm.control_weights import fillable
from cldm.model import CONTROL_PREFIX, LoadReport, create_model, load_checkpoint, load_state_dict
from cldm.modes import recognise
from cldm.training import weights_to_use
from ldm.checkpoint import BASE_PREFIXES, UserError, read_metadata, require_finite

log = logging.getLogger(__name__)

FilePath = str | os.PathLike


class MissingWeightsError(UserError):
    """Weights of the model that none of the files gives (the message names them and the files)."""


@dataclass
class ModelReport:
    """What assembling a model left unmatched, by name: the model's keys no file gave, and per file its keys the
    model does not use."""

    missing: list[str] = field(default_factory=list)
    unexpected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not any(self.unexpected.values())

    def __str__(self) -> str:
        parts = [f"{len(self.missing)} weights in no file (e.g. {', '.join(self.missing[:3])})"] if self.missing else []
        parts += [f"{len(keys)} keys of {source} unused (e.g. {', '.join(keys[:3])})"
                  for source, keys in self.unexpected.items() if keys]
        return "; ".join(parts) or "every weight from a file, every key used"


def holds_base(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a file is a model checkpoint (it holds base weights), loaded by key name, or a control file."""
    return any(k.startswith(BASE_PREFIXES) for k in state_dict)


def read_config(config: FilePath | DictConfig) -> DictConfig:
    return config if isinstance(config, DictConfig) else OmegaConf.load(config)


@contextlib.contextmanager
def fitting(source: FilePath, mode: ControlMode) -> Iterator[None]:
    """Turn what a mode raises for a file that does not fit the model into one line naming the file."""
    try:
        yield
    except (ValueError, KeyError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{source} ({mode.name}) does not fit the model of this config: {detail}",
                        "a control file works only with the base model it was trained for (SD1.x, SD2.x, SDXL, ...)"
                        ) from err


def load_control(model: ControlLDM, state_dict: Mapping[str, torch.Tensor], source: FilePath,
                 recorded: Mapping[str, str] | None = None) -> LoadReport:
    """A control file into the model's own control network, by the file's mode, which must be the model's;
    `recorded`: what the file records besides its tensors (ControlMode.recorded)."""
    found = recognise(state_dict, source)
    own = model.control_mode
    if found.mode is not own:
        raise UserError(f"{source} is a {found.mode.name} file ({found.layout} layout), but the model of this config "
                        f"takes {own.name} files: {own.files}",
                        "give the config of the file's mode (models/*_lora.yaml, *_lllite.yaml, ...), or use the "
                        "file as another control unit")
    with fitting(source, own):
        return own.load(model, state_dict, recorded)


def load_files(model: ControlLDM, files: Sequence[FilePath], initial: bool = False,
               config: FilePath = "the config") -> ModelReport:
    """Load `files` in order into `model`, the model of `config` (see the module's docstring); non-finite
    weights, and weights no file gives, raise UserError naming the files. `initial`: the files are a training's
    initial weights, so what the mode initialises itself (the model's fresh_prefixes) may be missing."""
    filled: set[str] = set()
    absent: list[str] = []  # reported missing by a control file's mode, and no key of the model any more
    report = ModelReport()
    for path in files:
        state_dict = load_state_dict(path) if initial else weights_to_use(path)
        require_finite(state_dict, path)
        if holds_base(state_dict):
            loaded = load_checkpoint(model, state_dict, source=path)
            filled |= state_dict.keys() & model.state_dict().keys()
        else:
            loaded = load_control(model, state_dict, path, read_metadata(path))
            own = model.state_dict().keys()
            filled |= {k for k in own if k.startswith(CONTROL_PREFIX)} - set(loaded.missing)
            filled |= state_dict.keys() & own
            absent = [k for k in loaded.missing if k not in own]
        report.unexpected[str(path)] = loaded.unexpected
    fresh = model.fresh_prefixes if initial else ()
    report.missing = [k for k in [*model.state_dict(), *absent]
                      if k not in filled and not fillable(k) and not k.startswith(fresh)]
    if report.missing:
        where = f"{files[0]} lacks" if len(files) == 1 else f"none of {[str(p) for p in files]} has"
        raise MissingWeightsError(f"{where} {len(report.missing)} weights of {config}, e.g. {report.missing[:3]}",
                                  missing_advice(model, report.missing))
    for source, keys in report.unexpected.items():
        if keys:
            log.info("%s: ignored %d keys this model does not use, e.g. %s", source, len(keys), keys[:3])
    return report


def missing_advice(model: ControlLDM, missing: list[str]) -> str:
    if all(k.startswith(CONTROL_PREFIX) for k in missing):
        return (f"give its control file too ({model.control_mode.files}), or for a new full ControlNet an initial "
                "checkpoint made by tool_add_control.py")
    return "give the Stable Diffusion checkpoint the control was trained on first, then the control file"


def load_model(config: FilePath, files: Sequence[FilePath], params: Mapping[str, Any] | None = None,
               initial: bool = False) -> tuple[ControlLDM, ModelReport]:
    """The ControlLDM of `config` (its model.params overridden by `params`) with `files` loaded in order, e.g. a
    Stable Diffusion checkpoint, then a control file of the config's mode in any of its layouts; on the CPU, in
    train mode as built. Raises UserError for a file that does not fit, has non-finite weights, or leaves a
    weight unfilled (see load_files for `initial`); the report names each file's unused keys."""
    model = create_model(config, params=params)
    return model, load_files(model, files, initial, config)


def control_network(state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: FilePath | DictConfig,
                    source: FilePath = "the file", recorded: Mapping[str, str] | None = None) -> ControlNetwork:
    """The network of a control file's tensors (and of what it records besides them, ControlMode.recorded), ready
    for a ControlUnit on `model` (a ControlLDM of `config`): on the UNet's device and dtype, in eval mode, frozen.
    Raises UserError, naming `source`, for a file that holds no control weights, has non-finite ones, or does not
    fit the model."""
    found = recognise(state_dict, source)
    require_finite(state_dict, source)
    reference = next(model.model.diffusion_model.parameters())
    with fitting(source, found.mode):
        net = found.mode.network(state_dict, model, read_config(config), recorded)
    return net.to(device=reference.device, dtype=reference.dtype).eval().requires_grad_(False)


def load_control_network(path: FilePath, model: nn.Module, config: FilePath | DictConfig) -> ControlNetwork:
    """The network of the control file at `path` for `model` (see control_network); unreadable files raise
    CheckpointError, saying what the file looks like."""
    return control_network(load_state_dict(path), model, config, source=Path(path), recorded=read_metadata(path))

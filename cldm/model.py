"""Build models from YAML configs; the original's `create_model` / `load_state_dict` API over ldm.checkpoint."""

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import LoadReport, atomic_output, load_checkpoint, load_state_dict, save_state_dict
from ldm.util import instantiate_from_config

__all__ = ["CONTROL_PREFIX", "LoadReport", "atomic_output", "create_model", "load_checkpoint", "load_state_dict",
           "save_state_dict"]

log = logging.getLogger(__name__)

# State-dict key prefix of the control network in a ControlLDM (the ControlNet 1.1 files hold only these keys).
CONTROL_PREFIX = "control_model."


def create_model(config_path: str | os.PathLike, device: str | torch.device | None = None,
                 params: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Instantiate `model:` of a YAML config (on `device`, or the current default device); `params` override
    the config's `model.params` (a training's command-line options)."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"Model config not found: {config_path}")
    config = OmegaConf.load(config_path)
    if "model" not in config:
        raise ValueError(f"{config_path} has no top-level `model:` section")
    if params:
        config.model.params = OmegaConf.merge(config.model.get("params") or {}, dict(params))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = instantiate_from_config(config.model)
    log.info("Loaded model config from [%s]", config_path)
    return model if device is not None else model.cpu()

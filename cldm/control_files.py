"""Control files as networks for a ControlUnit: which kind a file is, and its network built on a loaded model.

The kind is told by the keys, as ComfyUI's and the A1111 extension's loaders tell it:
  controlnet    a full ControlNet: `control_model.*` keys (the original's whole checkpoints, ControlNet 1.1's
                control-only files, our exports), the same keys without the prefix, or diffusers'
                ControlNetModel names (`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`);
  control-lora  LoRA offsets on the model's own UNet: the `lora_controlnet` marker (Stability's control-LoRAs,
                ours), ControlLoRA v2's `*.lora_layer.*` names, or offset pairs (`*.down` / `*.up`) under a
                ControlNet's names;
  lllite        kohya's ControlNet-LLLite: `lllite_unet_*` keys.
A ControlNet's structure is the copy of the model's UNet encoder (the config's control network, or its UNet);
a control-LoRA is tied to the model's UNet tensors; an LLLite network must fit the UNet's attention layers.
Any other file gets one message that says what it holds and what was expected.
"""

import inspect
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from cldm.cldm import ControlNet
from cldm.control import ControlNetwork
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.lllite import PREFIX as LLLITE_PREFIX
from cldm.lllite import load_lllite
from cldm.lora import MARKER, LoRAControlNet
from cldm.model import CONTROL_PREFIX, load_checkpoint, load_state_dict
from ldm.checkpoint import UNET_PREFIX, UserError, require_finite

CONTROLNET, CONTROL_LORA, LLLITE = "controlnet", "control-lora", "lllite"
KINDS = (CONTROLNET, CONTROL_LORA, LLLITE)
# Keys only a ControlNet has (beside the encoder copy it shares with the UNet), with and without the prefix.
CONTROLNET_KEYS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
DIFFUSERS_CONTROLNET_KEYS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
# Arguments of LoRAControlNet beyond a ControlNet's (its ranks follow the file when it loads one).
LORA_ARGUMENTS = set(inspect.signature(LoRAControlNet.__init__).parameters) - {"self", "image_size", "hint_channels",
                                                                                  "spec"}
EXPECTED = (f"a ControlNet ({CONTROL_PREFIX}* or input_hint_block.* keys), a control-LoRA (the {MARKER!r} "
            f"marker) or an LLLite network ({LLLITE_PREFIX}* keys)")


def control_kind(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike = "the file") -> str:
    """CONTROLNET, CONTROL_LORA or LLLITE, from the keys; a file with no control weights raises UserError."""
    keys = [k.removeprefix(CONTROL_PREFIX) for k in state_dict]
    if MARKER in state_dict or any(".lora_layer." in k for k in keys):
        return CONTROL_LORA
    if any(k.startswith(LLLITE_PREFIX) for k in keys):
        return LLLITE
    if any(k.startswith(CONTROLNET_KEYS) for k in keys):
        return CONTROL_LORA if any(k.endswith((".down", ".up")) for k in keys) else CONTROLNET
    if any(k.startswith(DIFFUSERS_CONTROLNET_KEYS) for k in keys):
        return CONTROLNET
    if any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise UserError(f"{source} is a Stable Diffusion checkpoint without control weights, not a control file",
                        "give a base model with --base; a control unit needs " + EXPECTED)
    raise UserError(f"{source} holds no control weights: expected {EXPECTED}; its keys are like "
                    f"{sorted(state_dict)[:3]}")


def controlnet_params(config: str | os.PathLike | DictConfig, hint_channels: int | None = None) -> dict:
    """The ControlNet constructor's arguments for the model of a ControlLDM config: its control network's when
    that is a ControlNet (a LoRA one without its ranks), else its UNet's (an LLLite config has no ControlNet)."""
    params = (config if isinstance(config, DictConfig) else OmegaConf.load(config)).model.params
    control = params.control_stage_config.get("params") or {}
    if "model_channels" in control:
        spec = {k: v for k, v in OmegaConf.to_container(control).items() if k not in LORA_ARGUMENTS}
    else:
        spec = {k: v for k, v in OmegaConf.to_container(params.unet_config.params).items() if k != "out_channels"}
        spec.setdefault("hint_channels", 3)
    if hint_channels is not None:
        spec["hint_channels"] = hint_channels
    return spec


def controlnet_weights(state_dict: Mapping[str, torch.Tensor], net: ControlNet) -> dict[str, torch.Tensor]:
    """A full ControlNet's tensors under our names (no prefix), from any of its layouts; a whole ControlLDM
    checkpoint gives only its control model."""
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if prefixed:
        return prefixed
    if any(k.startswith(DIFFUSERS_CONTROLNET_KEYS) for k in state_dict):
        table = {new: old for old, new in diffusers_module_names(net).items()}
        return {rename_module(k, table): v for k, v in state_dict.items()}
    return dict(state_dict)


def hint_channels_of(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The input channels of the hint encoder's first conv, in any layout (None when absent)."""
    for key in (f"{CONTROL_PREFIX}input_hint_block.0.weight", "input_hint_block.0.weight",
                "controlnet_cond_embedding.conv_in.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[1])
    return None


def control_network(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                    config: str | os.PathLike | DictConfig, source: str | os.PathLike = "the file") -> ControlNetwork:
    """The network of a control file's tensors, ready for a ControlUnit on `model` (a ControlLDM of `config`):
    on the UNet's device and dtype, in eval mode, frozen. Raises UserError, naming `source`, for a file that holds
    no control weights, has non-finite ones, or does not fit the model."""
    kind = control_kind(state_dict, source)
    require_finite(state_dict, source)
    unet = model.model.diffusion_model
    reference = next(unet.parameters())
    try:
        if kind == LLLITE:
            net = load_lllite(dict(state_dict))
            net.check_fits(unet)
        elif kind == CONTROL_LORA:
            with torch.device(reference.device):
                net = LoRAControlNet(**controlnet_params(config, hint_channels_of(state_dict))).tie(unet)
            report = net.load_lora(state_dict)
            if not report.ok:
                raise ValueError(f"its weights do not match: {report}")
        else:
            with torch.device(reference.device):
                net = ControlNet(**controlnet_params(config, hint_channels_of(state_dict)))
            report = load_checkpoint(net, controlnet_weights(state_dict, net))
            if not report.ok:
                raise ValueError(f"its weights do not match: {report}")
    except (ValueError, KeyError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{source} ({kind}) does not fit the model of this config: {detail}",
                        "a control file works only with the base model it was trained for (SD1.x, SD2.x, ...)") from err
    return net.to(device=reference.device, dtype=reference.dtype).eval().requires_grad_(False)


def load_control_network(path: str | os.PathLike, model: nn.Module,
                         config: str | os.PathLike | DictConfig) -> ControlNetwork:
    """The network of the control file at `path` for `model` (see control_network); unreadable files raise
    CheckpointError, saying what the file looks like."""
    return control_network(load_state_dict(path), model, config, source=Path(path))

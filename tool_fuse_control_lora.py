"""Fuse a control-lora file into a full ControlNet that any ControlNet consumer loads.

    python tool_fuse_control_lora.py ./control_model.safetensors ./models/control_fused.safetensors \\
        --base ./models/v1-5-pruned.ckpt
    (add --config ./models/cldm_v21_lora.yaml for SD2.x, ./models/cldm_xl_lora.yaml with
    --base ./models/sd_xl_base_1.0.safetensors for SDXL control-LoRAs, --force to overwrite)

`input` is a LoRA-offset control file in any layout cldm.lora loads (ours / Stability's control-lora, or
ControlLoRA v2's diffusers names); --base is the Stable Diffusion checkpoint it was trained on. `output` holds
`control_model.*` in the original ControlNet layout (.safetensors, .ckpt or .pth by extension): every offset
layer's weight is W + up @ down, everything else is the file's or the base UNet's tensor, in the base's dtype.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cldm.cli import refuse_existing, run_tool
from cldm.lora import LORA_CONTROLNET_TARGET, LoRAControlNet
from cldm.model import CONTROL_PREFIX, load_state_dict, save_state_dict
from ldm.checkpoint import UNET_PREFIX

DEFAULT_CONFIG = Path(__file__).resolve().parent / "models" / "cldm_v15_lora.yaml"
log = logging.getLogger(__name__)


def lora_controlnet(config_path: str | os.PathLike) -> LoRAControlNet:
    """The untied LoRA ControlNet of a LoRA-mode ControlLDM YAML."""
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"Model config not found: {config_path}")
    control = OmegaConf.load(config_path).get("model", {}).get("params", {}).get("control_stage_config", {})
    if control.get("target") != LORA_CONTROLNET_TARGET:
        raise ValueError(f"{config_path}: control model {control.get('target')} is not {LORA_CONTROLNET_TARGET}")
    return LoRAControlNet(**OmegaConf.to_container(control.params))


def fuse(lora_path: str | os.PathLike, base_path: str | os.PathLike,
         config_path: str | os.PathLike = DEFAULT_CONFIG) -> dict[str, torch.Tensor]:
    """`control_model.*` of a full ControlNet equal to the control-lora file on the base checkpoint's UNet."""
    base = load_state_dict(base_path)
    unet = {k[len(UNET_PREFIX):]: v for k, v in base.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        raise ValueError(f"{base_path} has no `{UNET_PREFIX}*` keys: --base must be a Stable Diffusion "
                         "checkpoint")
    net = lora_controlnet(config_path).tie(unet)
    report = net.load_lora(load_state_dict(lora_path))
    if not report.ok:
        raise ValueError(f"{lora_path} does not fit the LoRA ControlNet of {config_path}: {report}")
    dtype = next(iter(unet.values())).dtype
    return {CONTROL_PREFIX + k: v.to(dtype) for k, v in net.fused_state_dict().items()}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="control-lora file (.safetensors, .ckpt or .pth)")
    p.add_argument("output", help="full ControlNet to write (.safetensors, .ckpt or .pth)")
    p.add_argument("--base", required=True, help="the Stable Diffusion checkpoint of the control-lora")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="LoRA-mode YAML (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = p.parse_args(argv)
    refuse_existing(args.output, args.force)
    out = save_state_dict(fuse(args.input, args.base, args.config), args.output, force=args.force)
    log.info("Wrote %s", out)
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main))

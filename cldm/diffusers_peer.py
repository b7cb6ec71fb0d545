"""diffusers' modules holding a ControlLDM's weights: the peer that parity tests and benchmarks compare against.

diffusers' UNet2DConditionModel, ControlNetModel and AutoencoderKL are built from the model's state dict with
diffusers' own LDM converters (UNet, VAE) and cldm/diffusers_convert.py (ControlNet). diffusers' text encoder
would need transformers' CLIP weights, so the peer shares the model's text encoder.
"""

from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn as nn
from diffusers.loaders import single_file_utils as convert
from omegaconf import OmegaConf

from cldm.diffusers_convert import build_mapping, to_diffusers


@dataclass
class Peer:
    """diffusers' modules holding our model's weights; the text encoder is ours (shared)."""

    unet: nn.Module
    controlnet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    scale_factor: float

    @property
    def modules(self) -> list[nn.Module]:
        return [self.unet, self.controlnet, self.vae, self.text_encoder]


def build_peer(model: nn.Module, config: str | Path, device: torch.device | str) -> Peer:
    """diffusers' UNet, ControlNet and VAE loaded (strictly) with `model`'s weights; `config` is its YAML."""
    original = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with torch.device(device):
        unet_config = convert.create_unet_diffusers_config_from_ldm(original, sd)
        unet = diffusers.UNet2DConditionModel(**unet_config)
        unet.load_state_dict(convert.convert_ldm_unet_checkpoint(sd, unet_config))
        mapping = build_mapping(config)
        controlnet = diffusers.ControlNetModel.from_config(mapping.config)
        controlnet.load_state_dict(to_diffusers(sd, mapping))
        vae_config = convert.create_vae_diffusers_config_from_ldm(original, sd)
        vae = diffusers.AutoencoderKL(**vae_config)
        vae.load_state_dict(convert.convert_ldm_vae_checkpoint(sd, vae_config))
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    return Peer(unet.eval(), controlnet, vae.eval(), model.cond_stage_model, model.scale_factor)


def peer_eps(peer: Peer, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
             hint: torch.Tensor) -> torch.Tensor:
    """diffusers' ControlNet residuals added into its UNet, as StableDiffusionControlNetPipeline does."""
    down, mid = peer.controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return peer.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0]

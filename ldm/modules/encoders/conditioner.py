"""SDXL's conditioner: several embedders whose outputs form the cross-attention context and the vector y.

As Stability's sgm `GeneralConditioner` (its state-dict layout, `embedders.N.*`, and its config): each embedder
reads one batch key; 3-D outputs (tokens) are concatenated on the feature axis into `crossattn`, 2-D outputs
into `vector`, in embedder order. For SDXL 1.0 base: CLIP ViT-L hidden layer 11 (768) + OpenCLIP ViT-bigG
penultimate layer (1280) -> 77 x 2048 crossattn; bigG's pooled text (1280) + original size, crop top-left and
target size, each (h, w) or (top, left) as two 256-wide sinusoidal embeddings -> a 2816-wide vector.

An empty prompt: with `zero_empty_prompt` (the default) the text embedders' outputs for "" are zeros, as
Stability trained SDXL (text dropout zeroes the embeddings) and samples it (the unconditional side is zeroed),
and as diffusers' SDXL pipeline forms the unconditional side without a negative prompt
(`force_zeros_for_empty_prompt`). A non-empty negative prompt is encoded, as diffusers does. Off, "" is encoded
like any prompt (the SD1.x/2.x convention). The one difference from diffusers: an empty *positive* prompt is
zeros here, encoded there.
"""

from typing import Any

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import AbstractEncoder
from ldm.util import instantiate_from_config

# Batch keys of the size conditioning, as in sgm's data pipeline; each holds (B, 2) numbers.
ORIGINAL_SIZE, CROP, TARGET_SIZE = "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"
SIZE_KEYS = (ORIGINAL_SIZE, CROP, TARGET_SIZE)


def size_conditions(batch_size: int, image_size: tuple[int, int], original_size: Any = None, crop: Any = (0, 0),
                    target_size: Any = None, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The size entries of a batch, (batch_size, 2) each: original and target size default to the generated
    image's (h, w), the crop to (0, 0) (Stability's and diffusers' sampling defaults). Each value is one pair for
    all samples, or one pair per sample."""
    values = {ORIGINAL_SIZE: image_size if original_size is None else original_size, CROP: crop,
              TARGET_SIZE: image_size if target_size is None else target_size}
    return {k: torch.as_tensor(v, dtype=torch.float32).reshape(-1, 2).to(device).expand(batch_size, 2).contiguous()
            for k, v in values.items()}


class ConcatTimestepEmbedderND(nn.Module):
    """Each number of a (B, N) input as a sinusoidal embedding of width `outdim` (cos half first), concatenated:
    (B, N * outdim). SDXL embeds sizes and crop coordinates this way (diffusers' `add_time_proj`)."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x[:, None]
        emb = timestep_embedding(rearrange(x, "b d -> (b d)"), dim=self.outdim)
        return rearrange(emb, "(b d) d2 -> b (d d2)", b=x.shape[0])


class GeneralConditioner(AbstractEncoder):
    """Embedders over batch keys -> {"crossattn": (B, L, sum of widths), "vector": (B, sum of widths)}.

    `emb_models`: one config per embedder, in sgm's form (`target`, `params`, `input_key`); the text embedders
    (input_key `text_key`) come first, so that their outputs can be cached apart from the size embeddings.
    """

    def __init__(self, emb_models: list, text_key: str = "txt", zero_empty_prompt: bool = True):
        super().__init__()
        embedders, keys = [], []
        for n, config in enumerate(emb_models):
            config = OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)
            if config.pop("is_trainable", False):
                raise ValueError(f"emb_models[{n}]: is_trainable is not supported; the conditioner stays frozen")
            if config.pop("ucg_rate", 0.0):
                raise ValueError(f"emb_models[{n}]: ucg_rate is not supported; prompt dropout is the model's "
                                 "drop_prompt_rate (a dropped prompt is zeros under zero_empty_prompt)")
            if "input_key" not in config:
                raise ValueError(f"emb_models[{n}] needs an input_key (the batch key it embeds)")
            keys.append(config.pop("input_key"))
            embedders.append(instantiate_from_config(config))
        if text_key not in keys:
            raise ValueError(f"no embedder reads the text key {text_key!r}")
        first_other = next((i for i, k in enumerate(keys) if k != text_key), len(keys))
        if any(k == text_key for k in keys[first_other:]):
            raise ValueError(f"the text embedders (input_key {text_key!r}) must come before the others")
        self.embedders = nn.ModuleList(embedders)
        self.input_keys = keys
        self.text_key = text_key
        self.num_text_embedders = first_other
        self.zero_empty_prompt = zero_empty_prompt

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(crossattn, the text part of the vector) of the prompts: what a text cache stores."""
        prompts = list(prompts)
        crossattn, vector = [], []
        for embedder in self.embedders[:self.num_text_embedders]:
            out = embedder(prompts)
            for emb in out if isinstance(out, (tuple, list)) else (out,):
                if self.zero_empty_prompt:
                    keep = torch.tensor([p != "" for p in prompts], device=emb.device)
                    emb = emb * keep.view(-1, *([1] * (emb.dim() - 1))).to(emb.dtype)
                (crossattn if emb.dim() == 3 else vector).append(emb)
        if not crossattn:
            raise ValueError("no text embedder returns token features (3-D) for cross-attention")
        text_vector = torch.cat(vector, dim=1) if vector else crossattn[0].new_zeros(len(prompts), 0)
        return torch.cat(crossattn, dim=2), text_vector

    def assemble(self, crossattn: torch.Tensor, text_vector: torch.Tensor, batch: dict[str, Any]
                 ) -> dict[str, torch.Tensor]:
        """The conditioning from the text outputs (fresh or cached) and the other embedders' batch keys."""
        missing = [k for k in self.input_keys[self.num_text_embedders:] if k not in batch]
        if missing:
            raise KeyError(f"the conditioner needs batch keys {missing} (e.g. from size_conditions)")
        rest = [embedder(batch[key].to(text_vector.device, torch.float32)) for embedder, key
                in zip(self.embedders[self.num_text_embedders:], self.input_keys[self.num_text_embedders:])]
        vector = torch.cat([text_vector, *(r.to(text_vector.dtype) for r in rest)], dim=1)
        return {"crossattn": crossattn, "vector": vector}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.assemble(*self.encode_text(batch[self.text_key]), batch)

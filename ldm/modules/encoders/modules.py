"""Frozen text encoders of Stable Diffusion: CLIP ViT-L/14 (SD1.x) and OpenCLIP ViT-H/14 (SD2.x).

Both build offline with random weights (their real weights come from the SD checkpoint) and tokenize
with open_clip's bundled BPE vocabulary, so neither ever touches the network.
"""

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class AbstractEncoder(nn.Module):
    """A conditioning encoder; `encode` is the name LatentDiffusion calls."""

    def encode(self, x):
        return self(x)

    def freeze(self) -> None:
        """Eval mode and no gradients: the text encoder stays as published while the control trains."""
        self.eval()
        for p in self.parameters():
            p.requires_grad = False


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(x, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width, 4 * width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(width, heads) for _ in range(layers)])


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # SD1.x checkpoints carry HuggingFace's constant position_ids buffer (0..76): it holds no weights
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPTextTransformer(nn.Module):
    """HuggingFace's CLIPTextTransformer layout: `embeddings`, `encoder.layers.N`, `final_layer_norm`."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_length: int):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_length)
        self.encoder = CLIPEncoder(width, layers, heads)
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states as HuggingFace numbers them: the embeddings, then each layer's output."""
        hidden = [self.embeddings(tokens)]
        for layer in self.encoder.layers:
            hidden.append(layer(hidden[-1]))
        return hidden


class CLIPTextModel(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.text_model = CLIPTextTransformer(**kwargs)


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP ViT-L/14 text encoder of SD1.x; its state dict is HuggingFace's `transformer.text_model.*`.

    `device` is accepted for config compatibility only: tokens go to the device of the parameters.
    """

    LAYERS = ("last", "pooled", "hidden", "penultimate")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device=None, max_length: int = 77,
                 freeze: bool = True, layer: str = "last", layer_idx: int | None = None, *,
                 width: int = 768, layers: int = 12, heads: int = 12, vocab_size: int = 49408):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden" and (layer_idx is None or not 0 <= abs(layer_idx) <= layers):
            raise ValueError(f"layer='hidden' needs layer_idx with |layer_idx| <= {layers}, got {layer_idx}")
        self.version = version  # config compatibility only: weights come from the checkpoint, not a download
        self.layer = layer
        # "penultimate" is clip skip 2 as A1111/ComfyUI do it: hidden layer -2, then the final layer norm
        self.layer_idx = layer_idx if layer == "hidden" else -2 if layer == "penultimate" else -1
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=max_length)
        self.transformer = CLIPTextModel(vocab_size=vocab_size, width=width, layers=layers, heads=heads,
                                         max_length=max_length)
        if freeze:
            self.freeze()

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """SD1.x tokens: truncated keeping end-of-text last, padded with end-of-text (open_clip pads 0)."""
        tokens = self.tokenizer(text)
        eot = self.tokenizer.eot_token_id
        first_eot = (tokens == eot).int().argmax(dim=1, keepdim=True)
        return tokens.masked_fill(torch.arange(tokens.shape[1], device=tokens.device) > first_eot, eot)

    def forward(self, text: str | list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(text))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding of tokens from `tokenize` (for callers that tokenize once and encode many times)."""
        text_model = self.transformer.text_model
        tokens = tokens.to(text_model.embeddings.token_embedding.weight.device)
        z = text_model(tokens)[self.layer_idx]
        if self.layer == "hidden":
            return z
        z = text_model.final_layer_norm(z)
        if self.layer == "pooled":
            # HuggingFace's pooler_output: the state at the first end-of-text token, as a 1-token sequence
            first_eot = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1)
            return z[torch.arange(len(z), device=z.device), first_eot, None]
        return z


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """open_clip's additive causal mask; built per call, not taken from the non-persistent attn_mask buffer
    that a meta-device build leaves empty."""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


# The visual tower is deleted right after construction, so build the smallest one open_clip allows.
_TINY_VISION = dict(image_size=1, patch_size=1, width=8, head_width=8, layers=1)


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """OpenCLIP text tower of SD2.x, named as open_clip's CLIP (`model.*`), visual tower removed.

    `device` is accepted for config compatibility only: tokens go to the device of the parameters.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device=None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last", *, width: int | None = None,
                 layers: int | None = None, heads: int | None = None, embed_dim: int | None = None):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        cfg = open_clip.get_model_config(arch)
        sizes = {k: v for k, v in dict(width=width, layers=layers, heads=heads).items() if v is not None}
        text_cfg = {**cfg["text_cfg"], **sizes, "context_length": max_length}
        # pretrained=None builds offline; the default device lets `with torch.device("meta")` build it
        model = open_clip.create_model(arch, pretrained=None, device=torch.get_default_device(),
                                       text_cfg=text_cfg, vision_cfg=_TINY_VISION,
                                       embed_dim=embed_dim or cfg["embed_dim"])
        del model.visual
        self.model = model
        self.version = version  # config compatibility only: weights come from the checkpoint, not a download
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        self.tokenizer = open_clip.get_tokenizer(arch, context_length=max_length)
        if freeze:
            self.freeze()

    def tokens(self, text: str | list[str]) -> torch.Tensor:
        """open_clip's tokens (padded with 0), on the device of the parameters."""
        return self.tokenizer(text).to(self.model.positional_embedding.device)

    def run_blocks(self, tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The token features after the first `n_blocks` transformer blocks (no final norm)."""
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        mask = causal_mask(x.shape[1], x.device)
        for block in self.model.transformer.resblocks[:n_blocks]:
            x = block(x, attn_mask=mask)  # open_clip 3.x blocks are batch-first: no permute to (L, N, D)
        return x

    def forward(self, text: str | list[str]) -> torch.Tensor:
        n_blocks = len(self.model.transformer.resblocks) - self.layer_idx
        return self.model.ln_final(self.run_blocks(self.tokens(text), n_blocks))


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's second text encoder (OpenCLIP ViT-bigG-14 text tower), as Stability's sgm builds it (`legacy: False`).

    The features of `layer` without ln_final (penultimate: the input of the last block) for cross-attention
    and, with `always_return_pooled`, the pooled text feature as well: ln_final of the last block's output at
    the end-of-text token (the largest token id), times `text_projection`.
    """

    def __init__(self, arch: str = "ViT-bigG-14", version: str = "laion2b_s39b_b160k", device=None,
                 max_length: int = 77, freeze: bool = True, layer: str = "penultimate",
                 always_return_pooled: bool = False, legacy: bool = False, **sizes):
        if legacy:
            raise ValueError("FrozenOpenCLIPEmbedder2 implements sgm's legacy: False; for the SD2.x encoder "
                             "(final norm on the chosen layer) use FrozenOpenCLIPEmbedder")
        super().__init__(arch, version, device, max_length, freeze, layer, **sizes)
        self.always_return_pooled = always_return_pooled

    def forward(self, text: str | list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(text)
        blocks = self.model.transformer.resblocks
        penultimate = self.run_blocks(tokens, len(blocks) - 1)
        last = blocks[-1](penultimate, attn_mask=causal_mask(tokens.shape[1], tokens.device))
        z = penultimate if self.layer == "penultimate" else last
        if not self.always_return_pooled:
            return z
        eot = tokens.argmax(dim=-1)
        pooled = self.model.ln_final(last)[torch.arange(len(tokens), device=tokens.device), eot]
        return z, pooled @ self.model.text_projection

"""UniFormer backbone (Li et al. 2022) as built by upernet_global_small: conv blocks in stages 1-2,
global self-attention in stages 3-4, a LayerNorm'd patch embedding before each stage and a LayerNorm
on each stage's output. Inference only: drop-path and dropout (identity in eval) are left out.
"""

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# UniFormer's default norm_layer; the patch embeddings keep torch's LayerNorm default instead
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


def channels_last_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Apply a LayerNorm over the channels of a BCHW map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; `layer` is nn.Linear for tokens or a 1x1 conv for BCHW maps."""

    def __init__(self, dim: int, hidden: int, layer: type[nn.Module] = nn.Linear) -> None:
        super().__init__()
        self.fc1 = layer(dim, hidden)
        self.fc2 = layer(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CBlock(nn.Module):
    """Local relation aggregator: depthwise 5x5 conv between 1x1 convs, BatchNorm, conv MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), layer=partial(nn.Conv2d, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        # SDPA's default scale is head_dim ** -0.5, the original's scale
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class SABlock(nn.Module):
    """Global relation aggregator: conv position encoding, then a pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm6(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm6(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        H, W = x.shape[-2:]
        x = rearrange(x, "b c h w -> b (h w) c")
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return rearrange(x, "b (h w) c -> b c h w", h=H, w=W)


class PatchEmbed(nn.Module):
    """Non-overlapping strided conv followed by a LayerNorm over channels."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        # created before proj, as upstream: the state-dict order follows
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_norm(self.norm, self.proj(x))


class UniFormer(nn.Module):
    """Four-stage UniFormer returning the normalized stage outputs at strides 4, 8, 16 and 32."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 8, 3),
        embed_dim: tuple[int, ...] = (64, 128, 320, 512),
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        in_dims = (in_chans, *embed_dim[:-1])
        for i, patch_size in enumerate((4, 2, 2, 2)):
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(patch_size, in_dims[i], embed_dim[i]))
        for i, (depth, dim) in enumerate(zip(layers, embed_dim, strict=True)):
            if i < 2:
                blocks = [CBlock(dim, mlp_ratio) for _ in range(depth)]
            else:
                blocks = [SABlock(dim, dim // head_dim, mlp_ratio, qkv_bias) for _ in range(depth)]
            setattr(self, f"blocks{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", LayerNorm6(dim))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                x = block(x)
            # the normalized map is a side output; the next stage continues from the raw one
            outs.append(channels_last_norm(getattr(self, f"norm{i}"), x))
        return outs

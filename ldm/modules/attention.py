"""Cross-attention and the SpatialTransformer of the SD UNet, on F.scaled_dot_product_attention."""

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InputAdapter(Protocol):
    """Changes what an attention projection sees, for one forward of the network (a control acting inside the
    UNet does this). Passed down the forward as an argument, so gradient checkpointing re-runs it alike."""

    def __call__(self, projection: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """What to add to x before `projection` sees it; None for projections it leaves alone."""


def adapted(adapter: InputAdapter, projection: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    residual = adapter(projection, x)
    return x if residual is None else x + residual


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, slice_size: int | None = None):
        super().__init__()
        self.slice_size = slice_size  # queries per chunk when memory matters (set_attention_slicing); None = one pass
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                adapter: InputAdapter | None = None) -> torch.Tensor:
        context = x if context is None else context
        if adapter is None:
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        else:
            q, k, v = (proj(adapted(adapter, proj, inp)) for proj, inp in ((self.to_q, x), (self.to_k, context),
                                                                           (self.to_v, context)))
        # Tensor methods rather than einops on this path: it runs ~100 times per UNet step, and einops' per-call
        # cost adds up where eager sampling at batch 1 is bound by the host, not the device.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # b n (h d) -> b h n d
        if mask is not None:
            mask = rearrange(mask, "b j -> b 1 1 j").bool()
        if self.slice_size is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + self.slice_size], k, v, attn_mask=mask)
                             for i in range(0, q.shape[2], self.slice_size)], dim=2)
        return self.to_out(out.transpose(1, 2).flatten(2))  # b h n d -> b n (h d)


def set_attention_slicing(module: nn.Module, slice_size: int | None) -> int:
    """Every CrossAttention in `module` attends `slice_size` queries at a time (None: all at once), trading speed
    for peak memory on large images; returns how many layers it set. Same numbers either way."""
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"slice_size must be a positive number of queries or None, got {slice_size}")
    layers = [m for m in module.modules() if isinstance(m, CrossAttention)]
    for layer in layers:
        layer.slice_size = slice_size
    return len(layers)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, checkpoint: bool = True, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # With self-attention disabled, attn1 attends to the context instead (as in SD 2.x).
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                adapter: InputAdapter | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context, adapter), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                 adapter: InputAdapter | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None, adapter=adapter) + x
        x = self.attn2(self.norm2(x), context=context, adapter=adapter) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: project in, blocks, zero-initialised project out."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | list[int] | None = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = True, norm_groups: int = 32):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(num_groups=norm_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout,
                                  context_dim=None if context_dim is None else context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)
        ])
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None,
                adapter: InputAdapter | None = None) -> torch.Tensor:
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()  # b c h w -> b (h w) c
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, context):
            x = block(x, context=ctx, adapter=adapter)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).unflatten(2, (h, w)).contiguous()  # b (h w) c -> b c h w
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in

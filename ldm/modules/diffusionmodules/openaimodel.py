"""The SD UNet: ResBlocks and SpatialTransformers around a timestep embedding, with skip connections."""

from abc import abstractmethod
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, InputAdapter, SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class BlockSite(NamedTuple):
    """One block of the UNet: `part` is "input", "middle" or "output", `index` its place in input_blocks or
    output_blocks (0 for the middle block)."""

    part: str
    index: int


MIDDLE = BlockSite("middle", 0)


class BlockHook:
    """What a control does to the UNet's hidden states around its blocks during one forward.

    The UNet calls every hook it is given, in order, at each block; each method returns what the UNet goes on
    with, and the defaults change nothing. A control that adds its own features to the encoder's (T2I-Adapter)
    overrides block_output; one that exchanges features with the UNet in both directions (ControlNet-XS) reads
    the blocks' inputs and outputs, keeps its own state in the hook, and adds to the decoder's inputs too. A
    hook lives for one forward: it is an argument, nothing of it stays on the UNet.
    """

    def time_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        """The timestep embedding, before the vector y's embedding is added (SDXL)."""
        return emb

    def embedding(self, emb: torch.Tensor) -> None:
        """The embedding every block of this forward gets: the time embedding after the hooks' time_embedding,
        plus the vector y's (SDXL). A hook that runs blocks of its own beside the UNet's reads it here."""

    def block_input(self, site: BlockSite, h: torch.Tensor) -> torch.Tensor:
        """h about to enter the block at `site`; for an output block, before the skip is concatenated to it."""
        return h

    def block_output(self, site: BlockSite, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h = block(x) just computed at `site` (x with the skip concatenated for an output block). An input
        block's result is the skip connection and the next block's input alike."""
        return h


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding and the context to the children that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                adapter: InputAdapter | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, adapter)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Two 3x3 convs with the timestep embedding added in between; zero-initialised output conv.

    The norms have 32 groups and eps 1e-5 as in SD; `groups`, `groups_out` (default `groups`) and `eps` set
    them otherwise, as diffusers' ResnetBlock2D does (ControlNet-XS's narrow control blocks).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False, groups: int = 32,
                 groups_out: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels, groups, eps), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, groups_out or groups, eps), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


@dataclass
class UNetSpec:
    """Hyper-parameters of the UNet encoder, as named in the original configs; builds the shared parts.

    The UNet and the ControlNet both build time_embed, input_blocks and middle_block from one spec,
    which is what makes the ControlNet an exact copy of the UNet's encoder.
    """

    in_channels: int
    model_channels: int
    num_res_blocks: int | Sequence[int]
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int | Sequence[int] = 1
    context_dim: int | None = None
    legacy: bool = True
    disable_self_attentions: Sequence[bool] | None = None
    num_attention_blocks: Sequence[int] | None = None
    disable_middle_self_attn: bool = False
    use_linear_in_transformer: bool = False
    # Vector conditioning (SDXL): "sequential" adds label_emb(y), an MLP of y (adm_in_channels wide), to the
    # timestep embedding; y is the conditioner's `vector` (pooled text + size embeddings).
    num_classes: str | None = None
    adm_in_channels: int | None = None
    use_fp16: bool = False  # accepted for config compatibility; precision is chosen by Lightning

    def __post_init__(self):
        levels = len(self.channel_mult)
        if not self.use_spatial_transformer:
            raise ValueError("use_spatial_transformer must be True: this UNet only implements the SD "
                             "SpatialTransformer attention (every SD 1.x/2.x config sets it)")
        if self.context_dim is None:
            raise ValueError("context_dim is required: the SpatialTransformer cross-attends to the text")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if self.num_classes not in (None, "sequential"):
            raise ValueError(f"num_classes must be 'sequential' (vector conditioning, as SDXL) or unset, got "
                             f"{self.num_classes!r}: class-label embeddings are not implemented")
        if self.num_classes == "sequential" and not self.adm_in_channels:
            raise ValueError("num_classes: sequential needs adm_in_channels (the width of the vector y)")
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = [self.num_res_blocks] * levels
        if isinstance(self.transformer_depth, int):
            self.transformer_depth = [self.transformer_depth] * levels
        for name in ("num_res_blocks", "transformer_depth", "disable_self_attentions", "num_attention_blocks"):
            value = getattr(self, name)
            if value is not None and len(value) != levels:
                raise ValueError(f"{name} needs one entry per channel_mult level ({levels}), got {list(value)}")
        self.time_embed_dim = self.model_channels * 4

    def resblock(self, channels: int, out_channels: int, **kwargs) -> ResBlock:
        return ResBlock(channels, self.time_embed_dim, self.dropout, out_channels=out_channels, dims=self.dims,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm,
                        **kwargs)

    def transformer(self, ch: int, level: int, disable_self_attn: bool) -> SpatialTransformer:
        if self.num_head_channels == -1:
            num_heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            num_heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = ch // num_heads
        return SpatialTransformer(ch, num_heads, dim_head, depth=self.transformer_depth[level],
                                  context_dim=self.context_dim, disable_self_attn=disable_self_attn,
                                  use_linear=self.use_linear_in_transformer, use_checkpoint=self.use_checkpoint)

    def has_attention(self, ds: int, level: int, index: int) -> bool:
        limited = self.num_attention_blocks is not None and index >= self.num_attention_blocks[level]
        return ds in self.attention_resolutions and not limited

    def self_attention_disabled(self, level: int) -> bool:
        return bool(self.disable_self_attentions[level]) if self.disable_self_attentions is not None else False

    def time_embed(self) -> nn.Sequential:
        return nn.Sequential(linear(self.model_channels, self.time_embed_dim), nn.SiLU(),
                             linear(self.time_embed_dim, self.time_embed_dim))

    def label_emb(self) -> nn.Sequential | None:
        """The embedding of the vector y added to the timestep embedding, or None without vector conditioning.

        Nested in a second Sequential as in the original, hence the keys `label_emb.0.0.*` and `label_emb.0.2.*`.
        """
        if self.num_classes is None:
            return None
        return nn.Sequential(nn.Sequential(linear(self.adm_in_channels, self.time_embed_dim), nn.SiLU(),
                                           linear(self.time_embed_dim, self.time_embed_dim)))

    def input_blocks(self) -> tuple[nn.ModuleList, list[int]]:
        """The down path, plus the channel count of every block's output (the skip connections)."""
        blocks = nn.ModuleList([TimestepEmbedSequential(
            conv_nd(self.dims, self.in_channels, self.model_channels, 3, padding=1))])
        chans, ch, ds = [self.model_channels], self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [self.resblock(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if self.has_attention(ds, level, nr):
                    layers.append(self.transformer(ch, level, self.self_attention_disabled(level)))
                blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (self.resblock(ch, ch, down=True) if self.resblock_updown
                        else Downsample(ch, self.conv_resample, dims=self.dims, out_channels=ch))
                blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        return blocks, chans

    def bottom(self) -> tuple[int, int, int]:
        """Channels, downsampling factor and level index at the bottom of the down path."""
        levels = len(self.channel_mult)
        return self.model_channels * self.channel_mult[-1], 2 ** (levels - 1), levels - 1

    def middle_block(self) -> TimestepEmbedSequential:
        ch, _, level = self.bottom()
        return TimestepEmbedSequential(self.resblock(ch, ch),
                                       self.transformer(ch, level, self.disable_middle_self_attn),
                                       self.resblock(ch, ch))


class UNetModel(nn.Module):
    """The SD UNet; keyword arguments as in the original configs (see UNetSpec)."""

    def __init__(self, image_size: int, out_channels: int, num_heads_upsample: int = -1, **spec):
        super().__init__()
        b = UNetSpec(**spec)
        self.image_size = image_size
        self.model_channels = model_channels = b.model_channels
        self.out_channels = out_channels
        channel_mult, dims, conv_resample = b.channel_mult, b.dims, b.conv_resample
        self.time_embed = b.time_embed()
        self.label_emb = b.label_emb()
        self.input_blocks, input_block_chans = b.input_blocks()
        self.middle_block = b.middle_block()
        # num_heads_upsample is accepted for config compatibility: the original gives it only to its old-style
        # AttentionBlock, so its SpatialTransformers (the only attention here) keep num_heads in the up path too.
        ch, ds, _ = b.bottom()
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(b.num_res_blocks[level] + 1):
                layers = [b.resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if b.has_attention(ds, level, i):
                    layers.append(b.transformer(ch, level, b.self_attention_disabled(level)))
                if level and i == b.num_res_blocks[level]:
                    layers.append(b.resblock(ch, ch, up=True) if b.resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (float32, or a half-precision copy made for inference)."""
        return self.time_embed[0].weight.dtype

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
               y: torch.Tensor | None = None, adapter: InputAdapter | None = None,
               hooks: Sequence[BlockHook] = ()) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Down path and middle: returns the middle output, the time embedding and the skip features."""
        emb = embed_time_and_vector(self, x, timesteps, y, hooks)
        hs, h = [], x
        for i, module in enumerate(self.input_blocks):
            h = run_block(module, BlockSite("input", i), h, hooks, emb, context, adapter)
            hs.append(h)
        return run_block(self.middle_block, MIDDLE, h, hooks, emb, context, adapter), emb, hs

    def decode(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
               skips: list[torch.Tensor], adapter: InputAdapter | None = None,
               hooks: Sequence[BlockHook] = ()) -> torch.Tensor:
        """Up path, consuming the skip features deepest first."""
        for i, module in enumerate(self.output_blocks):
            site = BlockSite("output", i)
            for hook in hooks:
                h = hook.block_input(site, h)
            x = torch.cat([h, skips.pop()], dim=1)
            h = module(x, emb, context, adapter)
            for hook in hooks:
                h = hook.block_output(site, x, h)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, adapter: InputAdapter | None = None,
                hooks: Sequence[BlockHook] = ()) -> torch.Tensor:
        """eps (or v); `y`: the vector of vector-conditioned bases (SDXL); `adapter` acts on the attention
        projections' inputs and `hooks` around the blocks during this forward."""
        h, emb, hs = self.encode(x, timesteps, context, y, adapter, hooks)
        return self.decode(h, emb, context, hs, adapter, hooks)


def run_block(module: TimestepEmbedSequential, site: BlockSite, h: torch.Tensor, hooks: Sequence[BlockHook],
              emb: torch.Tensor, context: torch.Tensor | None, adapter: InputAdapter | None) -> torch.Tensor:
    """module(h) with the hooks' block_input before it and block_output after it."""
    for hook in hooks:
        h = hook.block_input(site, h)
    out = module(h, emb, context, adapter)
    for hook in hooks:
        out = hook.block_output(site, h, out)
    return out


def embed_time_and_vector(net: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None,
                          hooks: Sequence[BlockHook] = ()) -> torch.Tensor:
    """time_embed(timestep features), passed through the hooks, plus label_emb(y) for a vector-conditioned net
    (UNet or ControlNet alike); the hooks are shown the result.

    A vector-conditioned net refuses to run without y and a plain one refuses a y: either would silently
    compute another function than the checkpoint was trained for.
    """
    emb = net.time_embed(timestep_embedding(timesteps, net.model_channels).to(x.dtype))
    for hook in hooks:
        emb = hook.time_embedding(emb)
    if net.label_emb is None:
        if y is not None:
            raise ValueError("this network has no vector conditioning (num_classes unset) but got y")
    elif y is None:
        raise ValueError("this network is vector-conditioned (num_classes: sequential, e.g. SDXL) and needs y: "
                         "the conditioner's `vector` (cond['c_adm'])")
    else:
        emb = emb + net.label_emb(y.to(emb.dtype))
    for hook in hooks:
        hook.embedding(emb)
    return emb


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch `use_checkpoint` of every ResBlock and transformer block under `module` (UNet, ControlNet, ...)."""
    for m in module.modules():
        if isinstance(m, ResBlock):
            m.use_checkpoint = enabled
        elif isinstance(m, BasicTransformerBlock):
            m.checkpoint = enabled

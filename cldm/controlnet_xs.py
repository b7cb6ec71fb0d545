"""ControlNet-XS (Zavadski et al. 2023): a small control encoder that runs in lock-step with the locked UNet's encoder
and exchanges features with it in both directions at every block.

The network is diffusers' `ControlNetXSAdapter`, with its module tree and parameter names (files are its
`save_pretrained` layout); what the adapter does inside `UNetControlNetXSModel`'s forward is done here by a
`BlockHook` around our own UNet's blocks (cldm/control.py's BlockControl):

  input block 0 (conv_in)  ctrl = conv_in(x) + hint embedding;            base += control_to_base_for_conv_in(ctrl)
  every other input block  ctrl = block(cat[ctrl, base_to_ctrl(base in)]); base out += ctrl_to_base(ctrl)
  middle block             the same, with the adapter's middle block
  output block k           before the skip is concatenated: base += up ctrl_to_base(ctrl state of input block N-1-k)
each `ctrl_to_base` term times the unit's strength (diffusers' `conditioning_scale`). With `learn_time_embedding`,
the adapter's own time embedding is mixed into the UNet's (`time_embedding_mix` ** 0.3 of it, as diffusers
computes), which every block then gets, the UNet's included.

The control blocks are this project's ResBlock, SpatialTransformer and Downsample with diffusers' group counts: the
largest divisor of a block's width up to `max_norm_num_groups`, eps 1e-5 in the down blocks and 1e-6 in the middle
block (diffusers' `UNetMidBlock2DCrossAttn` default). The UNet itself keeps its own norms: diffusers'
`UNetControlNetXSModel` rebuilds the base resnets with eps 1e-6 instead of the UNet's 1e-5, which changes the base
model itself; this port does not copy that. Levels may have any number of blocks (`layers_per_block`, e.g. 1 for the
demo's base); diffusers' class supports only 2, so only such adapters load in diffusers.

Initialisation is diffusers' (`ControlNetXSAdapter.from_unet`): PyTorch's default for every layer, zero only for the
`base_to_ctrl` / `ctrl_to_base` convolutions and the hint embedding's last conv. (vislearn's original code also zeroes
each ResBlock's last conv and each transformer's proj_out, as the SD UNet does.) One exception: a learnt time
embedding starts as a copy of the UNet's, as vislearn's training copies the base's weights where the shapes agree
(tool_add_control.py does it by name: `control_model.time_embed` from `model.diffusion_model.time_embed`); diffusers'
random one would replace the UNet's time embedding at step 0. So a fresh adapter leaves the UNet's output unchanged.
"""

import logging
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from cldm.cldm import HINT_BLOCK_CHANNELS, ControlLDM
from cldm.cli import refuse_existing
from cldm.control import BlockControl, ControlMode, HintCache, record, recorded_settings, repeat_to
from cldm.diffusers_convert import DiffusersFolder, read_folder
from cldm.diffusers_names import RESNET_LAYERS, rename_module
from cldm.model import CONTROL_PREFIX, LoadReport, create_model, load_state_dict, save_state_dict
from cldm.training import weights_to_use
from ldm.checkpoint import read_metadata
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import MIDDLE, BlockHook, BlockSite, Downsample, ResBlock
from ldm.modules.diffusionmodules.util import timestep_embedding, zero_module

log = logging.getLogger(__name__)

CROSS_ATTN, PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
# keys only a ControlNet-XS adapter holds, in diffusers' names (our checkpoints hold them under control_model.)
MARKERS = ("control_to_base_for_conv_in.weight", "mid_block.ctrl_to_base.weight")
DOWN_EPS, MIDDLE_EPS = 1e-5, 1e-6  # diffusers' control resnets: eps=1e-5 given, UNetMidBlock2DCrossAttn's default
TIME_MIX_POWER = 0.3  # diffusers and vislearn mix the learnt time embedding in at time_embedding_mix ** 0.3
# The config fields the tensors do not show (a file without them gets XSConfig's defaults, diffusers' own).
UNSHAPED = ("num_attention_heads", "time_embedding_mix", "conditioning_channel_order", "max_norm_num_groups",
            "upcast_attention", "sample_size")
# What our files record of UNSHAPED in their safetensors header (under RECORDED_KEY, as JSON): what changes the output.
RECORDED, RECORDED_KEY = UNSHAPED[:4], "controlnet_xs"


def largest_factor(number: int, max_factor: int) -> int:
    """The largest divisor of `number` up to `max_factor` (diffusers' find_largest_factor: group counts)."""
    return next(f for f in range(min(number, max_factor), 0, -1) if number % f == 0)


def per_level(value: int | Sequence[int], levels: int, name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * levels
    if len(values) != levels:
        raise ValueError(f"{name} needs one entry per level ({levels}), got {list(values)}")
    return values


@dataclass(frozen=True)
class XSConfig:
    """The arguments of diffusers' ControlNetXSAdapter (its config.json without the bookkeeping fields), plus
    `layers_per_block`, which diffusers fixes at 2."""

    conditioning_channels: int = 3
    conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS
    time_embedding_mix: float = 1.0
    learn_time_embedding: bool = False
    num_attention_heads: int | tuple[int, ...] = 4
    block_out_channels: tuple[int, ...] = (4, 8, 16, 16)
    base_block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attention_dim: int = 1024
    down_block_types: tuple[str, ...] = (CROSS_ATTN, CROSS_ATTN, CROSS_ATTN, PLAIN)
    sample_size: int | None = 96
    transformer_layers_per_block: int | tuple[int, ...] = 1
    upcast_attention: bool = True
    max_norm_num_groups: int = 32
    use_linear_projection: bool = True
    layers_per_block: int = 2

    def __post_init__(self):
        def tupled(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        for name in ("conditioning_embedding_out_channels", "num_attention_heads", "block_out_channels",
                     "base_block_out_channels", "down_block_types", "transformer_layers_per_block"):
            tupled(name)
        levels = len(self.block_out_channels)
        if self.conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("conditioning_channel_order must be 'rgb' or 'bgr', got "
                             f"{self.conditioning_channel_order!r}")
        if len(self.base_block_out_channels) != levels or len(self.down_block_types) != levels:
            raise ValueError(f"block_out_channels {list(self.block_out_channels)}, base_block_out_channels "
                             f"{list(self.base_block_out_channels)} and down_block_types {list(self.down_block_types)} "
                             "need one entry per level each")
        if not set(self.down_block_types) <= {CROSS_ATTN, PLAIN}:
            raise ValueError(f"down_block_types must be {CROSS_ATTN} or {PLAIN}, got {list(self.down_block_types)}")
        if not 0.0 <= self.time_embedding_mix <= 1.0:
            raise ValueError(f"time_embedding_mix must lie in [0, 1], got {self.time_embedding_mix}")
        if self.time_embedding_mix < 1.0 and not self.learn_time_embedding:
            raise ValueError("time_embedding_mix below 1 needs learn_time_embedding (diffusers refuses it too)")
        if self.layers_per_block < 1 or min(self.block_out_channels) < 1:
            raise ValueError(f"ControlNet-XS config out of range: {self}")
        for width, heads in zip(self.block_out_channels, self.heads()):
            if heads < 1 or width // heads < 1:
                raise ValueError(f"{heads} attention heads do not fit a control block {width} channels wide")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def heads(self) -> tuple[int, ...]:
        return per_level(self.num_attention_heads, self.levels, "num_attention_heads")

    def depths(self) -> tuple[int, ...]:
        return per_level(self.transformer_layers_per_block, self.levels, "transformer_layers_per_block")

    def attention(self, level: int) -> bool:
        return self.down_block_types[level] == CROSS_ATTN

    def base_structure(self) -> dict[str, Any]:
        """What must equal the UNet's: widths, attention levels and depths, text width, blocks per level."""
        depths = [d if self.attention(i) else None for i, d in enumerate(self.depths())]
        return dict(base_block_out_channels=list(self.base_block_out_channels), down_block_types=list(
            self.down_block_types), transformer_layers_per_block=depths, middle_depth=self.depths()[-1],
            cross_attention_dim=self.cross_attention_dim, use_linear_projection=self.use_linear_projection,
            layers_per_block=self.layers_per_block)

    def diffusers_config(self) -> dict[str, Any]:
        """config.json of diffusers' ControlNetXSAdapter for these arguments (lists for tuples)."""
        if self.layers_per_block != 2:
            raise ValueError(f"diffusers' ControlNetXSAdapter has 2 blocks per level; this adapter has "
                             f"{self.layers_per_block} (it loads here, not in diffusers)")
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                  if k != "layers_per_block"}
        return {"_class_name": "ControlNetXSAdapter", **config}


@dataclass(frozen=True)
class UNetStructure:
    """What an adapter must fit, read off a UNet built by UNetSpec."""

    base_block_out_channels: list[int]
    down_block_types: list[str]
    transformer_layers_per_block: list[int | None]  # per level, None without attention
    middle_depth: int
    cross_attention_dim: int
    use_linear_projection: bool
    layers_per_block: int
    heads: list[int]  # of each level's transformers, the middle block's where a level has none
    model_channels: int
    image_size: int | None


def unet_structure(unet: nn.Module) -> UNetStructure:
    """The levels of a UNet (input_blocks: conv_in, then per level its ResBlocks with or without a transformer and a
    Downsample between levels; the middle block)."""
    levels: list[list[nn.Module]] = [[]]
    for block in list(unet.input_blocks)[1:]:
        if isinstance(block[0], Downsample):
            levels.append([])
        elif isinstance(block[0], ResBlock) and not block[0].updown:
            levels[-1].append(block)
        else:
            raise ValueError(f"ControlNet-XS needs a UNet of ResBlocks and Downsample convs; found {type(block[0])}")
    counts = {len(level) for level in levels}
    if len(counts) != 1:
        raise ValueError(f"ControlNet-XS needs the same number of blocks per level, the UNet has "
                         f"{[len(level) for level in levels]}")
    middle = next(m for m in unet.middle_block if isinstance(m, SpatialTransformer))
    transformers = [[b[1] for b in level if len(b) > 1] for level in levels]
    if any(0 < len(t) < len(level) for t, level in zip(transformers, levels)):
        raise ValueError("ControlNet-XS needs attention in every block of a level or in none")

    def heads(st: SpatialTransformer) -> int:
        return st.transformer_blocks[0].attn1.heads

    return UNetStructure(
        base_block_out_channels=[level[0][0].out_channels for level in levels],
        down_block_types=[CROSS_ATTN if t else PLAIN for t in transformers],
        transformer_layers_per_block=[len(t[0].transformer_blocks) if t else None for t in transformers],
        middle_depth=len(middle.transformer_blocks),
        cross_attention_dim=middle.transformer_blocks[0].attn2.to_k.in_features,
        use_linear_projection=middle.use_linear,
        layers_per_block=counts.pop(),
        heads=[heads(t[0]) if t else heads(middle) for t in transformers],
        model_channels=unet.model_channels,
        image_size=getattr(unet, "image_size", None))


class ConditioningEmbedding(nn.Module):
    """diffusers' ControlNetConditioningEmbedding: the hint to the first control width at latent size; 3x3 convs with
    SiLU between, a stride-2 conv at each width step, a zero-initialised conv out."""

    def __init__(self, out_channels: int, widths: Sequence[int] = HINT_BLOCK_CHANNELS, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, wider in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, wider, 3, padding=1, stride=2))
        self.conv_out = zero_module(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return zero_module(nn.Conv2d(in_channels, out_channels, 1))


def diffusers_init(module: nn.Module) -> nn.Module:
    """PyTorch's default initialisation for the layers our ResBlock and SpatialTransformer zero (the last conv,
    proj_out): diffusers' ResnetBlock2D and Transformer2DModel leave them random."""
    for m in module.modules():
        if isinstance(m, ResBlock):
            m.out_layers[-1].reset_parameters()
        elif isinstance(m, SpatialTransformer):
            m.proj_out.reset_parameters()
    return module


class DownBlock(nn.Module):
    """diffusers' DownBlockControlNetXSAdapter: the control blocks of one level and its connections."""

    def __init__(self, config: XSConfig, level: int, emb_channels: int):
        super().__init__()
        base_in = config.base_block_out_channels[max(level - 1, 0)]
        base_out = config.base_block_out_channels[level]
        ctrl_in = config.block_out_channels[max(level - 1, 0)]
        ctrl_out = config.block_out_channels[level]
        groups = config.max_norm_num_groups
        heads = config.heads()[level]
        self.resnets, self.base_to_ctrl, self.ctrl_to_base = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        attentions = nn.ModuleList()
        for j in range(config.layers_per_block):
            b_in, c_in = (base_in, ctrl_in) if j == 0 else (base_out, ctrl_out)
            self.base_to_ctrl.append(zero_conv(b_in, b_in))
            self.resnets.append(ResBlock(c_in + b_in, emb_channels, 0.0, out_channels=ctrl_out,
                                         groups=largest_factor(c_in + b_in, groups),
                                         groups_out=largest_factor(ctrl_out, groups), eps=DOWN_EPS))
            if config.attention(level):
                attentions.append(SpatialTransformer(
                    ctrl_out, heads, ctrl_out // heads, depth=config.depths()[level],
                    context_dim=config.cross_attention_dim, use_linear=config.use_linear_projection,
                    use_checkpoint=False, norm_groups=largest_factor(ctrl_out, groups)))
            self.ctrl_to_base.append(zero_conv(ctrl_out, base_out))
        if attentions:
            self.attentions = attentions
        if level < config.levels - 1:
            self.base_to_ctrl.append(zero_conv(base_out, base_out))
            self.downsamplers = Downsample(ctrl_out + base_out, True, out_channels=ctrl_out)
            self.ctrl_to_base.append(zero_conv(ctrl_out, base_out))

    def forward(self, step: int, ctrl: torch.Tensor, base: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `step` of the level (the last one past the resnets is the downsampler) beside the UNet's block whose
        input is `base`: the new control state and what goes to the UNet's output (unweighted)."""
        ctrl = torch.cat([ctrl, self.base_to_ctrl[step](base)], dim=1)
        if step < len(self.resnets):
            ctrl = self.resnets[step](ctrl, emb)
            if hasattr(self, "attentions"):
                ctrl = self.attentions[step](ctrl, context)
        else:
            ctrl = self.downsamplers(ctrl)
        return ctrl, self.ctrl_to_base[step](ctrl)


class MiddleBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn as the control's middle block: ResBlock, transformer, ResBlock."""

    def __init__(self, in_channels: int, channels: int, emb_channels: int, groups: int, heads: int, depth: int,
                 context_dim: int, use_linear: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResBlock(in_channels, emb_channels, 0.0, out_channels=channels, groups=groups, eps=MIDDLE_EPS),
            ResBlock(channels, emb_channels, 0.0, groups=groups, eps=MIDDLE_EPS)])
        self.attentions = nn.ModuleList([SpatialTransformer(
            channels, heads, channels // heads, depth=depth, context_dim=context_dim, use_linear=use_linear,
            use_checkpoint=False, norm_groups=groups)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, emb), context), emb)


class MidBlockConnections(nn.Module):
    """diffusers' MidBlockControlNetXSAdapter: the control's middle block and its two connections."""

    def __init__(self, config: XSConfig, emb_channels: int):
        super().__init__()
        base, ctrl = config.base_block_out_channels[-1], config.block_out_channels[-1]
        self.base_to_ctrl = zero_conv(base, base)
        self.midblock = MiddleBlock(ctrl + base, ctrl, emb_channels,
                                    largest_factor(math.gcd(ctrl, ctrl + base), config.max_norm_num_groups),
                                    config.heads()[-1], config.depths()[-1], config.cross_attention_dim,
                                    config.use_linear_projection)
        self.ctrl_to_base = zero_conv(ctrl, base)

    def forward(self, ctrl: torch.Tensor, base: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctrl = self.midblock(torch.cat([ctrl, self.base_to_ctrl(base)], dim=1), emb, context)
        return ctrl, self.ctrl_to_base(ctrl)


class UpConnections(nn.Module):
    """diffusers' UpBlockControlNetXSAdapter: one conv per block of an up level, from a control state to the UNet's
    hidden state entering that block."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]):
        super().__init__()
        self.ctrl_to_base = nn.ModuleList(zero_conv(i, o) for i, o in zip(in_channels, out_channels))


class Step(NamedTuple):
    """The control block beside one UNet input block: block `index` of a level's DownBlock."""

    block: DownBlock
    index: int


class ControlNetXS(BlockControl):
    """ControlNet-XS as a control network (see the module's docstring); its parameters are diffusers'
    ControlNetXSAdapter's, by name and shape, but for our ResBlock's and Downsample's inner names
    (`diffusers_names` maps them). The hint is BCHW in [0, 1], 8x the latent size."""

    def __init__(self, **config: Any):
        super().__init__()
        self.config = config = XSConfig(**config)
        base, ctrl = config.base_block_out_channels, config.block_out_channels
        emb_channels = base[0] * 4
        self.controlnet_cond_embedding = ConditioningEmbedding(ctrl[0], config.conditioning_embedding_out_channels,
                                                               config.conditioning_channels)
        # the UNet's time_embed by name and structure (tool_add_control.py copies it; diffusers' time_embedding)
        self.time_embed = nn.Sequential(nn.Linear(base[0], emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels)) if config.learn_time_embedding else None
        self.down_blocks = nn.ModuleList(DownBlock(config, i, emb_channels) for i in range(config.levels))
        # the control states the up levels read: conv_in's, then every block's of every level, deepest first
        states = [ctrl[0]] + [c for i, c in enumerate(ctrl) for _ in range(config.layers_per_block
                                                                           + (i < config.levels - 1))]
        per_up = config.layers_per_block + 1
        up, width = [], base[-1]
        for b in reversed(base):
            up.append(UpConnections([states.pop() for _ in range(per_up)], [width] + [b] * (per_up - 1)))
            width = b
        self.up_connections = nn.ModuleList(up)
        self.conv_in = nn.Conv2d(4, ctrl[0], 3, padding=1)
        self.control_to_base_for_conv_in = zero_conv(ctrl[0], base[0])
        self.mid_block = MidBlockConnections(config, emb_channels)
        diffusers_init(self)
        self._hint_cache = HintCache()
        self._fitted: weakref.ref | None = None

    @classmethod
    def from_unet(cls, unet: nn.Module, size_ratio: float | None = None,
                  block_out_channels: Sequence[int] | None = None,
                  num_attention_heads: int | Sequence[int] | None = None, learn_time_embedding: bool = False,
                  time_embedding_mix: float = 1.0, conditioning_channels: int = 3,
                  conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: Sequence[int] = HINT_BLOCK_CHANNELS) -> "ControlNetXS":
        """diffusers' ControlNetXSAdapter.from_unet: widths `size_ratio` times the UNet's (or `block_out_channels`),
        heads the UNet's unless given, the rest read off the UNet."""
        if (size_ratio is None) == (block_out_channels is None):
            raise ValueError("give exactly one of size_ratio and block_out_channels")
        s = unet_structure(unet)
        widths = block_out_channels or [int(b * size_ratio) for b in s.base_block_out_channels]
        depths = [d or 1 for d in s.transformer_layers_per_block[:-1]] + [s.middle_depth]
        return cls(conditioning_channels=conditioning_channels, conditioning_channel_order=conditioning_channel_order,
                   conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                   time_embedding_mix=time_embedding_mix, learn_time_embedding=learn_time_embedding,
                   num_attention_heads=num_attention_heads if num_attention_heads is not None else tuple(s.heads),
                   block_out_channels=tuple(widths), base_block_out_channels=tuple(s.base_block_out_channels),
                   cross_attention_dim=s.cross_attention_dim, down_block_types=tuple(s.down_block_types),
                   sample_size=s.image_size, transformer_layers_per_block=tuple(depths), upcast_attention=False,
                   max_norm_num_groups=32, use_linear_projection=s.use_linear_projection,
                   layers_per_block=s.layers_per_block)

    def num_levels(self) -> int:
        return 1

    def check_fits(self, unet: nn.Module) -> None:
        """Raise ValueError, saying what differs, unless the adapter was made for a UNet of this structure."""
        if self._fitted is not None and self._fitted() is unet:
            return
        s = asdict(unet_structure(unet))
        mine = self.config.base_structure()
        wrong = [f"{k}: adapter {v}, UNet {s[k]}" for k, v in mine.items() if s[k] != v]
        if s["model_channels"] != self.config.base_block_out_channels[0]:
            wrong.append(f"time embedding input: adapter {self.config.base_block_out_channels[0]}, UNet "
                         f"{s['model_channels']}")
        if wrong:
            raise ValueError("this ControlNet-XS adapter was made for another UNet: " + "; ".join(wrong))
        self._fitted = weakref.ref(unet)

    def steps(self) -> list[Step | None]:
        """The control block beside each UNet input block: None for conv_in, then each level's blocks in order. The
        steps run inside the modules' forward (FSDP gathers a sharded module's weights there)."""
        return [None] + [Step(block, j) for block in self.down_blocks
                         for j in range(len(block.resnets) + hasattr(block, "downsamplers"))]

    def up_convs(self) -> list[nn.Module]:
        """The connection into each UNet output block."""
        return [conv for up in self.up_connections for conv in up.ctrl_to_base]

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint embedding (the control's addition to its conv_in), computed once per hint while sampling."""
        embed = self.controlnet_cond_embedding

        def encode(h: torch.Tensor) -> torch.Tensor:
            if self.config.conditioning_channel_order == "bgr":
                h = torch.flip(h, dims=[1])
            return embed(h.to(embed.conv_in.weight.dtype))
        return self._hint_cache(hint, embed, encode)

    def hook(self, unet: nn.Module, hint: torch.Tensor, scales: list[float], x: torch.Tensor,
             timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> "ExchangeHook":
        self.check_fits(unet)
        steps, ups = self.steps(), self.up_convs()
        if len(steps) != len(unet.input_blocks) or len(ups) != len(unet.output_blocks):
            raise ValueError(f"this adapter has {len(steps)} encoder and {len(ups)} decoder connections, the UNet "
                             f"{len(unet.input_blocks)} input and {len(unet.output_blocks)} output blocks")
        return ExchangeHook(self, repeat_to(self.encode_hint(hint), x.shape[0]), scales[-1], timesteps, context,
                            steps, ups)


class ExchangeHook(BlockHook):
    """One UNet forward with a ControlNet-XS adapter beside it: the control state travels through the hook from
    block to block (see the module's docstring)."""

    def __init__(self, net: ControlNetXS, hint_embedding: torch.Tensor, scale: float, timesteps: torch.Tensor,
                 context: torch.Tensor, steps: list[Step | None], ups: list[nn.Module]):
        self.net, self.hint_embedding, self.scale = net, hint_embedding, scale
        self.timesteps, self.steps, self.ups = timesteps, steps, ups
        self.dtype = net.conv_in.weight.dtype
        self.context = context.to(self.dtype)
        self.emb: torch.Tensor | None = None
        self.ctrl: torch.Tensor | None = None
        self.states: list[torch.Tensor] = []

    def time_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        net = self.net
        if net.time_embed is None:
            return emb
        features = timestep_embedding(self.timesteps, net.config.base_block_out_channels[0]).to(self.dtype)
        own = net.time_embed(features).to(emb.dtype)
        mix = net.config.time_embedding_mix ** TIME_MIX_POWER
        return own * mix + emb * (1 - mix)

    def embedding(self, emb: torch.Tensor) -> None:
        self.emb = emb.to(self.dtype)

    def block_output(self, site: BlockSite, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if site.part == "output":
            return h
        net, base = self.net, x.to(self.dtype)
        if site == MIDDLE:
            ctrl, to_base = net.mid_block(self.ctrl, base, self.emb, self.context)
        elif (step := self.steps[site.index]) is None:  # conv_in: the latents, plus the hint's embedding
            ctrl = net.conv_in(base) + self.hint_embedding
            to_base = net.control_to_base_for_conv_in(ctrl)
        else:
            ctrl, to_base = step.block(step.index, self.ctrl, base, self.emb, self.context)
        self.ctrl = ctrl
        if site.part == "input":
            self.states.append(ctrl)
        return h + (to_base * self.scale).to(h.dtype)

    def block_input(self, site: BlockSite, h: torch.Tensor) -> torch.Tensor:
        if site.part != "output":
            return h
        state = self.states[-1 - site.index]
        return h + (self.ups[site.index](state) * self.scale).to(h.dtype)


# ---- files ---------------------------------------------------------------------------------------------------

def diffusers_names(net: ControlNetXS) -> dict[str, str]:
    """Our module path -> diffusers' ControlNetXSAdapter module path, where they differ: the ResBlocks' layers, the
    downsamplers' conv, the time embedding's linears."""
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    for path, module in net.named_modules():
        if isinstance(module, ResBlock):
            names |= {f"{path}.{ours}": f"{path}.{theirs}" for ours, theirs in RESNET_LAYERS.items()}
        elif isinstance(module, Downsample):
            names[f"{path}.op"] = f"{path}.conv"
    return names


def to_diffusers(net: ControlNetXS) -> dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers' names: diffusion_pytorch_model.safetensors of save_pretrained."""
    table = diffusers_names(net)
    return {rename_module(k, table): v for k, v in net.state_dict().items()}


def is_xs_file(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(k in state_dict or CONTROL_PREFIX + k in state_dict for k in MARKERS)


def diffusers_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter's tensors under diffusers' names, from a diffusers file or a `control_model.*` state dict of
    ControlNetXSLDM (our checkpoints; the rest of such a checkpoint is left out)."""
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if not prefixed:
        return dict(state_dict)
    with torch.device("meta"):
        net = ControlNetXS(**asdict(infer_config(prefixed, ours=True)))
    table = diffusers_names(net)
    return {rename_module(k, table): v for k, v in prefixed.items()}


def infer_config(state_dict: Mapping[str, torch.Tensor], defaults: Mapping[str, Any] | None = None,
                 ours: bool = False) -> XSConfig:
    """The config of adapter weights (diffusers' names, or ours with `ours`), read from the shapes; what shapes do
    not show (UNSHAPED) from `defaults`, else diffusers' defaults."""
    sd = state_dict
    conv1 = "in_layers.2" if ours else "conv1"
    levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"ControlNet-XS levels down_blocks.0 ... down_blocks.N expected, found {levels}")
    layers = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in levels]

    def depth(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    middle = "mid_block.midblock.attentions.0"
    depths = [depth(f"down_blocks.{i}.attentions.0.transformer_blocks.") if attention[i] else 1 for i in levels]
    depths[-1] = depth(f"{middle}.transformer_blocks.")
    cond = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]] + [
        sd[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]
        for j in range(1, depth("controlnet_cond_embedding.blocks.") * 2, 2)
        if f"controlnet_cond_embedding.blocks.{j}.weight" in sd]
    known = dict(
        conditioning_channels=sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
        conditioning_embedding_out_channels=tuple(cond),
        learn_time_embedding=any(k.startswith("time_embed." if ours else "time_embedding.") for k in sd),
        block_out_channels=tuple(sd[f"down_blocks.{i}.resnets.0.{conv1}.weight"].shape[0] for i in levels),
        base_block_out_channels=tuple(sd[f"down_blocks.{i}.ctrl_to_base.0.weight"].shape[0] for i in levels),
        cross_attention_dim=sd[f"{middle}.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        down_block_types=tuple(CROSS_ATTN if a else PLAIN for a in attention),
        transformer_layers_per_block=tuple(depths),
        use_linear_projection=sd[f"{middle}.proj_in.weight"].dim() == 2,
        layers_per_block=layers)
    rest = {k: defaults[k] for k in UNSHAPED if k in (defaults or {})}
    if not known["learn_time_embedding"]:  # a mix needs a learnt time embedding: XSConfig's (diffusers') 1
        rest.pop("time_embedding_mix", None)
    return XSConfig(**known, **rest)


def load_controlnet_xs(source: Mapping[str, torch.Tensor] | str | os.PathLike,
                       defaults: Mapping[str, Any] | None = None) -> ControlNetXS:
    """A ControlNet-XS adapter from a diffusers folder (config.json + weights), a weights file or a state dict
    (diffusers' names, or `control_model.*` of our checkpoints); the structure from the tensors, the rest from
    config.json, else `defaults`, else diffusers' defaults (see infer_config)."""
    if isinstance(source, Mapping):
        sd = source
    elif Path(source).is_dir():
        sd, folder_config = read_folder(source, "ControlNetXSAdapter")
        defaults = {**(defaults or {}), **{k: v for k, v in folder_config.items() if k in UNSHAPED}}
    else:
        sd = load_state_dict(source)
    if not is_xs_file(sd):
        raise ValueError(f"no ControlNet-XS weights ({' and '.join(MARKERS)}) in {len(sd)} keys, e.g. {sorted(sd)[:3]}")
    weights = diffusers_weights(sd)
    config = infer_config(weights, defaults)
    with torch.device("meta"):  # no initialisation to overwrite
        net = ControlNetXS(**asdict(config))
    table = {theirs: ours for ours, theirs in diffusers_names(net).items()}
    dtype = torch.get_default_dtype()
    # strict: tensors of any other layout raise, naming them
    net.load_state_dict({rename_module(k, table): v.to(dtype) for k, v in weights.items()}, assign=True)
    return net


def save_folder(net: ControlNetXS, folder: str | os.PathLike, force: bool = False) -> Path:
    """ControlNetXSAdapter.save_pretrained's layout: FOLDER/config.json and the weights beside it."""
    config = net.config.diffusers_config()  # refuses an adapter diffusers cannot build
    return DiffusersFolder(folder, force).write(to_diffusers(net), config)


def xs_record(config: XSConfig) -> dict[str, str]:
    """What a weights file of this adapter records besides its tensors (the safetensors header's metadata)."""
    return record(RECORDED_KEY, {k: getattr(config, k) for k in RECORDED})


def settings(recorded: Mapping[str, str] | None) -> dict[str, Any]:
    """The settings a file recorded (xs_record), {} when it recorded none."""
    return recorded_settings(recorded, RECORDED_KEY, RECORDED)


def file_settings(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                  recorded: Mapping[str, str] | None) -> dict[str, Any]:
    """What the tensors do not show: what the file recorded, else the model's own adapter's where its widths are
    the file's, else (left out) diffusers' defaults."""
    return matching(own_defaults(model), state_dict) | settings(recorded)


def own_defaults(model: nn.Module) -> dict[str, Any]:
    """What a bare weights file does not say, from the model's own adapter when it is one."""
    net = getattr(model, "control_model", None)
    return asdict(net.config) if isinstance(net, ControlNetXS) else {}


def matching(defaults: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`defaults` where the file's control widths are theirs (another adapter's heads may not fit), else none."""
    if not defaults:
        return {}
    widths = infer_config(diffusers_weights(state_dict)).block_out_channels
    return dict(defaults) if tuple(defaults["block_out_channels"]) == widths else {}


class ControlNetXSMode(ControlMode):
    """ControlNet-XS files: diffusers' ControlNetXSAdapter weights (a save_pretrained folder's
    diffusion_pytorch_model.safetensors, or the file alone) and our checkpoints' `control_model.*`. The tensors do
    not show the attention heads or time_embedding_mix: our exports record them in the safetensors header; for a
    file without them they come from the model's own adapter when its widths are the file's, else diffusers'
    defaults (4 heads, mix 1)."""

    name = "controlnet-xs"
    files = ("a ControlNet-XS adapter (diffusers' ControlNetXSAdapter names: control_to_base_for_conv_in.*, "
             "down_blocks.N.base_to_ctrl.*, mid_block.ctrl_to_base.*, up_connections.*)")

    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        if not is_xs_file(state_dict):
            return None
        return "diffusers" if all(k in state_dict for k in MARKERS) else "checkpoint"

    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> ControlNetXS:
        net = load_controlnet_xs(state_dict, file_settings(model, state_dict, recorded))
        net.check_fits(model.model.diffusion_model)
        return net

    def export(self, model: "ControlNetXSLDM") -> dict[str, torch.Tensor]:
        """The adapter under diffusers' names: the diffusion_pytorch_model.safetensors of
        ControlNetXSAdapter.save_pretrained (tool_convert_diffusers.py to-diffusers adds the config.json)."""
        return to_diffusers(model.control_model)

    def recorded(self, model: "ControlNetXSLDM") -> dict[str, str]:
        """The heads, the time-embedding mix, the hint's channel order and the norms' group limit."""
        return xs_record(model.control_model.config)

    def load(self, model: "ControlNetXSLDM", state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        """Replace the model's adapter by the file's (heads and mix as the file recorded them, else the model's
        own). Do this before training starts (the optimizer holds the old network)."""
        net = load_controlnet_xs(state_dict, file_settings(model, state_dict, recorded))
        net.check_fits(model.model.diffusion_model)
        model.replace_control_model(net)
        return LoadReport()

    def to_diffusers(self, source: str | os.PathLike, out_dir: str | os.PathLike, config: str | os.PathLike,
                     force: bool = False) -> Path:
        return convert_to_diffusers(source, out_dir, config, force)

    def from_diffusers(self, source: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike,
                       force: bool = False) -> Path:
        return convert_from_diffusers(source, out, config, force)


CONTROLNET_XS = ControlNetXSMode()


def config_adapter(config_path: str | os.PathLike) -> XSConfig:
    """The adapter a ControlNetXSLDM YAML builds (on the meta device: only its structure)."""
    return create_model(config_path, device="meta").control_model.config


def convert_to_diffusers(in_path: str | os.PathLike, out_dir: str | os.PathLike, config_path: str | os.PathLike,
                         force: bool = False) -> Path:
    """Our export or checkpoint of a ControlNet-XS adapter -> a diffusers ControlNetXSAdapter folder, with the heads
    and mix the file recorded, else the config's."""
    folder = DiffusersFolder(out_dir, force)  # refused before the work
    expected = config_adapter(config_path)
    net = load_controlnet_xs(weights_to_use(in_path), asdict(expected) | settings(read_metadata(in_path)))
    check_structure(net, expected, in_path)
    return folder.write(to_diffusers(net), net.config.diffusers_config())


def convert_from_diffusers(in_path: str | os.PathLike, out_path: str | os.PathLike, config_path: str | os.PathLike,
                           force: bool = False) -> Path:
    """A diffusers ControlNetXSAdapter folder -> its weights as one file (the layout the apps, tool_eval_control.py and
    --resume_path take), checked against the config's structure; the folder's heads and mix must be the config's,
    since the file alone does not record them."""
    refuse_existing(out_path, force)
    expected = config_adapter(config_path)
    if not Path(in_path).is_dir():
        raise ValueError(f"{in_path} is not a folder: a diffusers ControlNet-XS adapter's weights file is already the "
                         "layout this project loads")
    net = load_controlnet_xs(in_path)
    check_structure(net, expected, in_path)
    differ = [f"{k} {getattr(net.config, k)} (config {getattr(expected, k)})" for k in RECORDED
              if getattr(net.config, k) != getattr(expected, k)]
    if differ:
        raise ValueError(f"{in_path}/config.json has {', '.join(differ)}: another adapter than the --config's; give "
                         "the config that has them")
    return save_state_dict(to_diffusers(net), out_path, force=force, metadata=xs_record(net.config))


def check_structure(net: ControlNetXS, expected: XSConfig, source: str | os.PathLike) -> None:
    """Refuse an adapter whose tensors differ in structure from the config's."""
    if replace(net.config, **{k: getattr(expected, k) for k in UNSHAPED}) != expected:
        raise ValueError(f"{source} is a ControlNet-XS adapter of another structure than the --config builds: "
                         f"{net.config}, expected {expected} (right --config?)")


class ControlNetXSLDM(ControlLDM):
    """ControlLDM steered by a ControlNet-XS adapter beside its locked UNet; the hint is cond["c_concat"] in [0, 1].

    `control_stage_config` holds ControlNetXS.from_unet's arguments (diffusers' ControlNetXSAdapter.from_unet):
    size_ratio or block_out_channels, num_attention_heads, learn_time_embedding, time_embedding_mix, conditioning_*.
    Only the adapter trains; one control scale (diffusers' conditioning_scale).
    """

    control_mode = CONTROLNET_XS
    locked_unet = "ControlNet-XS mode trains only the adapter"

    @property
    def fresh_prefixes(self) -> tuple[str, ...]:
        """The adapter starts fresh, so a plain SD checkpoint is a complete initial checkpoint; but a learnt time
        embedding starts as the UNet's (tool_add_control.py copies it): a fresh one would replace the UNet's
        time embedding by a random one at step 0."""
        if self.control_model.time_embed is None:
            return (CONTROL_PREFIX,)
        return tuple(f"{CONTROL_PREFIX}{name}." for name, _ in self.control_model.named_children()
                     if name != "time_embed")

    def make_control_model(self, control_stage_config: Any) -> ControlNetXS:
        params = OmegaConf.to_container(control_stage_config) if isinstance(control_stage_config, DictConfig) \
            else dict(control_stage_config)
        return ControlNetXS.from_unet(self.model.diffusion_model, **params)

    def num_control_scales(self) -> int:
        return 1

"""T2I-Adapter (Mou et al. 2023, TencentARC): a small convolutional encoder of the hint whose features are added
to the locked UNet encoder's hidden states, one per resolution level; no copy of the UNet.

Three networks, with the module names and shapes of diffusers' `T2IAdapter`, so that `state_dict()` is the
diffusers layout (`adapter.conv_in.weight`, `adapter.body.0.resnets.0.block1.weight`, ...):
  full_adapter     SD1.x/2.x, TencentARC's *_sd15v2 files: the hint pixel-unshuffled by 8, `conv_in`, then one
                   level per entry of `channels` (average pooling by 2 before every level but the first, a 1x1
                   `in_conv` where the width changes, `num_res_blocks` residual blocks of a 3x3 and a 1x1 conv);
  full_adapter_xl  SDXL (the t2i-adapter-*-sdxl-1.0 files): unshuffled by 16, the same levels, pooling only before
                   the third, so its features sit at 1/16, 1/16, 1/32, 1/32 of the hint;
  light_adapter    TencentARC's color adapter: no `conv_in`; each level narrows to a quarter of its width with a 1x1
                   `in_conv`, runs residual blocks of two 3x3 convs and widens again with a 1x1 `out_conv`; one
                   level more than `channels` has entries (the last repeats the last width, pooled once more).
Initialisation is PyTorch's default for every conv, as in TencentARC's and diffusers' code: nothing is zeroed,
so an untrained adapter already changes the UNet's output.

Where the features go is diffusers' `UNet2DConditionModel` with `down_intrablock_additional_residuals` (which
TencentARC's own UNets do as well): feature i goes to resolution level i of the encoder, onto the output of the
level's last block before its downsampling when the level has attention, and after the downsampling when it has
none (diffusers adds it after the whole `DownBlock2D`); a feature left over after the last level goes onto the
middle block's output (SDXL's fourth). On SD1.5 that is after input_blocks 2, 5, 8 and 11; on SDXL after 3 (the
first downsampling), 5, 8 and the middle block. The added feature reaches the skip connection and the next block
alike.

Files: the diffusers layout (a `save_pretrained` folder with config.json, or its safetensors alone) and
TencentARC's original layout (`conv_in.*`, `body.N.block1.*`, `body.N.in_conv.*` numbered across levels; the
light adapter's `body.i.in_conv`, `body.i.body.j.*`, `body.i.out_conv`), with or without an `adapter.` prefix.
"""

import logging
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from cldm.cldm import ControlLDM
from cldm.control import BlockControl, ControlMode, FeatureAddition, HintCache, repeat_to
from cldm.diffusers_convert import DiffusersFolder, read_folder
from cldm.model import CONTROL_PREFIX, LoadReport, load_state_dict, save_state_dict
from cldm.training import weights_to_use
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import MIDDLE, BlockSite, Downsample, ResBlock

log = logging.getLogger(__name__)

FULL, FULL_XL, LIGHT = "full_adapter", "full_adapter_xl", "light_adapter"
ADAPTER_TYPES = (FULL, FULL_XL, LIGHT)
PREFIX = "adapter."
# Hint images are gray (canny, sketch) or colour; a file's conv_in width is in_channels * downscale_factor ** 2.
HINT_CHANNELS = (1, 3)
# The A1111 extension's weights of an adapter's four features in its soft modes, shallowest first
ADAPTER_SOFT_WEIGHTS = (0.25, 0.62, 0.825, 1.0)
# The unshuffle factor of each kind (TencentARC's and diffusers' defaults); a file alone does not record it.
DOWNSCALE = {FULL: 8, FULL_XL: 16, LIGHT: 8}


@dataclass(frozen=True)
class AdapterConfig:
    """The arguments of diffusers' T2IAdapter (its config.json without the bookkeeping fields)."""

    adapter_type: str = FULL
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}")
        if self.adapter_type == FULL_XL and len(self.channels) < 3:
            raise ValueError(f"a {FULL_XL} needs at least 3 channel entries (it pools before the third), "
                             f"got {list(self.channels)}")
        if not self.channels or self.num_res_blocks < 1 or self.in_channels < 1 or self.downscale_factor < 1:
            raise ValueError(f"T2I-Adapter config out of range: {self}")

    def levels(self) -> list[tuple[int, int, bool]]:
        """(input width, output width, pooled first) of every level of the body."""
        ch = self.channels
        if self.adapter_type == LIGHT:
            return [(ch[0], ch[0], False)] + [(ch[i], ch[i + 1], True) for i in range(len(ch) - 1)] + [
                (ch[-1], ch[-1], True)]
        if self.adapter_type == FULL_XL:
            return [(ch[max(i - 1, 0)], c, i == 2) for i, c in enumerate(ch)]
        return [(ch[max(i - 1, 0)], c, i > 0) for i, c in enumerate(ch)]

    def feature_downscales(self) -> list[int]:
        """How much smaller than the hint each feature is."""
        scale, out = self.downscale_factor, []
        for _, _, pooled in self.levels():
            scale *= 2 if pooled else 1
            out.append(scale)
        return out

    def diffusers_config(self) -> dict[str, Any]:
        return {"_class_name": "T2IAdapter", **asdict(self), "channels": list(self.channels)}


class AdapterResnetBlock(nn.Module):
    """x + block2(relu(block1(x))): block1 a 3x3 conv, block2 a 1x1 (full adapters) or a 3x3 (light)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


def pooling(pooled: bool) -> nn.Module | None:
    return nn.AvgPool2d(2, stride=2, ceil_mode=True) if pooled else None


class AdapterLevel(nn.Module):
    """A full adapter's level: pooling, a 1x1 conv where the width changes, residual blocks."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, pooled: bool):
        super().__init__()
        self.downsample = pooling(pooled)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*(AdapterResnetBlock(out_channels, 1) for _ in range(num_res_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterLevel(nn.Module):
    """A light adapter's level: pooling, a 1x1 conv to a quarter of the width, residual blocks, a 1x1 conv out."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, pooled: bool):
        super().__init__()
        inner = out_channels // 4
        self.downsample = pooling(pooled)
        self.in_conv = nn.Conv2d(in_channels, inner, 1)
        self.resnets = nn.Sequential(*(AdapterResnetBlock(inner, 3) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(inner, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class AdapterEncoder(nn.Module):
    """The hint (B, in_channels, H, W) -> one feature map per level."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        unshuffled = config.in_channels * config.downscale_factor ** 2
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        levels = config.levels()
        if config.adapter_type == LIGHT:
            self.conv_in = None
            levels[0] = (unshuffled, *levels[0][1:])
            self.body = nn.ModuleList(LightAdapterLevel(i, o, config.num_res_blocks, p) for i, o, p in levels)
        else:
            self.conv_in = nn.Conv2d(unshuffled, config.channels[0], 3, padding=1)
            self.body = nn.ModuleList(AdapterLevel(i, o, config.num_res_blocks, p) for i, o, p in levels)

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(hint)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for level in self.body:
            x = level(x)
            features.append(x)
        return features


class Site(NamedTuple):
    """A place the UNet takes a feature: the block, the width of its output and its downscale of the latent."""

    block: BlockSite
    channels: int
    downscale: int


def block_channels(block: nn.Module) -> int:
    """The channel count of an input block's output."""
    for layer in reversed(list(block.children())):
        if isinstance(layer, (ResBlock, Downsample)):
            return layer.out_channels
        if isinstance(layer, nn.Conv2d):
            return layer.out_channels
    raise ValueError(f"cannot tell the output width of {type(block).__name__}")


def adapter_sites(unet: nn.Module) -> list[Site]:
    """Where the UNet takes T2I-Adapter features, in order: one site per resolution level, then the middle block
    (diffusers' placement, see the module's docstring)."""
    sites: list[Site] = []
    level: list[int] = []
    downscale = 1
    last = len(unet.input_blocks) - 1
    for index in range(1, last + 1):  # input_blocks[0] is conv_in: diffusers adds nothing there
        level.append(index)
        block = unet.input_blocks[index]
        pools = any(isinstance(m, Downsample) for m in block.modules())  # also a ResBlock(down=True)
        if not (pools or index == last):
            continue
        layers = level[:-1] if pools else level
        attention = any(isinstance(m, SpatialTransformer) for i in layers for m in unet.input_blocks[i].modules())
        site = layers[-1] if attention or not pools else index
        sites.append(Site(BlockSite("input", site), block_channels(unet.input_blocks[site]),
                          downscale * (2 if site == index and pools else 1)))
        downscale *= 2 if pools else 1
        level = []
    middle = unet.middle_block
    sites.append(Site(MIDDLE, next(m.out_channels for m in reversed(list(middle.children()))
                                   if isinstance(m, ResBlock)), downscale))
    return sites


class T2IAdapter(BlockControl):
    """A T2I-Adapter as a control network: its features, times the unit's weight per level, added to the UNet
    encoder's hidden states (see the module's docstring). The hint is BCHW in [0, 1], 8x the latent size; a
    gray adapter (in_channels 1) takes the mean of a colour hint's channels, as ComfyUI does."""

    def __init__(self, adapter_type: str = FULL, in_channels: int = 3,
                 channels: tuple[int, ...] = (320, 640, 1280, 1280), num_res_blocks: int = 2,
                 downscale_factor: int = 8):
        super().__init__()
        self.config = AdapterConfig(adapter_type, in_channels, tuple(channels), num_res_blocks, downscale_factor)
        self.adapter = AdapterEncoder(self.config)
        self._hint_cache = HintCache()
        # the UNet last fitted, and the block of each feature (found once per UNet, not per step)
        self._fitted: tuple[weakref.ref, list[BlockSite]] | None = None

    def num_levels(self) -> int:
        return len(self.adapter.body)

    def soft_weights(self, n: int) -> list[float]:
        """The A1111 extension's soft weights for T2I-Adapters, (0.25, 0.62, 0.825, 1) over the four features of
        every published adapter (its scripts/hook.py); an adapter of another depth gets them interpolated over its
        levels, from 0.25 at the shallowest to 1 at the deepest."""
        if n == 1:
            return [1.0]
        last = len(ADAPTER_SOFT_WEIGHTS) - 1
        positions = [i * last / (n - 1) for i in range(n)]
        return [float(w) for w in np.interp(positions, range(last + 1), ADAPTER_SOFT_WEIGHTS)]

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """The unweighted features of a hint (B, C, H, W) in [0, 1]."""
        if hint.shape[1] != self.config.in_channels:
            if self.config.in_channels != 1:
                raise ValueError(f"this T2I-Adapter takes {self.config.in_channels}-channel hints, got "
                                 f"{hint.shape[1]} channels")
            hint = hint.mean(dim=1, keepdim=True)
        return self.adapter(hint.to(next(self.parameters()).dtype))

    def feature_sites(self, unet: nn.Module) -> list[BlockSite]:
        """The block each feature goes to; raises, saying where, unless every feature fits a site of `unet`."""
        sites = adapter_sites(unet)
        levels, middle = sites[:-1], sites[-1]
        n = self.num_levels()
        if n > len(levels) + 1:
            raise ValueError(f"this T2I-Adapter gives {n} features; the UNet takes at most {len(levels) + 1} "
                             f"({len(levels)} levels and the middle block)")
        chosen = levels[:n] if n <= len(levels) else [*levels, middle]
        widths = [out for _, out, _ in self.config.levels()]
        scales = self.config.feature_downscales()
        wrong = [f"feature {i} ({widths[i]} channels at 1/{scales[i]} of the hint) -> {s.block.part} block "
                 f"{s.block.index} ({s.channels} channels at 1/{s.downscale} of the latent)"
                 for i, s in enumerate(chosen)
                 if widths[i] != s.channels or scales[i] * chosen[0].downscale != s.downscale * scales[0]]
        if wrong:
            raise ValueError("This T2I-Adapter does not fit the UNet:\n  " + "\n  ".join(wrong))
        return [s.block for s in chosen]

    def hook(self, unet: nn.Module, hint: torch.Tensor, scales: list[float], x: torch.Tensor,
             timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> FeatureAddition:
        if self._fitted is None or self._fitted[0]() is not unet:
            self._fitted = (weakref.ref(unet), self.feature_sites(unet))
        features = self._hint_cache(hint, self.adapter, self)
        return FeatureAddition({site: repeat_to(f * scale, x.shape[0])
                                for site, f, scale in zip(self._fitted[1], features, scales) if scale})


# ---- files ------------------------------------------------------------------------------------------------

ORIGINAL_FULL_KEY = re.compile(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)$")
ORIGINAL_LIGHT_KEY = re.compile(r"body\.(\d+)\.body\.(\d+)\.(block1|block2)\.(weight|bias)$")
DIFFUSERS_KEY = re.compile(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(block1|block2)\.(weight|bias)$")


def is_adapter_file(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are a T2I-Adapter's, in the diffusers or TencentARC's layout (any prefix above)."""
    keys = [k.removeprefix(CONTROL_PREFIX).removeprefix(PREFIX) for k in state_dict]
    return any(k.startswith("body.") for k in keys) and (
        "conv_in.weight" in keys or any(k.endswith(".out_conv.weight") for k in keys))


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TencentARC's layout -> diffusers' names. The full adapters number their residual blocks across levels
    (`body.N`); a level starts every num_res_blocks blocks, which the first width change (`body.N.in_conv`, level
    1) tells. TencentARC's v1 adapters (a `skep` conv in every block) have no diffusers counterpart: refused."""
    sd = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    if any(".skep." in k for k in sd):
        raise ValueError("a TencentARC v1 adapter (`body.N.skep` convs, the *_sd14v1 files): only the v2 layout "
                         "(the *_sd15v2 files) and the light adapter have a diffusers T2IAdapter equivalent")
    out = {}
    if any(k.endswith(".out_conv.weight") for k in sd):
        for key, value in sd.items():
            m = ORIGINAL_LIGHT_KEY.match(key)
            out[f"{PREFIX}body.{m[1]}.resnets.{m[2]}.{m[3]}.{m[4]}" if m else PREFIX + key] = value
        return out
    in_convs = sorted(int(m[1]) for k in sd if (m := ORIGINAL_FULL_KEY.match(k)) and m[2] == "in_conv")
    if not in_convs:
        raise ValueError("a TencentARC adapter whose levels cannot be told apart: no body.N.in_conv (no width "
                         "change between levels)")
    per_level = in_convs[0]
    for key, value in sd.items():
        m = ORIGINAL_FULL_KEY.match(key)
        if m is None:
            out[PREFIX + key] = value
            continue
        level, block = divmod(int(m[1]), per_level)
        inner = f"in_conv.{m[3]}" if m[2] == "in_conv" else f"resnets.{block}.{m[2]}.{m[3]}"
        out[f"{PREFIX}body.{level}.{inner}"] = value
    return out


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
    """diffusers' names -> TencentARC's layout (the inverse of original_to_diffusers)."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"not a diffusers T2IAdapter key: {key!r}")
        m = DIFFUSERS_KEY.match(key)
        if config.adapter_type == LIGHT:
            out[f"body.{m[1]}.body.{m[2]}.{m[3]}.{m[4]}" if m else key.removeprefix(PREFIX)] = value
            continue
        level_conv = re.match(r"adapter\.body\.(\d+)\.in_conv\.(weight|bias)$", key)
        if m:
            out[f"body.{int(m[1]) * config.num_res_blocks + int(m[2])}.{m[3]}.{m[4]}"] = value
        elif level_conv:
            out[f"body.{int(level_conv[1]) * config.num_res_blocks}.in_conv.{level_conv[2]}"] = value
        else:
            out[key.removeprefix(PREFIX)] = value
    return out


def infer_config(state_dict: Mapping[str, torch.Tensor], adapter_type: str | None = None) -> AdapterConfig:
    """The config of diffusers-named adapter weights. A file alone does not say whether a full adapter is the
    SD (unshuffle 8) or the SDXL kind (16): the hint's channels (1 or 3) decide, from conv_in's width."""
    sd = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"T2I-Adapter levels body.0 ... body.N expected, found {levels}")
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith("body.0.resnets.")}
    light = "body.0.out_conv.weight" in sd
    if light:
        widths = [sd[f"body.{i}.out_conv.weight"].shape[0] for i in levels]
        unshuffled = sd["body.0.in_conv.weight"].shape[1]
        kinds = [LIGHT]
        channels = widths[:-1]
    else:
        widths = [sd[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in levels]
        unshuffled = sd["conv_in.weight"].shape[1]
        kinds = [FULL, FULL_XL]
        channels = widths
    if adapter_type is not None:
        kinds = [adapter_type]
    for kind in kinds:
        in_channels, rest = divmod(unshuffled, DOWNSCALE[kind] ** 2)
        if not rest and in_channels in HINT_CHANNELS:
            return AdapterConfig(kind, in_channels, tuple(channels), len(blocks), DOWNSCALE[kind])
    raise ValueError(f"a T2I-Adapter whose first conv takes {unshuffled} channels: not a gray or colour hint "
                     f"unshuffled by {[DOWNSCALE[k] for k in kinds]}; give its config.json")


def read_adapter_folder(folder: Path) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """A diffusers `T2IAdapter.save_pretrained` folder: its weights and its config.json."""
    weights, config = read_folder(folder, "T2IAdapter")
    return weights, AdapterConfig(**{k: config[k] for k in AdapterConfig.__dataclass_fields__ if k in config})


def save_adapter_folder(net: T2IAdapter, folder: str | os.PathLike, force: bool = False) -> Path:
    """`T2IAdapter.save_pretrained`'s layout: FOLDER/config.json and FOLDER/diffusion_pytorch_model.safetensors."""
    return DiffusersFolder(folder, force).write(net.state_dict(), net.config.diffusers_config())


def adapter_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A T2I-Adapter's tensors under diffusers' names, from any of its layouts (a Lightning checkpoint of
    T2IAdapterControlLDM gives its control model)."""
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    sd = prefixed or dict(state_dict)
    if any(".resnets." in k for k in sd):
        return {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in sd.items()}
    return original_to_diffusers(sd)


def load_t2i_adapter(source: Mapping[str, torch.Tensor] | str | os.PathLike,
                     config: AdapterConfig | None = None) -> T2IAdapter:
    """A T2I-Adapter from a diffusers folder or weights file, a TencentARC file, or a state dict of either;
    its structure from config.json (a folder), `config`, or the tensors (see infer_config)."""
    if isinstance(source, Mapping):
        sd = source
    elif Path(source).is_dir():
        sd, config = read_adapter_folder(Path(source))
    else:
        sd = load_state_dict(source)
    if not is_adapter_file(sd):
        raise ValueError(f"no T2I-Adapter weights (body.* keys with conv_in.* or out_conv.*) in {len(sd)} keys, e.g. "
                         f"{sorted(sd)[:3]}")
    weights = adapter_weights(sd)
    config = config or infer_config(weights)
    with torch.device("meta"):  # no initialisation to overwrite
        net = T2IAdapter(**asdict(config))
    dtype = torch.get_default_dtype()
    # strict: any other layout raises with the offending keys
    net.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    return net


def config_adapter(config_path: str | os.PathLike) -> AdapterConfig:
    """The adapter a T2IAdapterControlLDM YAML builds."""
    params = OmegaConf.load(config_path).model.params.control_stage_config.get("params") or {}
    return AdapterConfig(**OmegaConf.to_container(params))


def check_structure(net: T2IAdapter, expected: AdapterConfig, source: str | os.PathLike) -> None:
    """Refuse an adapter of another structure than the config's (the hint's channels may differ: gray or colour)."""
    if replace(net.config, in_channels=expected.in_channels) != expected:
        raise ValueError(f"{source} is a T2I-Adapter of another structure than the --config builds: {net.config}, "
                         f"expected {expected} (right --config?)")


def convert_to_diffusers(in_path: str | os.PathLike, out_dir: str | os.PathLike, config_path: str | os.PathLike,
                         force: bool = False) -> Path:
    """A T2I-Adapter file in any layout (TencentARC's .pth, this project's export) -> a diffusers T2IAdapter folder;
    the config says which kind a full adapter is (SD's or SDXL's)."""
    expected = config_adapter(config_path)
    weights = adapter_weights(weights_to_use(in_path))
    net = load_t2i_adapter(weights, infer_config(weights, expected.adapter_type))
    check_structure(net, expected, in_path)
    return save_adapter_folder(net, out_dir, force)


def convert_from_diffusers(in_path: str | os.PathLike, out_path: str | os.PathLike, config_path: str | os.PathLike,
                           force: bool = False) -> Path:
    """A diffusers T2IAdapter folder (or its weights file alone) -> TencentARC's layout, .pth or .safetensors by
    the extension (the layout TencentARC's code, the A1111 extension and ComfyUI load)."""
    expected = config_adapter(config_path)
    if Path(in_path).is_dir():
        net = load_t2i_adapter(in_path)
    else:
        weights = adapter_weights(load_state_dict(in_path))
        net = load_t2i_adapter(weights, infer_config(weights, expected.adapter_type))
    check_structure(net, expected, in_path)
    return save_state_dict(diffusers_to_original(net.state_dict(), net.config), out_path, force=force)


def replace_network(model: ControlLDM, net: T2IAdapter) -> None:
    """Make `net` the model's own adapter, on the old one's device and dtype and training as it did."""
    net.feature_sites(model.model.diffusion_model)
    model.replace_control_model(net)
    model.control_scales = [1.0] * net.num_levels()


class T2IAdapterMode(ControlMode):
    """T2I-Adapter files: diffusers' layout (`adapter.conv_in.*`, `adapter.body.N.resnets.M.*`) or TencentARC's
    (`conv_in.*`, `body.N.block1.*`; the light adapter's `body.N.body.M.*`), also under `control_model.`; the
    structure is read from the tensors (infer_config) and must fit the loaded model's UNet."""

    name = "t2i-adapter"
    files = ("a T2I-Adapter (body.* keys with conv_in.* or, the light adapter, out_conv.*; diffusers' or "
             "TencentARC's names)")

    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        if not is_adapter_file(state_dict):
            return None
        return "diffusers" if any(".resnets." in k for k in state_dict) else "tencentarc"

    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> T2IAdapter:
        net = load_t2i_adapter(state_dict)
        net.feature_sites(model.model.diffusion_model)
        return net

    def export(self, model: "T2IAdapterControlLDM") -> dict[str, torch.Tensor]:
        """The adapter's weights under diffusers' names: the diffusion_pytorch_model.safetensors of
        `T2IAdapter.save_pretrained`, which diffusers loads beside a config.json (tool_convert_diffusers.py writes
        both) and ComfyUI and this project load alone."""
        return dict(model.control_model.state_dict())

    def load(self, model: "T2IAdapterControlLDM", state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        """Replace the model's adapter by the file's, with the file's structure. Do this before training starts
        (the optimizer holds the old network)."""
        replace_network(model, load_t2i_adapter(state_dict))
        return LoadReport()

    def to_diffusers(self, source: str | os.PathLike, out_dir: str | os.PathLike, config: str | os.PathLike,
                     force: bool = False) -> Path:
        return convert_to_diffusers(source, out_dir, config, force)

    def from_diffusers(self, source: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike,
                       force: bool = False) -> Path:
        return convert_from_diffusers(source, out, config, force)


T2I_ADAPTER = T2IAdapterMode()


class T2IAdapterControlLDM(ControlLDM):
    """ControlLDM steered by a T2I-Adapter on its locked UNet; the hint is cond["c_concat"] in [0, 1].

    `control_stage_config` builds the adapter (`cldm.t2i_adapter.T2IAdapter` with diffusers' T2IAdapter
    arguments); it must fit the UNet of `unet_config`. Only the adapter trains. `control_scales` has one entry
    per feature.
    """

    control_mode = T2I_ADAPTER
    locked_unet = "T2I-Adapter mode trains only the adapter"
    # The adapter starts fresh, so a plain SD checkpoint is a complete initial checkpoint.
    fresh_prefixes = (CONTROL_PREFIX,)

    def make_control_model(self, control_stage_config: Any) -> T2IAdapter:
        net = super().make_control_model(control_stage_config)
        if not isinstance(net, T2IAdapter):
            raise ValueError(f"T2IAdapterControlLDM needs control_stage_config target cldm.t2i_adapter.T2IAdapter, "
                             f"got {type(net).__name__}")
        net.feature_sites(self.model.diffusion_model)
        return net

    def num_control_scales(self) -> int:
        return self.control_model.num_levels()

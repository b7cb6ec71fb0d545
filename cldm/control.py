"""The control contract: what a control network is, and how a ControlUnit applies one while sampling.

Three kinds of network steer the locked UNet from a hint image:
- `ResidualControl` networks (ControlNet, LoRA-offset) compute one residual per skip connection plus the
  middle block, which the UNet adds to its own features;
- `InsideControl` networks (LLLite) change what the UNet's attention projections see, through an
  `InputAdapter` passed down the UNet's forward;
- `BlockControl` networks (T2I-Adapter; ControlNet-XS) act on the UNet's hidden states between its blocks,
  through a `BlockHook` passed down the UNet's forward: adding their own features to the encoder's, or
  exchanging features with it.
All implement `ControlNetwork.contribute`, so a caller never asks which kind a network is.

Files are the other half of the contract: a `ControlMode` says how its files are recognised, how a file becomes
its network on a loaded model, and how a trained model's control is exported and loaded back. A new mode is one
module with a network that subclasses one of the kinds and a ControlMode, listed in cldm/modes.py
(docs/modes.md).
"""

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from ldm.checkpoint import LoadReport, UserError
from ldm.modules.attention import InputAdapter
from ldm.modules.diffusionmodules.openaimodel import BlockHook, BlockSite

CONTROL_MODES = ("balanced", "prompt", "control")
SOFT_DECAY = 0.825  # the original's guess-mode weight ratio between neighbouring residual levels of SD's 13
SD_LEVELS = 13  # SD's residual levels: 12 skip connections and the middle block
Step = tuple[int, int]
FilePath = str | os.PathLike


@dataclass
class Contribution:
    """What the active units give one UNet forward: residuals to add to the skips and the middle, adapters
    acting inside the attention projections, and hooks acting around the blocks (called in order)."""

    residuals: list[torch.Tensor] | None = None
    adapters: tuple[InputAdapter, ...] = ()
    hooks: tuple[BlockHook, ...] = ()

    def __add__(self, other: "Contribution") -> "Contribution":
        if self.residuals is None or other.residuals is None:
            residuals = self.residuals if other.residuals is None else other.residuals
        else:
            residuals = [a + b for a, b in zip(self.residuals, other.residuals)]
        return Contribution(residuals, self.adapters + other.adapters, self.hooks + other.hooks)

    def adapter(self) -> InputAdapter | None:
        """The adapters as one (their residuals add up, each computed on the original input), or None."""
        if len(self.adapters) < 2:
            return self.adapters[0] if self.adapters else None
        adapters = self.adapters

        def combined(projection: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
            residuals = [r for r in (adapter(projection, x) for adapter in adapters) if r is not None]
            return sum(residuals) if residuals else None
        return combined


class ControlNetwork(nn.Module, ABC):
    """A network that steers the UNet from a hint image (BCHW in [0, 1], 8x the latent size)."""

    @abstractmethod
    def contribute(self, unit: "ControlUnit", x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None, unet: nn.Module) -> Contribution:
        """This network's contribution to one UNet forward on x (B, C, h, w) with the UNet's own inputs
        (timesteps, text context, and the vector y of vector-conditioned bases), weighted as `unit` says."""

    def soft_weights(self, n: int) -> list[float]:
        """The weights of this network's n levels, shallowest first, in the soft modes ("My prompt is more
        important", "ControlNet is more important"): the generic rule, unless a kind of network has its own."""
        return soft_weights(n)

    def contribute_units(self, units: Sequence["ControlUnit"], step: Step | None, x: torch.Tensor,
                         timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                         unet: nn.Module) -> Contribution:
        """The contribution of all the units of one forward that use this network, at sampling step `step`
        (None outside sampling): each unit active at the step on its own, added up. A network that fuses the
        hints of several units in one pass (ControlNet-Union) overrides this."""
        return sum((u.contribute(x, timesteps, context, y, unet) for u in units if u.active(step)), Contribution())

    def control_types(self) -> tuple[str, ...]:
        """The control types a unit of this network names (`ControlUnit.control_type`), in the order the network
        numbers them; () for a network made for one kind of hint, whose units name none."""
        return ()

    def check_unit(self, unit: "ControlUnit") -> None:
        """Raise ValueError, saying why, for a unit this network cannot apply (called when the unit is made)."""
        if unit.control_type is not None:
            raise ValueError(f"a {type(self).__name__} is made for one kind of hint and takes no control type, "
                             f"got control_type {unit.control_type!r}")


class ResidualControl(ControlNetwork):
    """A control that adds residuals to the UNet's skip connections and middle block."""

    @abstractmethod
    def residuals(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One residual per skip connection, then the middle block's (13 on SD), unweighted; `hint` has len(x)
        images or a divisor of that (see repeat_to)."""

    def contribute(self, unit: "ControlUnit", x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None, unet: nn.Module) -> Contribution:
        out = self.residuals(x, unit.hint, timesteps, context, y)
        out = [c * scale for c, scale in zip(out, unit.level_scales(len(out)))]
        if unit.global_average_pooling:
            out = [torch.mean(c, dim=(2, 3), keepdim=True) for c in out]
        return Contribution(residuals=out)


class InsideControl(ControlNetwork):
    """A control that acts within the UNet's layers, through an InputAdapter on its attention projections."""

    @abstractmethod
    def adapter(self, unet: nn.Module, hint: torch.Tensor, multiplier: float) -> InputAdapter:
        """The adapter that applies this network, at `multiplier`, to `unet`'s projections for one forward;
        `hint` has as many images as the batch or a divisor of that (see repeat_to)."""

    def contribute(self, unit: "ControlUnit", x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None, unet: nn.Module) -> Contribution:
        # one weight for the whole network: the deepest level's scale, which is the strength in every mode
        multiplier = unit.level_scales(1)[-1]
        if not multiplier:
            return Contribution()
        return Contribution(adapters=(self.adapter(unet, unit.hint, multiplier),))


class BlockControl(ControlNetwork):
    """A control that acts on the UNet's hidden states around its blocks, through a BlockHook for one forward."""

    @abstractmethod
    def num_levels(self) -> int:
        """How many weights the unit gives this network (unit.level_scales(num_levels()))."""

    @abstractmethod
    def hook(self, unet: nn.Module, hint: torch.Tensor, scales: list[float], x: torch.Tensor,
             timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> BlockHook:
        """The hook that applies this network, weighted level by level by `scales`, to `unet`'s forward on x
        with the UNet's own inputs; `hint` has len(x) images or a divisor of that (see repeat_to)."""

    def contribute(self, unit: "ControlUnit", x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None, unet: nn.Module) -> Contribution:
        scales = unit.level_scales(self.num_levels())
        if not any(scales):
            return Contribution()
        return Contribution(hooks=(self.hook(unet, unit.hint, scales, x, timesteps, context, y),))


class FeatureAddition(BlockHook):
    """A hook that adds a tensor to the output of some blocks: to the skip connection and the next block's
    input alike when the block is an input block (T2I-Adapter's features)."""

    def __init__(self, features: Mapping[BlockSite, torch.Tensor]):
        self.features = dict(features)

    def block_output(self, site: BlockSite, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        feature = self.features.get(site)
        if feature is None:
            return h
        if feature.shape != h.shape:
            raise ValueError(f"a control feature for {site.part} block {site.index} has shape "
                             f"{tuple(feature.shape)}, the block's output {tuple(h.shape)}: the hint must be 8x "
                             "the latent size and the control made for this base model")
        return h + feature.to(h.dtype)


class HintCache:
    """The output of a network's hint encoder for the last hint tensor, reused while sampling.

    A hint encoder sees the hint alone, not x, t or the text, so its output repeats over the sampling steps and
    both guidance passes. The output is kept for the last hint tensor and reused while that tensor, the
    encoder's weights and the autocast state stay unchanged; with gradients on it is always computed.
    """

    def __init__(self):
        self._entry: tuple | None = None

    def __call__(self, hint: torch.Tensor, encoder: nn.Module, encode: Callable[[torch.Tensor], object]):
        if torch.is_grad_enabled():
            return encode(hint)
        device = hint.device.type
        weights = list(encoder.parameters())
        key = (0 if hint.is_inference() else hint._version, torch.is_autocast_enabled(device),
               torch.get_autocast_dtype(device), weights[0].dtype, weights[0].device, *(p._version for p in weights))
        entry = self._entry
        if entry is not None and entry[0] is hint and entry[1] == key:
            return entry[2]
        out = encode(hint)
        self._entry = (hint, key, out)
        return out


@dataclass
class ControlUnit:
    """One control applied while sampling: a control network, its hint, and how strongly and when it acts.

    `mode` follows the A1111 extension's control modes (see docs/controls.md):
      balanced - every residual times `strength`, on the cond and uncond passes alike;
      prompt   - "My prompt is more important": level i of n times strength * the network's soft_weights(n)[i]
                 (0.825 ** (12 - i) on SD's 13), so deep levels dominate and shallow ones fade; on both passes;
      control  - "ControlNet is more important": the same soft weights, on the cond pass only, so
                 classifier-free guidance amplifies the control (the original's guess mode).
    The unit acts on sampling steps i of N with start <= i / N and (i + 1) / N <= end (as in diffusers), the
    same under every sampler. `scales` (one per residual) replaces the mode's weights when given.
    `hint` has one image per sample, or one for all.
    `control_type` names what the hint shows, for a network that takes several kinds (ControlNet-Union: "depth",
    "openpose", ..., see its control_types()); several names give several hints, stacked along the hint's channels
    in the same order (3 channels each). Networks made for one kind of hint take None.
    """

    model: ControlNetwork
    hint: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    global_average_pooling: bool = False
    scales: Sequence[float] | None = None
    control_type: str | Sequence[str] | None = None

    def __post_init__(self):
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"control mode must be one of {CONTROL_MODES}, got {self.mode!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control start/end must satisfy 0 <= start < end <= 1, got {self.start}, {self.end}")
        if not torch.isfinite(torch.tensor(float(self.strength))):
            raise ValueError(f"control strength must be a finite number, got {self.strength}")
        self.model.check_unit(self)

    @property
    def control_types(self) -> tuple[str, ...]:
        """control_type as a tuple of names (empty for None)."""
        if self.control_type is None:
            return ()
        return (self.control_type,) if isinstance(self.control_type, str) else tuple(self.control_type)

    @property
    def windowed(self) -> bool:
        return self.start > 0.0 or self.end < 1.0

    @property
    def acts_on_uncond(self) -> bool:
        """Whether the unit also acts on the unconditional pass (all modes but "ControlNet is more important")."""
        return self.mode != "control"

    def level_scales(self, n: int, strength: float | None = None) -> list[float]:
        """The weights of n residuals: `scales` when given, else the mode's at `strength` (default the unit's)."""
        if self.scales is not None:
            return list(self.scales)
        strength = self.strength if strength is None else strength
        if self.mode == "balanced":
            return [strength] * n
        return [strength * w for w in self.model.soft_weights(n)]

    def active(self, step: Step | None) -> bool:
        """Whether the unit acts at sampling step (i, N); outside sampling (step None) a windowed unit is an
        error rather than silently always on."""
        if step is None:
            if self.windowed:
                raise ValueError(f"a control unit with a start/end window ({self.start}, {self.end}) needs the "
                                 "sampling step: call apply_model with sampling_step=(i, N)")
            return True
        i, n = step
        return self.start <= i / n and (i + 1) / n <= self.end

    def contribute(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                   unet: nn.Module) -> Contribution:
        return self.model.contribute(self, x, timesteps, context, y, unet)


def soft_weights(n: int) -> list[float]:
    """The soft ("My prompt is more important", guess mode) weights of n levels, shallowest first: 1 at the
    deepest level (the middle block), falling geometrically to 0.825^12 (about 0.1) at the shallowest.

    On SD's 13 levels this is the original's and the A1111 extension's 0.825^(12 - i); on another depth (SDXL's
    10) the same span spread over its levels, which is diffusers' logspace(-1, 0, n) within 0.6 %.
    """
    if n == 1:
        return [1.0]
    return [SOFT_DECAY ** ((n - 1 - i) * (SD_LEVELS - 1) / (n - 1)) for i in range(n)]


def contribution(units: Sequence[ControlUnit], step: Step | None, x: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor, y: torch.Tensor | None, unet: nn.Module) -> Contribution:
    """What `units` give one UNet forward at sampling step `step`: each network is asked once, for all of its
    units (contribute_units), in the order the networks first appear."""
    by_network: dict[int, list[ControlUnit]] = {}
    for unit in units:
        by_network.setdefault(id(unit.model), []).append(unit)
    return sum((group[0].model.contribute_units(group, step, x, timesteps, context, y, unet)
                for group in by_network.values()), Contribution())


def repeat_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (b, ...) repeated along the batch to n: one hint serves every sample, or cond and uncond in one batch."""
    repeats, rest = divmod(n, t.shape[0])
    if rest:
        raise ValueError(f"{t.shape[0]} hint images cannot serve a batch of {n}")
    return t if repeats == 1 else t.repeat(repeats, *(1,) * (t.dim() - 1))


def unconditional_units(units: Sequence[ControlUnit]) -> list[ControlUnit]:
    """The units that also act on the unconditional pass."""
    return [u for u in units if u.acts_on_uncond]


def record(key: str, settings: Mapping[str, Any]) -> dict[str, str]:
    """`settings` as a mode's exports record them in the safetensors header (ControlMode.recorded): JSON under
    `key`."""
    return {key: json.dumps(dict(settings))}


def recorded_settings(recorded: Mapping[str, str] | None, key: str, names: Sequence[str]) -> dict[str, Any]:
    """The settings a file recorded under `key` (see record), {} when it recorded none; ValueError for an entry
    that is not a JSON object of some of `names`."""
    if not recorded or key not in recorded:
        return {}
    try:
        values = json.loads(recorded[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"its header's {key!r} entry is not JSON: {err}") from err
    if not isinstance(values, dict) or not set(values) <= set(names):
        raise ValueError(f"its header's {key!r} entry should map some of {list(names)}, got {recorded[key][:80]!r}")
    return values


class ControlMode(ABC):
    """A kind of control file: how it is recognised, built into a network, exported and loaded back.

    One object per mode, listed in cldm/modes.py MODES; a ControlLDM names its own in `control_mode`. `model` is a
    ControlLDM with its base weights loaded, `config` the model's YAML (the `model:` section at least).
    """

    name: str  # how messages name the mode, e.g. "controlnet"
    files: str  # what its files hold, for the message about a file that no mode recognises

    @abstractmethod
    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """The name of this mode's layout the tensors are in (e.g. "diffusers"), or None when they are not a file
        of this mode. It looks for what only this mode's files hold, so that a file of another mode gives None."""

    @abstractmethod
    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> ControlNetwork:
        """The network of a file of this mode (any of its layouts) for ControlUnits on `model`, built on the
        model's UNet as far as the file does not say; `recorded` is what the file records besides its tensors (see
        `recorded`; None: nothing). Raises ValueError, KeyError or RuntimeError naming what does not fit. The caller
        moves it to the UNet's device and dtype and freezes it."""

    @abstractmethod
    def export(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The control-only file of a model of this mode: what training writes at the end."""

    def recorded(self, model: nn.Module) -> dict[str, str]:
        """What the export of `model` records besides its tensors, as strings in the safetensors header: the
        settings that change what the network computes but that its tensors do not show. Most modes' tensors show
        everything: nothing."""
        return {}

    @abstractmethod
    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        """Load a file of this mode (any of its layouts) into the own control network of `model`, a model of this
        mode (`recorded` as for `network`). The report names, as the model's keys (`control_model.*`), what the file
        left unfilled, and the file's keys that the model does not use."""

    def to_diffusers(self, source: FilePath, out_dir: FilePath, config: FilePath, force: bool = False) -> Path:
        """A file of this mode (any of its layouts) as a folder of diffusers' class for the network (config.json and
        weights), for `config`'s model: tool_convert_diffusers.py to-diffusers. A mode diffusers has no class
        for refuses, naming itself."""
        raise self._no_diffusers_class()

    def from_diffusers(self, source: FilePath, out: FilePath, config: FilePath, force: bool = False) -> Path:
        """A folder of diffusers' class for the network as a file of this mode's own layout (.safetensors, .ckpt
        or .pth by the extension): tool_convert_diffusers.py from-diffusers."""
        raise self._no_diffusers_class()

    def _no_diffusers_class(self) -> UserError:
        return UserError(f"{self.name} files have no diffusers class to convert to or from",
                         "the apps, tool_eval_control.py and training load this mode's files as they are")

"""ControlNet-LLLite (kohya-ss/sd-scripts networks/control_net_lllite.py) on SDXL, as kohya built it, and on the
SD1.x/2.x UNet.

One small module sits in front of each frozen attention projection the UNet encoder uses on its own
tokens (attn1 to_q/to_k/to_v and attn2 to_q of every SpatialTransformer in input_blocks and
middle_block: 136 on SDXL, 28 on SD1.5) and makes it compute

    proj(x + multiplier * up(mid(cat[conditioning1(image), down(x)])))

where conditioning1 embeds the conditioning image (in [-1, 1], 8x the latent size) at the resolution of
the module's block. Nothing of the UNet is copied or changed: the network is an InsideControl (cldm/control.py)
whose adapter, passed down the UNet's forward, changes what the target projections see.

Two choices differ from kohya, on purpose:
- `up` is zero-initialised in weight AND bias (kohya zeroes only the weight), so an untrained network is
  an exact no-op instead of adding a small random bias to every projection input.
- kohya targets SDXL, whose middle block sits at 1/32 of the image; SD1.x/2.x have a fourth level, so
  the blocks there (input_blocks 10-11 have no attention; the middle block has) sit at 1/64. Depth is
  therefore counted from the UNet (1 + downsamplings above the block), which reproduces kohya's depths
  1-3 and adds depth 4 (/64) with the same rule for the stride-only convs.

Files use kohya's naming, `lllite_unet_<ldm path with dots as underscores>.{conditioning1,down,mid,up}.*`,
and loading infers every module's dims from its tensors.
"""

import math
import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from einops import rearrange
from omegaconf import DictConfig

from cldm.cldm import ControlLDM
from cldm.control import ControlMode, InsideControl, repeat_to
from cldm.model import CONTROL_PREFIX, LoadReport, load_state_dict
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import Downsample

PREFIX = "lllite_unet_"
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")


def lllite_name(path: str) -> str:
    """kohya's module name for a UNet path: input_blocks.1.1.transformer_blocks.0.attn1.to_q ->
    lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q."""
    return PREFIX + path.replace(".", "_")


class Target(NamedTuple):
    path: str
    in_dim: int
    depth: int


def lllite_targets(unet: nn.Module) -> dict[str, Target]:
    """The projections LLLite acts on, by kohya name, with their width and depth (1 + downsamplings above)."""
    targets, depth = {}, 1
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
    blocks.append(("middle_block", unet.middle_block))
    for prefix, block in blocks:
        for name, module in block.named_modules():
            if not isinstance(module, BasicTransformerBlock):
                continue
            for attr in PROJECTIONS:
                # with self-attention disabled, attn1's k and v read the text, which has no image layout
                if module.disable_self_attn and attr in ("attn1.to_k", "attn1.to_v"):
                    continue
                path = f"{prefix}.{name}.{attr}"
                targets[lllite_name(path)] = Target(path, module.get_submodule(attr).in_features, depth)
        if any(isinstance(m, Downsample) for m in block.modules()):  # also a ResBlock(down=True)
            depth += 1
    return targets


def conditioning_strides(depth: int) -> list[int]:
    """Kernel = stride of each conv of conditioning1: 4 to the latent grid, then 4s and a final 2 when the
    remaining factor 2**depth is an odd power of two (kohya: [4, 2], [4, 4], [4, 4, 2]; also [4, 4, 4])."""
    return [4] + [4] * (depth // 2) + [2] * (depth % 2)


def conditioning_embedding(depth: int, cond_emb_dim: int) -> nn.Sequential:
    """Stride-only convs with ReLU between them, 3 -> ced/2 (-> ced/2) -> ced, image / 2**(depth + 2)."""
    strides = conditioning_strides(depth)
    widths = [3] + [cond_emb_dim // 2] * (len(strides) - 1) + [cond_emb_dim]
    layers: list[nn.Module] = []
    for c_in, c_out, s in zip(widths, widths[1:], strides):
        layers += [nn.ReLU()] if layers else []
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=s, stride=s))
    return nn.Sequential(*layers)


class LLLiteModule(nn.Module):
    """The residual for one projection's input: up(mid(cat[conditioning1(image), down(x)]))."""

    def __init__(self, in_dim: int, depth: int, cond_emb_dim: int = 32, mlp_dim: int = 64):
        super().__init__()
        self.depth = depth
        self.conditioning1 = conditioning_embedding(depth, cond_emb_dim)
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)  # kohya keeps a random bias here; zero makes step 0 an exact no-op

    @property
    def in_dim(self) -> int:
        return self.down[0].in_features

    def forward(self, x: torch.Tensor, cond_image: torch.Tensor) -> torch.Tensor:
        """x: (B, tokens, C), the projection's input; cond_image: (B or 1, 3, H, W) in [-1, 1]."""
        # recomputed on every call: no embedding outlives its forward (DDP, checkpointed backward)
        emb = self.conditioning1(cond_image.to(self.conditioning1[0].weight.dtype))
        emb = rearrange(emb, "b c h w -> b (h w) c")
        if emb.shape[1] != x.shape[1]:
            raise ValueError(f"LLLite depth {self.depth}: the conditioning image gives {emb.shape[1]} "
                             f"tokens, the block has {x.shape[1]}; the image must be 8x the latent size, "
                             f"divisible by {2 ** (self.depth + 2)}")
        emb = repeat_to(emb, x.shape[0])
        return self.up(self.mid(torch.cat([emb.to(x.dtype), self.down(x)], dim=-1)))


class LLLiteAdapter:
    """Adds an LLLite network's residuals, times `multiplier`, to its target projections' inputs (one forward)."""

    def __init__(self, modules: dict[nn.Module, LLLiteModule], cond_image: torch.Tensor, multiplier: float):
        self.modules = modules
        self.cond_image = cond_image
        self.multiplier = multiplier

    def __call__(self, projection: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        module = self.modules.get(projection)
        return None if module is None else self.multiplier * module(x, self.cond_image)


class ControlNetLLLite(InsideControl):
    """LLLite modules by kohya name, acting on the UNet's attention projections through an LLLiteAdapter."""

    def __init__(self, modules: dict[str, LLLiteModule]):
        super().__init__()
        if not modules:
            raise ValueError("an LLLite network needs at least one module")
        for name, module in modules.items():
            if not name.startswith(PREFIX):
                raise ValueError(f"LLLite module names start with {PREFIX!r}, got {name!r}")
            self.add_module(name, module)  # directly, so state-dict keys are kohya's
        # the UNet last fitted, and its projection paths by module name (found once per UNet, not per step)
        self._fitted: tuple[weakref.ref, dict[str, str]] | None = None

    @classmethod
    def for_unet(cls, unet: nn.Module, cond_emb_dim: int = 32, network_dim: int = 64) -> "ControlNetLLLite":
        """A fresh network on every target of `unet` (built on the current default device)."""
        return cls({name: LLLiteModule(t.in_dim, t.depth, cond_emb_dim, network_dim)
                    for name, t in lllite_targets(unet).items()})

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "ControlNetLLLite":
        """The network a file describes, each module's dims read from its tensors."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            name, _, rest = key.partition(".")
            grouped.setdefault(name, {})[rest] = value
        modules = {}
        for name, sd in grouped.items():
            kernels = [v.shape[-1] for k, v in sd.items() if k.startswith("conditioning1.") and v.dim() == 4]
            if "down.0.weight" not in sd or "mid.0.weight" not in sd or not kernels:
                raise ValueError(f"{name} is not an LLLite module: its keys are {sorted(sd)[:8]}")
            mlp_dim, in_dim = sd["down.0.weight"].shape
            cond_emb_dim = sd["mid.0.weight"].shape[1] - mlp_dim
            depth = round(math.log2(math.prod(kernels))) - 2  # the convs downsample by 2**(depth + 2)
            with torch.device("meta"):  # no initialisation to overwrite: SDXL's 136 modules load in a blink
                module = LLLiteModule(in_dim, depth, cond_emb_dim, mlp_dim)
            dtype = torch.get_default_dtype()
            # strict: any other layout raises with the offending keys
            module.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
            modules[name] = module
        return cls(modules)

    def module_names(self) -> Iterable[str]:
        return self._modules.keys()

    @property
    def cond_emb_dim(self) -> int:
        return next(iter(self.children())).mid[0].in_features - self.network_dim

    @property
    def network_dim(self) -> int:
        return next(iter(self.children())).down[0].out_features

    def check_fits(self, unet: nn.Module) -> dict[str, str]:
        """The UNet path of every module; raises, naming the modules, unless each matches a target of `unet`
        in width and depth."""
        targets = lllite_targets(unet)
        wrong = []
        for name, m in self.named_children():
            t = targets.get(name)
            if t is None:
                wrong.append(f"{name} (no such layer)")
            elif (t.in_dim, t.depth) != (m.in_dim, m.depth):
                wrong.append(f"{name}: in_dim {m.in_dim}, depth {m.depth}; the UNet's: {t.in_dim}, {t.depth}")
        if wrong:
            raise ValueError("This LLLite network does not fit the UNet:\n  " + "\n  ".join(wrong[:20]))
        return {name: targets[name].path for name in self.module_names()}

    def adapter(self, unet: nn.Module, hint: torch.Tensor, multiplier: float) -> LLLiteAdapter:
        if self._fitted is None or self._fitted[0]() is not unet:
            self._fitted = (weakref.ref(unet), self.check_fits(unet))
        paths = self._fitted[1]
        modules = {unet.get_submodule(paths[name]): module for name, module in self.named_children()}
        return LLLiteAdapter(modules, hint * 2.0 - 1.0, multiplier)

    def forward(self, *args, **kwargs):
        raise TypeError("ControlNetLLLite acts inside the UNet: use it as a ControlUnit's model, or "
                        "LLLiteControlLDM.apply_model")


def strip_control_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(CONTROL_PREFIX): v for k, v in state_dict.items()
            if k.startswith(PREFIX) or k.startswith(CONTROL_PREFIX + PREFIX)}


def load_lllite(state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike) -> ControlNetLLLite:
    """An LLLite network from a kohya-named file (or `control_model.`-prefixed keys), dims from the file."""
    sd = (state_dict_or_path if isinstance(state_dict_or_path, Mapping)
          else load_state_dict(state_dict_or_path))
    lllite = strip_control_prefix(sd)
    if not lllite:
        raise ValueError(f"No LLLite weights ({PREFIX}* keys) in {len(sd)} keys, e.g. {list(sd)[:3]}")
    return ControlNetLLLite.from_state_dict(lllite)


class LLLiteMode(ControlMode):
    """kohya's ControlNet-LLLite files (`lllite_unet_*`, also under `control_model.`); the network's dims are read
    from the file and it must fit the loaded model's UNet."""

    name = "lllite"
    files = f"an LLLite network ({PREFIX}* keys)"

    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        return "kohya" if any(k.removeprefix(CONTROL_PREFIX).startswith(PREFIX) for k in state_dict) else None

    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> ControlNetLLLite:
        net = load_lllite(state_dict)
        net.check_fits(model.model.diffusion_model)
        return net

    def export(self, model: "LLLiteControlLDM") -> dict[str, torch.Tensor]:
        """The LLLite weights under kohya's names (lllite_unet_*), as sd-scripts saves them."""
        return dict(model.control_model.state_dict())

    def load(self, model: "LLLiteControlLDM", state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        """Replace the model's network by the file's, with the file's dims; the UNet targets the file leaves out
        are reported missing. Do this before training starts (the optimizer holds the old network)."""
        lllite = load_lllite(state_dict)
        unet = model.model.diffusion_model
        lllite.check_fits(unet)
        model.replace_control_model(lllite)
        names = set(lllite.module_names())
        return LoadReport(missing=[CONTROL_PREFIX + name for name in lllite_targets(unet) if name not in names],
                          unexpected=[k for k in state_dict if not k.removeprefix(CONTROL_PREFIX).startswith(PREFIX)])


LLLITE = LLLiteMode()


class LLLiteControlLDM(ControlLDM):
    """ControlLDM steered by an LLLite network on its locked UNet; the hint is cond["c_concat"] in [0, 1].

    `control_stage_config` holds the network's dims (cond_emb_dim, network_dim); the network is built on
    the UNet of `unet_config`. Only its tensors train. `control_scales` has one entry: the multiplier.
    """

    control_mode = LLLITE
    locked_unet = "LLLite mode trains only the LLLite modules"
    # The LLLite network starts fresh, so a plain SD checkpoint is a complete initial checkpoint.
    fresh_prefixes = (CONTROL_PREFIX,)

    def make_control_model(self, control_stage_config: Any) -> ControlNetLLLite:
        return ControlNetLLLite.for_unet(self.model.diffusion_model, **control_stage_config)

    def num_control_scales(self) -> int:
        return 1

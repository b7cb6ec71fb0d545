"""ControlNet-Union (xinsir's ControlNet++: controlnet-union-sdxl-1.0 and its ProMax file): one ControlNet for many
control types, told which one by a control-type vector, with the hints of several types fused in one pass.

The network is a ControlNet (a copy of the UNet encoder joined by zero convs) with three additions, named as in
xinsir's and diffusers' `ControlNetUnionModel`, so that a file's keys are those names:
  control_add_embedding  the control-type vector (1 for each type in use, of `num_control_type`) as sinusoidal
                         features, `control_type_embed_dim` per entry (diffusers' addition_time_embed_dim, SDXL's
                         256), through linear_1, SiLU, linear_2, added to the timestep embedding;
  task_embedding         one learnt vector per control type, added to the mean of that hint's encoding;
  transformer_layes      the "condition transformer" (sic, the files' name): one CLIP-style block over the tokens
                         [hint 1, ..., hint k, mean of the encoded latent]; `spatial_ch_projs` (zero-initialised)
                         turns each hint's output token into a per-channel bias for that hint's encoding.
Every hint goes through the same hint encoder; the latent after conv_in gets the sum of (encoding + bias) over the
hints, and the encoder copy runs on that as a ControlNet's does.

Two behaviours of the published code are kept as they are, since the files were trained with them:
- The condition transformer is torch's nn.MultiheadAttention without batch_first, given (batch, tokens, width): it
  attends across the samples of the batch at each token position, not across the hints of a sample. A sample's
  residuals therefore depend on the other samples of its batch (cond and uncond run as one batch while sampling,
  as diffusers' pipeline does); with one sample the attention is the identity of its value projection.
- Weights (diffusers' `StableDiffusionXLControlNetUnionPipeline`): with one hint, the residuals are scaled by the
  unit's strength; with several, each hint's encoding, bias and token are scaled by its own strength and the
  residuals are not (a hint outside its start/end window takes strength 0 while another is inside its window).

Control types, in the order of the vector: openpose, depth, hed/pidi/scribble/ted (thick lines), canny/lineart/
anime_lineart/mlsd (thin lines), normal, segment; ProMax adds tile and repaint (inpaint/outpaint). A unit names its
type(s) (`ControlUnit.control_type`); units that share one union network are fused into one pass.

Files: the diffusers layout (`ControlNetUnionModel.save_pretrained`'s weights: xinsir's
diffusion_pytorch_model.safetensors and diffusion_pytorch_model_promax.safetensors, and this mode's export), and
Lightning checkpoints of a UnionControlLDM (`control_model.*`, our module names). xinsir ships no other layout.
"""

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from cldm.cldm import ControlLDM, ControlNet, controlnet_params
from cldm.control import (
    Contribution,
    ControlMode,
    ControlUnit,
    HintCache,
    Step,
    record,
    recorded_settings,
    repeat_to,
)
from cldm.diffusers_convert import (
    CONFIG_NAME,
    DiffusersFolder,
    find_weights,
    read_folder,
    size_embedding_width,
    unet_spec,
)
from cldm.diffusers_convert import diffusers_config as controlnet_config
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.model import CONTROL_PREFIX, LoadReport, load_checkpoint, save_state_dict
from cldm.training import weights_to_use
from ldm.checkpoint import UNET_PREFIX, read_metadata, require_finite
from ldm.modules.diffusionmodules.openaimodel import BlockHook, embed_time_and_vector
from ldm.modules.diffusionmodules.util import timestep_embedding, zero_module
from ldm.modules.encoders.modules import quick_gelu

log = logging.getLogger(__name__)

# The control types in the order of the control-type vector (xinsir's README and ProMax scripts; ComfyUI's
# SetUnionControlNetType names); a name with slashes is one type trained on several detectors' maps.
CONTROL_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal",
                 "segment", "tile", "repaint")
# Further names of a type: each detector of a slashed name, and diffusers' docs' inpaint/outpaint for repaint.
ALIASES = {part: name for name in CONTROL_TYPES for part in name.split("/")} | {
    "inpaint": "repaint", "outpaint": "repaint", "softedge": "hed/pidi/scribble/ted"}
# xinsir's and diffusers' defaults for what a file does not record (the attention's head count).
TRANSFORMER_HEADS = 8


def control_type_names(count: int) -> tuple[str, ...]:
    """The names of the first `count` control types (6 in controlnet-union-sdxl-1.0, 8 in ProMax)."""
    if count > len(CONTROL_TYPES):
        return CONTROL_TYPES + tuple(f"type {i}" for i in range(len(CONTROL_TYPES), count))
    return CONTROL_TYPES[:count]


def control_type_index(name: str, count: int) -> int:
    """The vector position of a control type named as in CONTROL_TYPES, by one of its detectors ("canny",
    "scribble", ...), or by "inpaint"; ValueError naming the choices otherwise."""
    names = control_type_names(count)
    full = ALIASES.get(name, name)
    if full not in names:
        raise ValueError(f"control type {name!r} is not one of this ControlNet-Union's {count} types: "
                         f"{', '.join(names)} (or a detector of one: {', '.join(sorted(ALIASES))})")
    return names.index(full)


def as_names(control_type: str | Sequence[str]) -> tuple[str, ...]:
    """A control type, or several (a YAML list), as a tuple of names."""
    if isinstance(control_type, ListConfig):
        control_type = OmegaConf.to_container(control_type)
    return (control_type,) if isinstance(control_type, str) else tuple(str(n) for n in control_type)


class ConditionMlp(nn.Module):
    """c_proj(quick_gelu(c_fc(x))): CLIP's feed-forward, named as in the files."""

    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ConditionTransformerBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)): CLIP's residual attention block, as xinsir's and diffusers' union
    code has it. The attention reads (batch, tokens, width) as (sequence, batch, width): see the module docstring."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = ConditionMlp(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TypeEmbedding(nn.Module):
    """linear_2(silu(linear_1(features))): diffusers' TimestepEmbedding, named as in the files."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class AddToTimeEmbedding(BlockHook):
    """Adds the control-type embedding to the timestep embedding before the vector y's (diffusers' order)."""

    def __init__(self, type_embedding: torch.Tensor):
        self.type_embedding = type_embedding

    def time_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        return emb + self.type_embedding


class Hints(NamedTuple):
    """A unit's hint in a fused pass: hint_channels per control type (in the order of `type_indices`), the unit's
    weight, and the cache its encoding is kept in while sampling."""

    hint: torch.Tensor
    type_indices: tuple[int, ...]
    weight: float = 1.0
    cache: HintCache | None = None


@dataclass(frozen=True)
class UnionStructure:
    """What a union file says of its network beyond the UNet encoder's structure."""

    hint_channels: int
    hint_block_channels: tuple[int, ...]
    num_control_type: int
    control_type_embed_dim: int
    num_trans_layer: int

    def params(self) -> dict[str, Any]:
        return {"hint_channels": self.hint_channels, "hint_block_channels": list(self.hint_block_channels),
                "num_control_type": self.num_control_type, "control_type_embed_dim": self.control_type_embed_dim,
                "num_trans_layer": self.num_trans_layer}


class UnionControlNet(ControlNet):
    """A ControlNet-Union: a ControlNet (its constructor's spec) whose hint encoder is shared by several control
    types (see the module docstring). `hint_channels` is per hint; a unit's hint holds that many channels per
    control type it names. The condition transformer's width is model_channels, as the files have it."""

    def __init__(self, image_size: int, hint_channels: int = 3, num_control_type: int = 6,
                 control_type_embed_dim: int = 256, num_trans_head: int = TRANSFORMER_HEADS, num_trans_layer: int = 1,
                 **spec):
        super().__init__(image_size, hint_channels, **spec)
        self.arguments = {"image_size": image_size, "hint_channels": hint_channels,
                          "num_control_type": num_control_type, "control_type_embed_dim": control_type_embed_dim,
                          "num_trans_head": num_trans_head, "num_trans_layer": num_trans_layer, **spec}
        width = self.model_channels
        self.hint_channels = hint_channels
        self.num_control_type = num_control_type
        self.control_type_embed_dim = control_type_embed_dim
        self.task_embedding = nn.Parameter(width ** 0.5 * torch.randn(num_control_type, width))
        self.transformer_layes = nn.Sequential(*(ConditionTransformerBlock(width, num_trans_head)
                                                 for _ in range(num_trans_layer)))
        self.spatial_ch_projs = zero_module(nn.Linear(width, width))
        self.control_add_embedding = TypeEmbedding(control_type_embed_dim * num_control_type, width * 4)
        self._hint_caches: list[HintCache] = []  # one per unit of a fused pass

    # ---- units ----

    def control_types(self) -> tuple[str, ...]:
        return control_type_names(self.num_control_type)

    def check_unit(self, unit: ControlUnit) -> None:
        if unit.control_type is None:
            raise ValueError("a ControlNet-Union unit names the control type of its hint (control_type), one of "
                             f"{', '.join(self.control_types())}")
        names = unit.control_types
        if not names:
            raise ValueError("control_type names no control type")
        for name in names:
            control_type_index(name, self.num_control_type)
        if unit.hint.dim() != 4 or unit.hint.shape[1] != self.hint_channels * len(names):
            raise ValueError(f"a ControlNet-Union hint has {self.hint_channels} channels per control type: "
                             f"{len(names)} type(s) {list(names)} need {self.hint_channels * len(names)}, the hint "
                             f"has shape {tuple(unit.hint.shape)}")

    def contribute(self, unit: ControlUnit, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None, unet: nn.Module) -> Contribution:
        return self.contribute_units([unit], None, x, timesteps, context, y, unet)

    def contribute_units(self, units: Sequence[ControlUnit], step: Step | None, x: torch.Tensor,
                         timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                         unet: nn.Module) -> Contribution:
        """One pass over the hints of all `units` (see the module docstring for the weights): nothing while every
        unit is outside its window; a unit outside its window meanwhile keeps its place at weight 0."""
        if step is None:
            active = [True] * len(units)
        else:
            active = [u.active(step) for u in units]
        if not any(active):
            return Contribution()
        while len(self._hint_caches) < len(units):
            self._hint_caches.append(HintCache())
        hints = [Hints(unit.hint, self.type_indices(unit.control_types), unit.strength if on else 0.0, cache)
                 for unit, on, cache in zip(units, active, self._hint_caches)]
        first = units[0]
        if sum(len(h.type_indices) for h in hints) == 1:
            scales = first.level_scales(self.num_residuals())
        else:
            mismatched = [u for u in units[1:] if (u.mode, u.scales, u.global_average_pooling)
                          != (first.mode, first.scales, first.global_average_pooling)]
            if mismatched:
                raise ValueError("the units of one ControlNet-Union network are fused into one pass, so they need "
                                 f"the same control mode, scales and pooling; got {first.mode!r} and "
                                 f"{mismatched[0].mode!r}")
            scales = first.level_scales(self.num_residuals(), strength=1.0)
        out = [r * s for r, s in zip(self(x, hints, timesteps, context, y), scales)]
        if first.global_average_pooling:
            out = [torch.mean(r, dim=(2, 3), keepdim=True) for r in out]
        return Contribution(residuals=out)

    def num_residuals(self) -> int:
        return len(self.zero_convs) + 1

    # ---- the network ----

    def encode_hints(self, hint: torch.Tensor, cache: HintCache | None = None) -> list[torch.Tensor]:
        """The hint encoder's output for each control type's part of `hint` (its channels in groups of
        hint_channels); kept in `cache` while sampling (see HintCache)."""
        dtype = next(self.input_hint_block.parameters()).dtype

        def encode(h: torch.Tensor) -> list[torch.Tensor]:
            return [self.input_hint_block(part.to(dtype), None, None) for part in h.split(self.hint_channels, 1)]
        return encode(hint) if cache is None else cache(hint, self.input_hint_block, encode)

    def type_embedding(self, type_indices: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """control_add_embedding of the control-type vector with 1 at `type_indices`, one row per sample."""
        vector = torch.zeros(self.num_control_type, device=x.device)
        vector[list(type_indices)] = 1.0
        features = timestep_embedding(vector, self.control_type_embed_dim).reshape(1, -1)
        return self.control_add_embedding(features.to(x.dtype)).expand(x.shape[0], -1)

    def type_indices(self, control_type: str | Sequence[str]) -> tuple[int, ...]:
        return tuple(control_type_index(name, self.num_control_type) for name in as_names(control_type))

    def residuals(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None = None, *, control_type: str | Sequence[str]) -> list[torch.Tensor]:
        """The unweighted residuals for `hint` showing `control_type` (several names: hint_channels of the hint
        each, fused at weight 1)."""
        return self(x, [Hints(hint, self.type_indices(control_type))], timesteps, context, y)

    def forward(self, x: torch.Tensor, hints: Sequence[Hints], timesteps: torch.Tensor,
                context: torch.Tensor | None, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The residuals (one per skip, then the middle's) for the hints of one or more units; with several
        control types each hint is weighted inside the fusion by its unit's weight (diffusers' multi-condition
        rule), with one it is not. The hints are encoded here, in the network's own forward (FSDP gathers its
        weights for it)."""
        conditions = [(repeat_to(encoding, x.shape[0]), index, h.weight) for h in hints
                      for encoding, index in zip(self.encode_hints(h.hint, h.cache), h.type_indices, strict=True)]
        weighted = len(conditions) > 1
        emb = embed_time_and_vector(self, x, timesteps, y, hooks=(
            AddToTimeEmbedding(self.type_embedding([index for _, index, _ in conditions], x)),))
        h = self.input_blocks[0](x, emb, context)
        tokens, encodings = [], []
        for encoding, index, weight in conditions:
            token = (torch.mean(encoding, dim=(2, 3)) + self.task_embedding[index]).unsqueeze(1)
            tokens.append(token * weight if weighted else token)
            encodings.append(encoding * weight if weighted else encoding)
        tokens.append(torch.mean(h, dim=(2, 3)).unsqueeze(1))
        mixed = self.transformer_layes(torch.cat(tokens, dim=1))
        fused = torch.zeros_like(h)
        for i, ((_, _, weight), encoding) in enumerate(zip(conditions, encodings)):
            bias = self.spatial_ch_projs(mixed[:, i]).unsqueeze(-1).unsqueeze(-1)
            fused = fused + (encoding + (bias * weight if weighted else bias))
        return self.encoder_residuals(h + fused, emb, context)

    def structure(self) -> UnionStructure:
        convs = [m for m in self.input_hint_block if isinstance(m, nn.Conv2d)]
        return UnionStructure(self.hint_channels, tuple(c.out_channels for c in convs[:-1])[0::2],
                              self.num_control_type, self.control_type_embed_dim, len(self.transformer_layes))

    def rebuilt(self, structure: UnionStructure, heads: int | None = None) -> "UnionControlNet":
        """A new network of this one's UNet structure with `structure`'s, and this one's heads unless `heads` are
        given, on this one's device."""
        with torch.device(next(self.parameters()).device):
            return UnionControlNet(**{**self.arguments, **structure.params(),
                                      **({"num_trans_head": heads} if heads is not None else {})})


# ---- files ------------------------------------------------------------------------------------------------

# layout -> keys only a union file holds (its type embedding), as that layout names them
UNION_LAYOUTS = {
    "diffusers": ("task_embedding", "control_add_embedding.linear_1.weight",
                  "controlnet_cond_embedding.conv_in.weight"),
    "checkpoint": (f"{CONTROL_PREFIX}task_embedding", f"{CONTROL_PREFIX}control_add_embedding.linear_1.weight",
                   f"{CONTROL_PREFIX}input_hint_block.0.weight"),
}
DIFFUSERS_HINT_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$")
LDM_HINT_BLOCK = re.compile(r"input_hint_block\.(\d+)\.weight$")
TRANSFORMER_LAYER = re.compile(r"transformer_layes\.(\d+)\.")


def numbered(keys: Iterable[str], pattern: re.Pattern) -> list[str]:
    """The keys matching `pattern`, in the order of the number its first group captures."""
    found = [(int(m[1]), key) for key in keys if (m := pattern.match(key))]
    return [key for _, key in sorted(found)]


def file_structure(weights: Mapping[str, torch.Tensor], layout: str) -> UnionStructure:
    """The structure a union file's tensors (unprefixed, in `layout`'s names) record."""
    if layout == "diffusers":
        keys = ["controlnet_cond_embedding.conv_in.weight", *numbered(weights, DIFFUSERS_HINT_BLOCK),
                "controlnet_cond_embedding.conv_out.weight"]
    else:
        keys = numbered(weights, LDM_HINT_BLOCK)
    outs = [weights[k].shape[0] for k in keys]
    types, width = weights["task_embedding"].shape
    features = weights["control_add_embedding.linear_1.weight"].shape[1]
    if features % types:
        raise ValueError(f"control_add_embedding.linear_1 takes {features} features, not a multiple of the "
                         f"{types} control types of task_embedding")
    layers = {int(m[1]) for k in weights if (m := TRANSFORMER_LAYER.match(k))}
    return UnionStructure(int(weights[keys[0]].shape[1]), tuple(outs[:-1])[0::2], int(types), features // types,
                          len(layers))


def ldm_weights(weights: Mapping[str, torch.Tensor], net: UnionControlNet) -> dict[str, torch.Tensor]:
    """diffusers-named union tensors under our module names (the union's own modules have the same names)."""
    table = {new: old for old, new in diffusers_module_names(net).items()}
    return {rename_module(k, table): v for k, v in weights.items()}


def diffusers_weights(net: UnionControlNet) -> dict[str, torch.Tensor]:
    """The network's tensors under diffusers' ControlNetUnionModel names."""
    table = diffusers_module_names(net)
    return {rename_module(k, table): v for k, v in net.state_dict().items()}


def unprefixed(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "checkpoint":
        return {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    return dict(state_dict)


def load_into(net: UnionControlNet, weights: Mapping[str, torch.Tensor], layout: str) -> None:
    """A file's tensors (unprefixed) into a network of their structure, strictly; ValueError naming what differs."""
    named = ldm_weights(weights, net) if layout == "diffusers" else dict(weights)
    report = load_checkpoint(net, named)
    if not report.ok:
        raise ValueError(f"its weights do not match: {report}")


# What our files record besides their tensors (ControlMode.recorded): the condition transformer's heads.
RECORDED_KEY, RECORDED = "controlnet_union", ("num_trans_head",)


def recorded_heads(recorded: Mapping[str, str] | None) -> int | None:
    """The condition transformer's heads a file recorded, None when it recorded none."""
    return recorded_settings(recorded, RECORDED_KEY, RECORDED).get("num_trans_head")


def union_network(state_dict: Mapping[str, torch.Tensor], config: DictConfig, device: torch.device | str,
                  heads: int | None = None) -> UnionControlNet:
    """The network of a union file (either layout) on `device`: the file's structure on the encoder of the model
    of `config` (its control network's spec, or its UNet's); the attention's `heads` as the file recorded them,
    else the config's (default 8, xinsir's)."""
    layout = CONTROLNET_UNION.layout(state_dict)
    weights = unprefixed(state_dict, layout)
    if heads is None:
        heads = (config.model.params.control_stage_config.get("params") or {}).get("num_trans_head",
                                                                                    TRANSFORMER_HEADS)
    params = controlnet_params(config) | file_structure(weights, layout).params() | {"num_trans_head": heads}
    with torch.device(device):
        net = UnionControlNet(**params)
    load_into(net, weights, layout)
    return net


def network_for_config(state_dict: Mapping[str, torch.Tensor], config_path: str | os.PathLike,
                       source: str | os.PathLike) -> UnionControlNet:
    """The union network of the file `source` (its tensors `state_dict`, its recorded heads) on the CPU, for the
    model of `config_path`; ValueError naming both if it does not fit."""
    try:
        return union_network(state_dict, OmegaConf.load(config_path), "cpu", recorded_heads(read_metadata(source)))
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{source} does not fit the model of --config {config_path}: {err}") from err


# config.json fields a folder must agree on with its weights and the YAML (the rest follow from the tensors)
CHECKED_FIELDS = ("num_control_type", "num_trans_head", "addition_time_embed_dim", "block_out_channels",
                  "cross_attention_dim", "layers_per_block", "global_pool_conditions")


class UnionMode(ControlMode):
    """ControlNet-Union files: diffusers' ControlNetUnionModel layout (xinsir's files, this mode's export) or a
    UnionControlLDM checkpoint (`control_model.*`); the number of control types, the hint encoder's widths and the
    transformer's depth are read from the tensors, the encoder copy must fit the model's config."""

    name = "controlnet-union"
    files = ("a ControlNet-Union (xinsir's controlnet-union-sdxl-1.0 / ProMax, diffusers' ControlNetUnionModel "
             "names: task_embedding, transformer_layes.*, control_add_embedding.*)")

    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        return next((name for name, keys in UNION_LAYOUTS.items() if all(k in state_dict for k in keys)), None)

    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> UnionControlNet:
        return union_network(state_dict, config, next(model.model.diffusion_model.parameters()).device,
                             recorded_heads(recorded))

    def export(self, model: "UnionControlLDM") -> dict[str, torch.Tensor]:
        """diffusers' ControlNetUnionModel weights (what diffusers, ComfyUI and the A1111 extension load); with
        sd_locked False the checkpoint layout (`control_model.*`) and the UNet decoder trained with it, which the
        diffusers layout cannot hold."""
        if model.sd_locked:
            return diffusers_weights(model.control_model)
        unet = model.model.diffusion_model
        return ({CONTROL_PREFIX + k: v for k, v in model.control_model.state_dict().items()}
                | {f"{UNET_PREFIX}{part}.{k}": v for part in ("output_blocks", "out")
                   for k, v in unet.get_submodule(part).state_dict().items()})

    def recorded(self, model: "UnionControlLDM") -> dict[str, str]:
        """The condition transformer's heads (diffusers' num_trans_head, 8 in xinsir's files)."""
        return union_record(model.control_model)

    def load(self, model: "UnionControlLDM", state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        """The file's network into the model's: in place when their structures agree, else as a new network of
        the file's structure (e.g. ProMax's 8 types into a 6-type config; do this before training starts). A
        checkpoint layout's UNet decoder keys are not the control file's and load by name (load_checkpoint)."""
        layout = self.layout(state_dict)
        weights = unprefixed(state_dict, layout)
        own = model.control_model
        structure = file_structure(weights, layout)
        heads = recorded_heads(recorded)
        if structure != own.structure() or heads not in (None, own.arguments["num_trans_head"]):
            net = own.rebuilt(structure, heads)
            load_into(net, weights, layout)
            model.replace_control_model(net)
        else:
            load_into(own, weights, layout)
        decoder = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
        return load_checkpoint(model, decoder, prefixes=(UNET_PREFIX,)) if decoder else LoadReport()

    def to_diffusers(self, source: str | os.PathLike, out_dir: str | os.PathLike, config: str | os.PathLike,
                     force: bool = False) -> Path:
        """A union file (this mode's export, a Lightning checkpoint, or diffusers' weights alone) -> a diffusers
        ControlNetUnionModel folder: config.json and diffusion_pytorch_model.safetensors."""
        folder = DiffusersFolder(out_dir, force)
        state_dict = weights_to_use(source)
        if self.layout(state_dict) is None:
            raise ValueError(f"{source} holds no ControlNet-Union weights: expected {self.files}")
        net = network_for_config(state_dict, config, source)
        require_finite(net.state_dict(), source)
        return folder.write(diffusers_weights(net), diffusers_config(config, net))

    def from_diffusers(self, source: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike,
                       force: bool = False) -> Path:
        """A diffusers ControlNetUnionModel folder -> its weights as one file, checked against the config (the
        layout this project, ComfyUI and the A1111 extension load as they are)."""
        state_dict, found = read_folder(source, "ControlNetUnionModel")
        weights_file = find_weights(Path(source))
        require_finite(state_dict, weights_file)
        if self.layout(state_dict) != "diffusers":
            raise ValueError(f"{weights_file} holds no ControlNetUnionModel weights: expected {self.files}")
        net = network_for_config(state_dict, config, weights_file)
        expected = diffusers_config(config, net)
        differs = [f"{k}: the folder has {found[k]}, its weights and the --config give {expected[k]}"
                   for k in CHECKED_FIELDS if k in found and found[k] != expected[k]]
        if differs:
            raise ValueError(f"{Path(source) / CONFIG_NAME} describes another ControlNet-Union (right --config?): "
                             + "; ".join(differs))
        return save_state_dict(diffusers_weights(net), out, force=force, metadata=union_record(net))


CONTROLNET_UNION = UnionMode()


def union_record(net: UnionControlNet) -> dict[str, str]:
    """What a file of `net` records besides its tensors."""
    return record(RECORDED_KEY, {"num_trans_head": net.arguments["num_trans_head"]})


class UnionControlLDM(ControlLDM):
    """ControlLDM steered by a ControlNet-Union; `control_type` names what the training data's hints show (one
    name, or several with 3 hint channels each), the type of the model's own unit (`model.unit`).

    Its initial checkpoint comes from tool_add_control.py, as a ControlNet's: the copy starts as the UNet's
    conv_in, time embedding, input blocks and middle block (diffusers' ControlNetUnionModel.from_unet, which, unlike
    ControlNetModel.from_unet, leaves the vector embedding `label_emb` / add_embedding at its fresh initialisation);
    the union's own modules start as their constructors make them.
    """

    control_mode = CONTROLNET_UNION
    unet_copy_prefixes = ("time_embed.", "input_blocks.", "middle_block.")

    def __init__(self, *args, control_type: str | Sequence[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if control_type is None:
            raise ValueError("a ControlNet-Union model needs model.params.control_type in its config (or "
                             "--control_type): what the hints show, one of "
                             f"{', '.join(self.control_model.control_types())}")
        self.control_type = as_names(control_type)
        for name in self.control_type:
            control_type_index(name, self.control_model.num_control_type)

    def make_control_model(self, control_stage_config: Any) -> UnionControlNet:
        net = super().make_control_model(control_stage_config)
        if not isinstance(net, UnionControlNet):
            raise ValueError("UnionControlLDM needs control_stage_config target cldm.controlnet_union.UnionControlNet,"
                             f" got {type(net).__name__}")
        return net

    def replace_control_model(self, net: UnionControlNet) -> None:
        """As ControlLDM's, once the model's control types are checked to be among `net`'s."""
        for name in self.control_type:
            control_type_index(name, net.num_control_type)
        super().replace_control_model(net)

    def unit(self, hint: torch.Tensor, strength: float = 1.0, start: float = 0.0, end: float = 1.0,
             mode: str = "balanced", scales: list[float] | None = None) -> ControlUnit:
        return ControlUnit(self.control_model, hint, strength=strength, start=start, end=end, mode=mode,
                           global_average_pooling=self.global_average_pooling, scales=scales,
                           control_type=self.control_type)


def control_type_params(config: str | os.PathLike, control_type: str | None) -> dict[str, Any]:
    """create_model's params for a command line's --control_type (a name, or names joined by commas): {} when not
    given; ValueError when the config is no ControlNet-Union's."""
    if control_type is None:
        return {}
    target = OmegaConf.load(config).model.target
    if target != f"{__name__}.{UnionControlLDM.__name__}":
        raise ValueError(f"--control_type applies to ControlNet-Union configs (models/*_union.yaml); {config} "
                         f"builds a {target}")
    names = [n.strip() for n in control_type.split(",")]
    return {"control_type": names[0] if len(names) == 1 else names}


# ---- diffusers folders (tool_convert_diffusers.py) ----------------------------------------------------------

def diffusers_config(config_path: str | os.PathLike, net: UnionControlNet) -> dict[str, Any]:
    """config.json of the ControlNetUnionModel equal to `net` on the base of the YAML `config_path`."""
    params = OmegaConf.load(config_path).model.params
    size_dim = size_embedding_width(params)
    if size_dim not in (None, net.control_type_embed_dim):
        raise ValueError(f"diffusers' ControlNetUnionModel embeds the control types with the size embedding's width "
                         f"(addition_time_embed_dim {size_dim}); this network uses {net.control_type_embed_dim}")
    spec = {k: v for k, v in net.arguments.items() if k not in ("image_size", "hint_channels", "num_control_type",
                                                                "control_type_embed_dim", "num_trans_head",
                                                                "num_trans_layer", "hint_block_channels")}
    structure = net.structure()
    config = controlnet_config(unet_spec(spec), structure.hint_channels, list(structure.hint_block_channels),
                               bool(params.get("global_average_pooling", False)), size_dim)
    config.pop("mid_block_type")
    return config | {"_class_name": "ControlNetUnionModel", "addition_time_embed_dim": net.control_type_embed_dim,
                     "num_control_type": net.num_control_type, "num_trans_channel": net.model_channels,
                     "num_trans_head": net.arguments["num_trans_head"], "num_trans_layer": structure.num_trans_layer,
                     "num_proj_channel": net.model_channels}


__all__ = ["CONTROLNET_UNION", "CONTROL_TYPES", "UnionControlLDM", "UnionControlNet", "UnionMode",
           "control_type_index", "control_type_names", "control_type_params"]

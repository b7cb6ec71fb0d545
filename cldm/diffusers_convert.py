"""ControlNet weights between the original layout and a diffusers `ControlNetModel` folder.

The key mapping is derived from the YAML's control_stage_config (levels, blocks per level, attention levels,
heads, projection type, SDXL's size embedding); diffusers is not imported. Tensors are renamed, never changed,
so a round trip is bit-exact. tool_convert_diffusers.py is the command line.
"""
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cldm.cli import refuse_existing
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.model import CONTROL_PREFIX, load_state_dict, save_state_dict
from cldm.training import weights_to_use
from ldm.checkpoint import require_finite, write_text
from ldm.modules.diffusionmodules.openaimodel import UNetSpec
from ldm.util import get_obj_from_str

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "models" / "cldm_v15.yaml"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONTROLNET_TARGET = "cldm.cldm.ControlNet"  # the one control network diffusers' ControlNetModel expresses
# Weight files a diffusers ControlNet folder may hold, in the order they are preferred.
WEIGHTS_CANDIDATES = (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.bin")
# The diffusers release whose ControlNetModel layout this mapping was checked against.
DIFFUSERS_VERSION = "0.42.1"
# ResBlock submodules -> their diffusers ResnetBlock2D names.
# ControlNet.make_hint_block: 8 convs at even indices of input_hint_block, SiLUs between them.
HINT_CONVS = 8
# config.json fields that change nothing our model computes: fp16 attention upcasting (ours runs SDPA at the
# model's dtype) and bookkeeping.
IGNORED_CONFIG_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "upcast_attention")


@dataclass
class Mapping:
    """Original control key (no `control_model.` prefix) -> diffusers key; original shapes; config.json."""

    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    config: dict


@dataclass
class ControlConfig:
    """What the conversion reads from a ControlLDM YAML."""

    params: dict  # control_stage_config params
    pooled: bool  # global_average_pooling of the residuals
    size_embed_dim: int | None  # width of each size number's embedding in the vector y (SDXL), else None


def size_embedding_width(params: DictConfig) -> int | None:
    """outdim of the conditioner's size embedders (diffusers' addition_time_embed_dim), None without them."""
    models = params.get("conditioner_config", {}).get("params", {}).get("emb_models", [])
    widths = {m.params.outdim for m in models if m.target.endswith(".ConcatTimestepEmbedderND")}
    if len(widths) > 1:
        raise ValueError(f"the size embedders have different widths {sorted(widths)}; diffusers' text_time "
                         "embedding has one addition_time_embed_dim")
    return widths.pop() if widths else None


def read_control_config(config_path: str | os.PathLike) -> ControlConfig:
    """control_stage_config params of a ControlLDM YAML, whether its residuals are average-pooled, and the
    width of its size embeddings."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"Model config not found: {config_path}")
    params = OmegaConf.load(config_path).get("model", {}).get("params", {})
    if "control_stage_config" not in params:
        raise ValueError(f"{config_path} has no model.params.control_stage_config")
    control = params.control_stage_config
    if control.target != CONTROLNET_TARGET:
        raise ValueError(f"{config_path}: control model {control.target} has no diffusers ControlNetModel "
                         f"equivalent; only {CONTROLNET_TARGET} converts")
    return ControlConfig(OmegaConf.to_container(control.params), bool(params.get("global_average_pooling", False)),
                         size_embedding_width(params))


def unet_spec(params: dict) -> UNetSpec:
    """The encoder spec of a ControlNet, refused where diffusers' ControlNetModel cannot express it."""
    spec = UNetSpec(**{k: v for k, v in params.items()
                       if k not in ("image_size", "hint_channels", "num_heads_upsample")})
    unsupported = {
        "use_scale_shift_norm": spec.use_scale_shift_norm,
        "resblock_updown": spec.resblock_updown,
        "conv_resample: False": not spec.conv_resample,
        "dims other than 2": spec.dims != 2,
        "num_attention_blocks": spec.num_attention_blocks is not None,
        "disable_self_attentions": any(spec.disable_self_attentions or ()),
        "disable_middle_self_attn": spec.disable_middle_self_attn,
        "num_res_blocks that differ per level": len(set(spec.num_res_blocks)) > 1,
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise ValueError(f"diffusers' ControlNetModel cannot express: {', '.join(refused)}")
    return spec


def heads_per_level(spec: UNetSpec) -> list[int]:
    if spec.num_head_channels == -1:
        return [spec.num_heads] * len(spec.channel_mult)
    return [spec.model_channels * mult // spec.num_head_channels for mult in spec.channel_mult]


def diffusers_config(spec: UNetSpec, hint_channels: int, hint_widths: list[int], pooled: bool,
                     size_embed_dim: int | None = None) -> dict:
    """config.json of the equivalent ControlNetModel, with every argument its __init__ takes.

    A vector-conditioned ControlNet (SDXL) maps to diffusers' "text_time" addition embedding: the vector y is
    the pooled text followed by the size numbers' embeddings, which diffusers builds from `text_embeds` and
    `time_ids` with `add_time_proj` of width addition_time_embed_dim.
    """
    attention = [2 ** level in spec.attention_resolutions for level in range(len(spec.channel_mult))]
    depths = list(spec.transformer_depth)
    vector = spec.num_classes == "sequential"
    if vector and size_embed_dim is None:
        raise ValueError("a vector-conditioned ControlNet needs the config's size embedders "
                         "(conditioner_config ConcatTimestepEmbedderND) for diffusers' addition_time_embed_dim")
    return {
        "_class_name": "ControlNetModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "addition_embed_type": "text_time" if vector else None,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": size_embed_dim if vector else None,
        # diffusers' historical name: with num_heads (SD1.x) it holds the head count, not the head width.
        "attention_head_dim": spec.num_heads if spec.num_head_channels == -1 else heads_per_level(spec),
        "block_out_channels": [spec.model_channels * mult for mult in spec.channel_mult],
        "class_embed_type": None,
        "conditioning_channels": hint_channels,
        "conditioning_embedding_out_channels": hint_widths,
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": spec.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if attends else "DownBlock2D" for attends in attention],
        "downsample_padding": 1,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "global_pool_conditions": pooled,
        "in_channels": spec.in_channels,
        "layers_per_block": spec.num_res_blocks[0],
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": spec.adm_in_channels if vector else None,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "upcast_attention": False,
        "use_linear_projection": bool(spec.use_linear_in_transformer),
    }


def build_mapping(config_path: str | os.PathLike = DEFAULT_CONFIG) -> Mapping:
    """The full key mapping and config.json for the ControlNet of a ControlLDM YAML."""
    control = read_control_config(config_path)
    params = control.params
    spec = unet_spec(params)
    # Built on the meta device only for its key names and shapes: no memory, no init time.
    with torch.device("meta"):
        net = get_obj_from_str(CONTROLNET_TARGET)(**params)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    keys = {k: rename_module(k, diffusers_module_names(net)) for k in shapes}
    unmapped = [k for k, v in keys.items() if v == k]
    if unmapped:
        raise ValueError(f"No diffusers name for {len(unmapped)} keys of {config_path}, e.g. {unmapped[:5]}")
    # The widths set by conv_in and the stride-2 convs: diffusers' conditioning_embedding_out_channels.
    hint_widths = [shapes[f"input_hint_block.{2 * n}.weight"][0] for n in range(0, HINT_CONVS - 1, 2)]
    config = diffusers_config(spec, params["hint_channels"], hint_widths, control.pooled, control.size_embed_dim)
    return Mapping(keys, shapes, config)


def check_weights(found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise with the names of missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {tuple(v.shape)}, config wants {expected[k]}"
             for k, v in found.items() if k in expected and tuple(v.shape) != expected[k]]
    problems = ([f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
                + [f"wrong shape {w}" for w in wrong])
    if problems:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape"
        raise ValueError(f"{source} does not match the config ({counts}; right --config?): "
                         + "; ".join(problems[:5]) + "; ..." * (len(problems) > 5))


def control_weights(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors, unprefixed: from a full ControlLDM, a control_model.* file or a bare one."""
    control = {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if control:
        return control
    if "input_hint_block.0.weight" in state_dict:
        return dict(state_dict)
    raise ValueError(f"{source} has no ControlNet weights: no `control_model.*` keys and no "
                     "`input_hint_block.0.weight`")


def to_diffusers(state_dict: dict[str, torch.Tensor], mapping: Mapping,
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel state dict of a ControlLDM / control_model.* state dict (same tensors)."""
    control = control_weights(state_dict, source)
    check_weights(control, mapping.shapes, source)
    return {mapping.keys[k]: v for k, v in control.items()}


def from_diffusers(state_dict: dict[str, torch.Tensor], mapping: Mapping,
                   source: str = "diffusers weights") -> dict[str, torch.Tensor]:
    """control_model.* state dict of a diffusers ControlNetModel state dict (same tensors)."""
    original = {new: old for old, new in mapping.keys.items()}
    check_weights(state_dict, {new: mapping.shapes[old] for new, old in original.items()}, source)
    return {CONTROL_PREFIX + original[k]: v for k, v in state_dict.items()}


def comparable(config: dict) -> dict:
    """Fields of a config.json that decide the computation, with diffusers' shorthand forms expanded."""
    levels = len(config["down_block_types"])
    out = {k: v for k, v in config.items() if k not in IGNORED_CONFIG_FIELDS}
    heads, head_dim = out.pop("num_attention_heads", None), out.pop("attention_head_dim")
    # Without num_attention_heads, diffusers reads attention_head_dim as the head count.
    heads = heads or head_dim
    depth = out["transformer_layers_per_block"]
    out["heads per level"] = [heads] * levels if isinstance(heads, int) else list(heads)
    out["transformer_layers_per_block"] = [depth] * levels if isinstance(depth, int) else list(depth)
    return out


# Fields diffusers' ControlNetModel takes as one value for every level or as a list with one per level.
PER_LEVEL_FIELDS = ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
                    "only_cross_attention")
JSON_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
                   list: "a list"}


def json_types(key: str, ours: object) -> tuple[type, ...]:
    """The JSON types field `key` of a config.json may hold where our config holds `ours`."""
    if key in PER_LEVEL_FIELDS:
        return (bool, list) if isinstance(ours, bool) else (int, list)
    if isinstance(ours, float):
        return (int, float)
    return (type(ours),)


def wrong_type(key: str, value: object, ours: object) -> str | None:
    """What is wrong with the type of a config.json field (bool is no number here), or None."""
    kinds = json_types(key, ours)
    if (bool in kinds) if isinstance(value, bool) else isinstance(value, kinds):
        return None
    return f"{key} is {json.dumps(value)}, expected {' or '.join(JSON_TYPE_NAMES[t] for t in kinds)}"


def read_config_json(path: Path) -> dict:
    """A config.json's fields, or an error naming the file and what is wrong with it."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): not a diffusers config.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path} holds a JSON {type(found).__name__}, not the object of a diffusers config.json")
    return found


def check_config(found: dict, expected: dict, source: str) -> None:
    """Raise if a diffusers config.json describes another model than the YAML (omitted fields pass)."""
    if found.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{source} is a {found['_class_name']}, not a ControlNetModel")
    wrong = [problem for k, v in found.items() if expected.get(k) is not None and k not in IGNORED_CONFIG_FIELDS
             and (problem := wrong_type(k, v, expected[k])) is not None]
    if wrong:
        raise ValueError(f"{source}: {'; '.join(wrong)}, as a ControlNetModel config.json has it")
    want = comparable(expected)
    have = comparable({**expected, **found})
    diffs = [f"{k}: folder has {have[k]}, config gives {v}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ValueError(f"{source} describes another ControlNet than the --config (right --config?): "
                         + "; ".join(diffs))


class DiffusersFolder:
    """A diffusers `save_pretrained` folder to write, config.json and the weights: refused before any slow work where
    it is a file or its files exist (without force), and written whole or not at all."""

    def __init__(self, folder: str | os.PathLike, force: bool = False):
        self.folder, self.force = Path(folder), force
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file; to-diffusers writes a folder (config.json and weights)")
        self.targets = (self.folder / WEIGHTS_NAME, self.folder / CONFIG_NAME)
        existing = [str(p) for p in self.targets if p.exists()]
        if existing and not force:
            raise FileExistsError(f"{', '.join(existing)} already exists; pass --force to overwrite")

    def write(self, weights: dict[str, torch.Tensor], config: dict) -> Path:
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        try:  # weights first: a folder with a config.json is a finished export
            written.append(save_state_dict(weights, self.targets[0], force=self.force))
            written.append(write_text(self.targets[1], json.dumps(config, indent=2) + "\n"))
        except BaseException:  # nothing partial: what this call wrote goes, and the folder if it made it
            for path in written:
                path.unlink()
            if created:
                shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return self.folder


def convert_to_diffusers(in_path: str | os.PathLike, out_dir: str | os.PathLike,
                         config_path: str | os.PathLike = DEFAULT_CONFIG, force: bool = False) -> Path:
    """Write OUT_DIR/config.json and OUT_DIR/diffusion_pytorch_model.safetensors from original weights."""
    folder = DiffusersFolder(out_dir, force)
    mapping = build_mapping(config_path)
    weights = to_diffusers(weights_to_use(in_path), mapping, source=str(in_path))
    require_finite(weights, in_path)  # the ControlNet's: a whole checkpoint's other parts are not converted
    return folder.write(weights, mapping.config)


def find_weights(in_dir: Path) -> Path:
    for name in WEIGHTS_CANDIDATES:
        if (in_dir / name).is_file():
            return in_dir / name
    raise FileNotFoundError(f"{in_dir} holds none of {', '.join(WEIGHTS_CANDIDATES)}")


def read_folder(in_dir: str | os.PathLike, class_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the config.json fields of a diffusers `save_pretrained` folder of `class_name` (the adapters'
    folders; the class is checked before the weights are read)."""
    in_dir = Path(in_dir)
    config_file = in_dir / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a diffusers {class_name} folder holds one")
    config = read_config_json(config_file)
    if config.get("_class_name", class_name) != class_name:
        raise ValueError(f"{config_file} is a {config['_class_name']}, not a {class_name}")
    return load_state_dict(find_weights(in_dir)), config


def convert_from_diffusers(in_dir: str | os.PathLike, out_path: str | os.PathLike,
                           config_path: str | os.PathLike = DEFAULT_CONFIG, force: bool = False) -> Path:
    """Write a control_model.* checkpoint from a diffusers ControlNet folder."""
    in_dir, out_path = Path(in_dir), Path(out_path)
    refuse_existing(out_path, force)
    config_file = in_dir / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: IN_DIR must be a diffusers ControlNet folder")
    mapping = build_mapping(config_path)
    check_config(read_config_json(config_file), mapping.config, str(config_file))
    weights_file = find_weights(in_dir)
    state_dict = load_state_dict(weights_file)
    require_finite(state_dict, weights_file)
    weights = from_diffusers(state_dict, mapping, source=str(weights_file))
    return save_state_dict(weights, out_path, force=force)

"""kohya's dataset config file (sd-scripts' `--dataset_config`), read as its ControlNet and ControlNet-LLLite
training reads one: a TOML (or JSON) file of `[general]`, `[[datasets]]` and `[[datasets.subsets]]`.

    [general]
    shuffle_caption = true
    caption_extension = ".txt"
    keep_tokens = 1

    [[datasets]]
    resolution = 512
    batch_size = 4
    enable_bucket = true

      [[datasets.subsets]]
      image_dir = "train/images"
      conditioning_data_dir = "train/canny"
      num_repeats = 2
      flip_aug = true

A setting is looked up in the subset, then its dataset, then [general], then the command line (where the option
exists here), then kohya's default; a value given both in the file and on the command line must agree. Keys are
kohya's and mean what they mean there (docs/data.md lists each); a key kohya refuses, or one that would change
training in a way not built here, is refused by name, never passed over. Per-dataset settings (resolution,
buckets, batch size) must be the same in every [[datasets]]: one run trains at one bucket scheme here.
Relative folders are taken from the working directory, as kohya does.
"""
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from cldm.data.augment import ImageAugmentation
from cldm.data.buckets import KohyaBuckets
from cldm.data.captions import CaptionOptions
from cldm.data.images import Resize
from cldm.data.kohya import KohyaSubset

log = logging.getLogger(__name__)

LATENT_STEP = 8  # bucket sides must be whole latents (the VAE's factor)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _rate(v: Any) -> bool:
    return _number(v) and 0.0 <= v <= 1.0


def _resolution(v: Any) -> bool:
    return (_int(v) and v >= 8) or (isinstance(v, list) and len(v) == 2 and all(_int(s) and s >= 8 for s in v))


# key: (check, what it must be, kohya's default) for the keys a subset may set (also at dataset and general level)
SUBSET_KEYS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "caption_extension": (_str, "a text", ".caption"),
    "num_repeats": (_int, "a whole number", 1),
    "shuffle_caption": (_bool, "true or false", False),
    "caption_separator": (lambda v: _str(v) and bool(v), "a non-empty text", ","),
    "keep_tokens": (lambda v: _int(v) and v >= 0, "a whole number, 0 or more", 0),
    "keep_tokens_separator": (_str, "a text", ""),
    "secondary_separator": (_str, "a text", ""),
    "enable_wildcard": (_bool, "true or false", False),
    "caption_prefix": (_str, "a text", ""),
    "caption_suffix": (_str, "a text", ""),
    "caption_dropout_rate": (_rate, "a number from 0 to 1", 0.0),
    "caption_tag_dropout_rate": (_rate, "a number from 0 to 1", 0.0),
    "flip_aug": (_bool, "true or false", False),
    "color_aug": (_bool, "true or false", False),
    # accepted, with no effect on ControlNet training in kohya either
    "cache_info": (_bool, "true or false", False),
    "custom_attributes": (lambda v: isinstance(v, dict), "a table", None),
    "token_warmup_min": (_int, "a whole number", 1),
    "validation_seed": (_int, "a whole number", None),
    # refused unless at kohya's default (REFUSED says why)
    "random_crop": (_bool, "true or false", False),
    "face_crop_aug_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_number, v)),
                            "two numbers", None),
    "caption_dropout_every_n_epochs": (lambda v: _int(v) and v >= 0, "a whole number, 0 or more", 0),
    "token_warmup_step": (lambda v: _number(v) and v >= 0, "a number, 0 or more", 0),
    "resize_interpolation": (_str, "a text", None),
    "validation_split": (_rate, "a number from 0 to 1", 0.0),
}
# keys of a dataset (also at general level), one value per run here
DATASET_KEYS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "resolution": (_resolution, "a number of pixels or [width, height]", None),
    "batch_size": (lambda v: _int(v) and v >= 1, "a whole number, 1 or more", None),
    "enable_bucket": (_bool, "true or false", False),
    "min_bucket_reso": (lambda v: _int(v) and v >= 8, "a number of pixels", 256),
    "max_bucket_reso": (lambda v: _int(v) and v >= 8, "a number of pixels", 1024),
    "bucket_reso_steps": (lambda v: _int(v) and v > 0 and v % LATENT_STEP == 0, f"a multiple of {LATENT_STEP}", 64),
    "bucket_no_upscale": (_bool, "true or false", False),
    "network_multiplier": (_number, "a number", 1.0),
}
SUBSET_ONLY_KEYS = ("image_dir", "conditioning_data_dir")  # required, and only in [[datasets.subsets]]
REFUSED = {
    "random_crop": "kohya's ControlNet training refuses it too (the crop is centred, so hint and image stay aligned)",
    "face_crop_aug_range": "face crops are not built here",
    "caption_dropout_every_n_epochs": "dropping every caption in chosen epochs is not built here; use "
                                      "caption_dropout_rate or --drop_prompt_rate",
    "token_warmup_step": "token warm-up is not built here",
    "resize_interpolation": "images are resized here with area averaging to shrink and bicubic to enlarge; the "
                            "interpolation cannot be chosen",
    "validation_split": "a validation split is not made here: keep held-out images in another folder and pass "
                        "--val_data",
    "network_multiplier": "it scales a LoRA network in kohya's network training, not a ControlNet",
}
NO_EFFECT = ("cache_info", "custom_attributes", "token_warmup_min", "validation_seed")


class DatasetConfigError(ValueError):
    """A dataset config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class DatasetConfig:
    """What a dataset config gives the reader and the loader."""

    subsets: list[KohyaSubset]
    resize: Resize
    batch_size: int | None  # None: set nowhere (the command line's --batch_size then)


def load_config_file(path: Path) -> dict:
    """The file's table, read as TOML or (ending .json) JSON, as kohya's load_user_config does."""
    if not path.is_file():
        raise DatasetConfigError(f"--dataset_config {path} not found")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {err}") from None
    raise DatasetConfigError(f"--dataset_config {path}: expected a .toml or .json file, as kohya's")


def read_dataset_config(path: str | Path, command_line: dict[str, Any] | None = None) -> DatasetConfig:
    """The subsets and sizing of a kohya dataset config. `command_line` holds the values given on the command
    line for keys it shares (resolution, caption_extension, batch_size); DatasetConfigError names what is wrong."""
    path = Path(path)
    table = load_config_file(path)
    command_line = command_line or {}
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{path}: expected a table of [general] and [[datasets]]")
    for key in table:
        if key not in ("general", "datasets"):
            raise DatasetConfigError(f"{path}: unknown key {key!r} at the top; a dataset config holds [general] "
                                     "and [[datasets]] (kohya's training options go on the command line)")
    general = _checked(path, table.get("general", {}), "general", {**SUBSET_KEYS, **DATASET_KEYS})
    datasets = table.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"{path}: no [[datasets]]")
    subsets, per_dataset = [], []
    for i, dataset in enumerate(datasets):
        where = f"datasets[{i}]"
        dataset = _checked(path, dataset, where, {**SUBSET_KEYS, **DATASET_KEYS}, subsets_allowed=True)
        entries = dataset.get("subsets", [])
        if not isinstance(entries, list) or not entries:
            raise DatasetConfigError(f"{path}: {where} has no [[datasets.subsets]]")
        levels = [dataset, general, command_line]
        per_dataset.append((where, {key: _setting(path, where, key, levels) for key in DATASET_KEYS}))
        for j, entry in enumerate(entries):
            subset_where = f"{where}.subsets[{j}]"
            entry = _checked(path, entry, subset_where, SUBSET_KEYS, subset=True)
            subsets.append(_subset(path, subset_where, [entry, *levels]))
    settings = _one_setting_per_run(path, per_dataset)
    return DatasetConfig(subsets, _resize(path, settings), settings["batch_size"])


def _checked(path: Path, table: Any, where: str, allowed: dict, subsets_allowed: bool = False,
             subset: bool = False) -> dict:
    """`table` with each key known at this level and of its type; DatasetConfigError naming the key otherwise."""
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{path}: {where} must be a table")
    for key, value in table.items():
        if key == "subsets" and subsets_allowed:
            continue
        if key in SUBSET_ONLY_KEYS and subset:
            if not isinstance(value, str) or not value:
                raise DatasetConfigError(f"{path}: {where}.{key} must be a folder, got {value!r}")
            continue
        if key in SUBSET_ONLY_KEYS:
            raise DatasetConfigError(f"{path}: {where}.{key}: {key} belongs in [[datasets.subsets]], as in kohya")
        if key in DATASET_KEYS and key not in allowed:
            raise DatasetConfigError(f"{path}: {where}.{key}: {key} belongs in [[datasets]] or [general], as in "
                                     "kohya")
        if key not in allowed:
            raise DatasetConfigError(f"{path}: {where}: unknown key {key!r}; kohya's ControlNet dataset keys are "
                                     f"{', '.join(sorted([*SUBSET_ONLY_KEYS, *SUBSET_KEYS, *DATASET_KEYS]))}")
        check, expected, default = allowed[key]
        if not check(value):
            raise DatasetConfigError(f"{path}: {where}.{key} must be {expected}, got {value!r}")
        if key in REFUSED and value != default:
            raise DatasetConfigError(f"{path}: {where}.{key} = {value!r} is not supported: {REFUSED[key]}")
        if key in NO_EFFECT:
            log.info("%s: %s.%s has no effect on ControlNet training (nor in kohya's)", path, where, key)
    if subset:
        missing = [key for key in SUBSET_ONLY_KEYS if key not in table]
        if missing:
            raise DatasetConfigError(f"{path}: {where} needs {' and '.join(missing)}")
    return table


def _setting(path: Path, where: str, key: str, levels: list[dict]) -> Any:
    """A key's value from the first level that sets it, else kohya's default; a command-line value (the last
    level) must agree with the file's."""
    *in_file, command_line = levels
    found = next((level[key] for level in in_file if key in level), None)
    given = command_line.get(key)
    if found is not None and given is not None and found != given:
        raise DatasetConfigError(f"{path}: {where}.{key} is {found!r} but --{key} is {given!r}; give one of them")
    if found is not None:
        return found
    return given if given is not None else {**SUBSET_KEYS, **DATASET_KEYS}[key][2]


def _subset(path: Path, where: str, levels: list[dict]) -> KohyaSubset:
    value = {key: _setting(path, where, key, levels) for key in SUBSET_KEYS}
    captions = CaptionOptions(**{f.name: value[f.name] for f in fields(CaptionOptions)})  # each is a subset key
    extension = value["caption_extension"]
    return KohyaSubset(Path(levels[0]["image_dir"]), Path(levels[0]["conditioning_data_dir"]),
                       extension if extension.startswith(".") else "." + extension, value["num_repeats"], captions,
                       ImageAugmentation(value["flip_aug"], value["color_aug"]))


def _one_setting_per_run(path: Path, per_dataset: list[tuple[str, dict]]) -> dict:
    """The per-dataset settings, the same in every dataset; DatasetConfigError naming the first that differs."""
    first_where, first = per_dataset[0]
    for where, settings in per_dataset[1:]:
        for key, value in settings.items():
            if value != first[key]:
                raise DatasetConfigError(f"{path}: {where}.{key} is {value!r} but {first_where}.{key} is "
                                         f"{first[key]!r}: one run trains at one resolution, bucket scheme and "
                                         "batch size here")
    return first


def _resize(path: Path, settings: dict) -> Resize:
    """kohya's sizing: buckets with enable_bucket, else the resolution (a square here)."""
    resolution = settings["resolution"]
    if resolution is None:
        raise DatasetConfigError(f"{path}: no resolution (in [[datasets]], [general] or --resolution), which "
                                 "kohya requires too")
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not settings["enable_bucket"]:
        if width != height:
            raise DatasetConfigError(f"{path}: resolution {resolution} without enable_bucket: a non-square "
                                     "resolution needs enable_bucket = true here")
        return Resize(width, "center_crop")
    step = settings["bucket_reso_steps"]
    low, high = settings["min_bucket_reso"], settings["max_bucket_reso"]
    if low % step or high % step:
        adjusted = (low - low % step, high + (step - high % step) % step)
        log.warning("%s: min_bucket_reso / max_bucket_reso %d / %d adjusted to multiples of bucket_reso_steps: "
                    "%d / %d (as kohya does)", path, low, high, *adjusted)
        low, high = adjusted
    if settings["bucket_no_upscale"]:
        log.info("%s: with bucket_no_upscale, min_bucket_reso and max_bucket_reso are not used (as in kohya)", path)
    if min(width, height) < low or max(width, height) > high:
        raise DatasetConfigError(f"{path}: resolution {resolution} must lie between min_bucket_reso {low} and "
                                 f"max_bucket_reso {high}, as kohya requires")
    buckets = KohyaBuckets((width, height), low, high, step, settings["bucket_no_upscale"])
    return Resize(max(width, height), "buckets", buckets)

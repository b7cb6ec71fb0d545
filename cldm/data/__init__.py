"""Training data: one reader per format, each returning the tutorial's item, defined once in cldm.data.batch
(jpg = target HxWx3 float32 in [-1, 1], txt = caption, hint = HxWx3 float32 in [0, 1]). docs/data.md has the
layouts; `open_dataset` picks the reader by name or by what the data root holds.
"""
from pathlib import Path

from cldm.data.base import EncodedSample, PairedImageDataset
from cldm.data.fill50k import Fill50KDataset
from cldm.data.hf import HFDataset, hf_layout
from cldm.data.images import BadSampleError, Resize
from cldm.data.kohya import KohyaDataset, KohyaSubset, folder_subsets
from cldm.data.shards import SHARD_INDEX, ShardDataset, is_shard_uri

FORMATS = ("fill50k", "kohya", "hf", "shards")

__all__ = ["FORMATS", "BadSampleError", "EncodedSample", "Fill50KDataset", "HFDataset", "KohyaDataset",
           "KohyaSubset", "PairedImageDataset", "Resize", "ShardDataset", "detect_format", "folder_subsets",
           "open_dataset"]


def detect_format(root: str | Path, conditioning_data_dir: str | Path | None = None) -> str:
    """The format of the data at `root`, from the files it holds; ValueError saying what was expected."""
    if is_shard_uri(str(root)):
        return "shards"
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} not found")
    if (root / "prompt.json").is_file():
        return "fill50k"
    if (root / SHARD_INDEX).is_file():
        return "shards"
    if hf_layout(root):
        return "hf"
    if conditioning_data_dir is not None:
        return "kohya"
    if any(root.glob("*.txt")):
        raise ValueError(f"{root} looks like kohya's layout (images with .txt captions): name the folder of hints "
                         "with --conditioning_data_dir")
    raise ValueError(f"cannot tell the format of {root}: expected prompt.json (fill50k), index.json (shards), "
                     "a Hugging Face data set (dataset_dict.json, parquet files, metadata.jsonl/csv), or images "
                     "with captions plus --conditioning_data_dir (kohya); or name it with --data_format")


def open_dataset(root: str | Path, data_format: str | None = None, resize: Resize | None = None, *,
                 conditioning_data_dir: str | Path | None = None, caption_extension: str | None = None,
                 image_column: str = "image", conditioning_image_column: str = "conditioning_image",
                 caption_column: str = "text", split: str = "train", allow_outside_root: bool = False,
                 skip_bad: bool = False, require_captions: bool = False, shuffle: bool = True, seed: int = 0,
                 cache_dir: str | None = None):
    """The reader of `data_format` (detected when None) over `root`; options a format does not use are refused
    by name, so none is silently ignored."""
    data_format = data_format or detect_format(root, conditioning_data_dir)
    if data_format not in FORMATS:
        raise ValueError(f"--data_format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    given = {"--conditioning_data_dir": conditioning_data_dir is not None,
             "--caption_extension": caption_extension not in (None, ".txt"),
             "--image_column": image_column != "image",
             "--conditioning_image_column": conditioning_image_column != "conditioning_image",
             "--caption_column": caption_column != "text", "--split": split != "train",
             "--allow_outside_root": allow_outside_root, "--require_captions": require_captions}
    used = {"fill50k": {"--allow_outside_root"},
            "kohya": {"--conditioning_data_dir", "--caption_extension", "--require_captions"},
            "hf": {"--image_column", "--conditioning_image_column", "--caption_column", "--split",
                   "--allow_outside_root"}, "shards": set()}
    unused = [option for option, is_given in given.items() if is_given and option not in used[data_format]]
    if unused:
        raise ValueError(f"{', '.join(unused)} does not apply to the {data_format} format of {root}")
    if data_format == "fill50k":
        return Fill50KDataset(root, resize=resize, allow_outside_root=allow_outside_root)
    if data_format == "kohya":
        if conditioning_data_dir is None:
            raise ValueError("the kohya format needs --conditioning_data_dir (the folder of hints)")
        return KohyaDataset(folder_subsets(root, conditioning_data_dir, caption_extension or ".txt"), resize=resize,
                            skip_bad=skip_bad, require_captions=require_captions)
    if data_format == "hf":
        return HFDataset(root, resize=resize, split=split, image_column=image_column,
                         conditioning_image_column=conditioning_image_column, caption_column=caption_column,
                         cache_dir=cache_dir, allow_outside_root=allow_outside_root)
    if resize is not None and resize.mode == "buckets":
        raise ValueError("aspect-ratio buckets need a map-style format (fill50k, kohya, hf), not a stream: "
                         "use --resize center_crop or random_crop with shards")
    return ShardDataset(root, resize=resize, shuffle=shuffle, seed=seed)

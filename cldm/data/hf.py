"""A local Hugging Face data set, in any of the three forms people keep one: a `save_to_disk` folder, a folder
of parquet files, or an imagefolder (images plus metadata.jsonl / metadata.csv).

Columns default to those of diffusers' ControlNet training script: `image` (the target), `conditioning_image`
(the hint) and `text` (the caption). In an imagefolder, metadata columns named `file_name` and
`conditioning_image_file_name` become the `image` and `conditioning_image` columns. An image column may hold
images (the datasets `Image` feature) or file paths relative to the data root. A caption may be a list of
captions: each step trains on one of them at random, as diffusers' train_controlnet.py does (reports and
conversions take the first).
"""
import logging
from pathlib import Path

import numpy as np

from cldm.data.base import EncodedSample, PairedImageDataset, leaves_root
from cldm.data.images import BadSampleError, Resize

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = {"image_column": "image", "conditioning_image_column": "conditioning_image",
                   "caption_column": "text"}


def hf_layout(root: Path) -> str | None:
    """'disk', 'parquet' or 'imagefolder' for a folder in one of those forms, else None."""
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return "disk"
    if any(root.glob("*.parquet")) or any(root.glob("*/*.parquet")):
        return "parquet"
    if any((root / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
        return "imagefolder"
    return None


def load_split(root: Path, split: str, cache_dir: str | None = None):
    """The `split` of the data set at `root` as a datasets.Dataset (image columns not decoded)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    layout = hf_layout(root)
    if layout is None:
        raise FileNotFoundError(f"{root} is not a Hugging Face data set: expected a save_to_disk folder "
                                "(dataset_dict.json or state.json), parquet files, or metadata.jsonl / metadata.csv")
    if layout == "disk":
        loaded = datasets.load_from_disk(str(root))
    elif layout == "parquet":
        files = sorted(map(str, root.glob("*.parquet"))) or sorted(map(str, root.glob("*/*.parquet")))
        by_split: dict[str, list[str]] = {}
        for file in files:  # train-00000-of-00002.parquet, data/train-*.parquet, or one unnamed split
            name = Path(file).stem.split("-")[0]
            by_split.setdefault(name if name in ("train", "validation", "test") else "train", []).append(file)
        loaded = datasets.load_dataset("parquet", data_files=by_split, cache_dir=cache_dir)
    else:
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
        except DatasetGenerationError as err:  # its reason (e.g. a file_name outside the folder) is the cause
            metadata = next(root / name for name in ("metadata.jsonl", "metadata.csv") if (root / name).is_file())
            reason = str(err.__cause__ or err).strip().splitlines()[0]
            raise ValueError(f"{metadata}: {reason}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{root} has no split {split!r} (it has {', '.join(loaded)}); choose one with --split")
        loaded = loaded[split]
    return loaded


def is_caption(value: object) -> bool:
    """A caption cell: a text, or a non-empty list of texts."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(c, str) for c in value))


class HFDataset(PairedImageDataset):
    """Rows of a local Hugging Face data set: `image_column` the target, `conditioning_image_column` the hint,
    `caption_column` the caption."""

    def __init__(self, root: str | Path, resize: Resize | None = None, split: str = "train",
                 image_column: str = "image", conditioning_image_column: str = "conditioning_image",
                 caption_column: str = "text", cache_dir: str | None = None, allow_outside_root: bool = False
                 ) -> None:
        import datasets

        super().__init__(resize)
        self.root, self.allow_outside_root = Path(root), allow_outside_root
        table = load_split(self.root, split, cache_dir)
        columns = {"--image_column": image_column, "--conditioning_image_column": conditioning_image_column,
                   "--caption_column": caption_column}
        missing = [f"{option} {name!r}" for option, name in columns.items() if name not in table.column_names]
        if missing:
            raise ValueError(f"{self.root}: no column {', '.join(missing)}; its columns are "
                             f"{', '.join(table.column_names)} (name them with the options)")
        self.image_column, self.hint_column, self.caption_column = image_column, conditioning_image_column, \
            caption_column
        for column in (image_column, conditioning_image_column):
            if isinstance(table.features[column], datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))  # we decode (EXIF, 16-bit, ...)
        self.table = table
        self._check_paths()
        self.captions = table[caption_column]
        bad = [i for i, c in enumerate(self.captions) if not is_caption(c)]
        if bad:
            raise ValueError(f"{self.root}: column {caption_column!r} row {bad[0]} is neither text nor a non-empty "
                             f"list of texts ({type(self.captions[bad[0]]).__name__}); {len(bad)} such rows")

    def _check_paths(self) -> None:
        """Refuse file paths in the image columns that leave the data root (absolute, or with `..`), naming the
        first, unless allow_outside_root; then count them in the log."""
        outside = 0
        for column in (self.image_column, self.hint_column):
            if self.table.features[column].dtype not in ("string", "large_string"):
                continue  # images (the Image feature) are checked when read
            for row, name in enumerate(self.table[column]):
                if isinstance(name, str) and leaves_root(name):
                    if not self.allow_outside_root:
                        raise ValueError(f"{self.root} row {row} column {column!r}: {name!r} points outside the "
                                         f"data root {self.root}; pass --allow_outside_root to read it")
                    outside += 1
        if outside:
            log.warning("%s: %d image paths outside it are read (allowed by allow_outside_root)", self.root, outside)

    def __len__(self) -> int:
        return len(self.table)

    def _image_bytes(self, value: object, column: str, idx: int) -> tuple[bytes, str]:
        where = f"{self.root} row {idx} column {column!r}"
        if isinstance(value, dict):  # the Image feature: {"bytes": ..., "path": ...}, the path resolved already
            if value.get("bytes"):
                return value["bytes"], f"{where} ({value.get('path') or 'embedded'})"
            value = value.get("path")
            if isinstance(value, str) and not self.allow_outside_root and \
                    not Path(value).resolve().is_relative_to(self.root.resolve()):
                raise BadSampleError(f"{where}: {value} is outside the data root {self.root}; pass "
                                     "--allow_outside_root to read it")
        if isinstance(value, str) and value:
            path = Path(value) if Path(value).is_absolute() else self.root / value
            try:
                return path.read_bytes(), f"{path} ({where})"
            except OSError as err:
                raise BadSampleError(f"{path} ({where}) cannot be read: {err.strerror}") from None
        raise BadSampleError(f"{where}: expected an image or a file path, got {type(value).__name__}")

    def encoded(self, idx: int) -> EncodedSample:
        row = self.table[idx]
        target, target_name = self._image_bytes(row[self.image_column], self.image_column, idx)
        hint, hint_name = self._image_bytes(row[self.hint_column], self.hint_column, idx)
        return EncodedSample(target, hint, self.caption(idx), target_name, hint_name)

    def caption(self, idx: int) -> str:
        """Row idx's caption, the first of a list."""
        caption = self.captions[idx]
        return caption if isinstance(caption, str) else caption[0]

    def training_caption(self, idx: int, caption: str, rng: np.random.Generator) -> str:
        """One of row idx's captions at random when it holds a list (diffusers' train_controlnet.py)."""
        choices = self.captions[idx]
        return choices if isinstance(choices, str) else choices[int(rng.integers(len(choices)))]

    def caption_source(self, idx: int) -> str:
        return f"{self.root} row {idx} column {self.caption_column!r}"

"""Build a training set from a folder of images: a hint per image from a hint maker (a detector), captions
from same-basename .txt files, a metadata.jsonl / metadata.csv, or one fixed prompt; written in Fill50K's
layout, which every reader and `write_shards` take.

    OUT/target/<relative path>.<ext>   the image, its bytes copied unchanged (never re-encoded)
    OUT/source/<relative path>.png     its hint, at the image's size
    OUT/prompt.json                    {"source", "target", "prompt"} per finished image
    OUT/report.json                    counts, and each skipped file with the reason

Resumable: an image whose hint exists is done (every file is written under a temporary name and renamed, the
hint last), so a second run only does what is missing. Unreadable, tiny or captionless images are skipped
and listed in the report, never fatal; nothing in the image folder is modified.
"""
import csv
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cldm.data.fill50k import INDEX
from cldm.data.images import IMAGE_EXTENSIONS, BadSampleError, decode
from cldm.data.kohya import image_files
from cldm.data.loading import DieWithParent
from ldm.checkpoint import write_bytes

log = logging.getLogger(__name__)

REPORT = "report.json"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class CaptionError(ValueError):
    """Captions that cannot be read at all (a metadata file that is not what it should be)."""


def read_metadata(path: Path) -> dict[str, str]:
    """file_name -> text from a metadata.jsonl or metadata.csv (the imagefolder convention; text or caption)."""
    rows: list[dict] = []
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CaptionError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CaptionError(f"{path}: not UTF-8 (at byte {e.start})") from None
    captions = {}
    for number, row in enumerate(rows, 1):
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(text, str):
            raise CaptionError(f"{path}, row {number}: expected file_name and text (or caption) as strings")
        captions[row["file_name"]] = text
    return captions


@dataclass
class Captions:
    """Where captions come from: a fixed prompt, a metadata file (keys relative to the image folder), or
    same-basename files with `extension`."""

    prompt: str | None = None
    metadata: Path | None = None
    extension: str = ".txt"
    _table: dict[str, str] | None = field(default=None, repr=False)

    def caption(self, root: Path, image: Path) -> str:
        """The caption of `image`; BadSampleError naming the file when there is none or it is not UTF-8."""
        if self.prompt is not None:
            return self.prompt
        if self.metadata is not None:
            if self._table is None:
                self._table = read_metadata(self.metadata)
            key = image.relative_to(root).as_posix()
            if key not in self._table:
                raise BadSampleError(f"no caption for {key} in {self.metadata}")
            return self._table[key].strip()
        path = image.with_suffix(self.extension)
        try:
            return path.read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            raise BadSampleError(f"no caption file {path}") from None
        except UnicodeDecodeError as e:
            raise BadSampleError(f"{path}: caption is not UTF-8 (byte at offset {e.start})") from None


def default_captions(root: Path, prompt: str | None = None, metadata: Path | None = None,
                     extension: str = ".txt") -> Captions:
    """The caption source the options name, else the folder's metadata file, else same-basename files."""
    if prompt is None and metadata is None:
        metadata = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
    return Captions(prompt=prompt, metadata=metadata, extension=extension if extension.startswith(".")
                    else "." + extension)


@dataclass
class Report:
    """What a build did: counts and each skipped file with its reason."""

    images: int = 0
    done_before: int = 0
    made: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.images} images: {self.made} made, {self.done_before} already done, "
                f"{len(self.skipped)} skipped, in {self.seconds:.1f} s")


class _Pending(Dataset):
    """Images to do, decoded (and checked) in DataLoader workers: (index, RGB image or None, bytes, problem)."""

    def __init__(self, root: Path, images: list[Path], captions: Captions, min_size: int) -> None:
        self.root, self.images, self.captions, self.min_size = root, images, captions, min_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, bytes, str, str]:
        path = self.images[i]
        try:
            caption = self.captions.caption(self.root, path)
            data = path.read_bytes()
            image = decode(data, str(path))
        except (BadSampleError, OSError) as err:
            return i, None, b"", "", str(err)
        if min(image.shape[:2]) < self.min_size:
            return i, None, b"", "", f"{path} is {image.shape[1]}x{image.shape[0]}, under --min_size {self.min_size}"
        return i, image, data, caption, ""


def _as_is(item: tuple) -> tuple:
    """The loader's conversion: none (the detector takes numpy images)."""
    return item


def broken_links(root: Path) -> list[dict[str, str]]:
    """Symlinks named like images that lead nowhere (dangling, or in a loop), as report entries: the image
    listing passes over them, since they are not files."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_symlink():
            continue
        try:
            path.stat()
        except OSError as err:
            reason = "a symlink loop" if err.errno == errno.ELOOP else f"a dangling symlink to {os.readlink(path)}"
            found.append({"file": str(path), "reason": f"{path} is {reason}"})
    return found


def build_from_images(root: str | Path, out: str | Path, make_hint: Callable[[np.ndarray], np.ndarray],
                      captions: Captions | None = None, min_size: int = 64, workers: int = 0,
                      progress: bool = True) -> Report:
    """Write the training set of the images under `root` into `out` (see the module doc) and return the report."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    if out.resolve() == root.resolve() or out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"--out {out} is inside the image folder {root}; write the data set elsewhere")
    captions = captions or default_captions(root)
    started = time.perf_counter()
    images = sorted(image_files(root).values())
    broken = broken_links(root)
    if not images and not broken:
        raise FileNotFoundError(f"{root} holds no images")
    report = Report(images=len(images) + len(broken), skipped=broken)
    entries: dict[int, tuple[str, str]] = {}  # index -> (target, source), the caption read again at the end

    def names(path: Path) -> tuple[str, str]:
        rel = path.relative_to(root)
        return (Path("target") / rel).as_posix(), (Path("source") / rel.with_suffix(".png")).as_posix()

    pending = []
    for i, path in enumerate(images):
        target, source = names(path)
        if (out / source).is_file() and (out / target).is_file():
            entries[i] = (target, source)
            report.done_before += 1
        else:
            pending.append(i)
    loader = DataLoader(_Pending(root, [images[i] for i in pending], captions, min_size), batch_size=None,
                        num_workers=workers, collate_fn=_as_is, worker_init_fn=DieWithParent())
    for j, image, data, _, problem in tqdm(loader, total=len(pending), disable=not progress, unit="image",
                                           desc="hints"):
        path = images[pending[j]]
        if problem:
            report.skipped.append({"file": str(path), "reason": problem})
            continue
        target, source = names(path)
        hint = make_hint(image)
        ok, png = cv2.imencode(".png", cv2.cvtColor(hint, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode the hint of {path}")
        write_bytes(out / target, data)
        write_bytes(out / source, png.tobytes())  # last: its presence marks the image done
        entries[pending[j]] = (target, source)
        report.made += 1

    lines = []
    for i in sorted(entries):
        target, source = entries[i]
        try:
            caption = captions.caption(root, images[i])
        except BadSampleError as err:  # a caption removed since the image was done
            report.skipped.append({"file": str(images[i]), "reason": str(err)})
            continue
        lines.append(json.dumps({"source": source, "target": target, "prompt": caption}))
    report.seconds = time.perf_counter() - started
    write_bytes(out / REPORT, (json.dumps({**report.__dict__}, indent=1) + "\n").encode())
    write_bytes(out / INDEX, "".join(line + "\n" for line in lines).encode())
    for item in report.skipped:
        log.warning("skipped %s: %s", item["file"], item["reason"])
    return report

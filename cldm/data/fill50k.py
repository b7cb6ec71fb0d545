"""The original tutorial's layout: prompt.json (JSON lines {"source", "target", "prompt"}), source/, target/.

    fill50k/prompt.json    {"source": "source/0.png", "target": "target/0.png", "prompt": "cyan circle ..."}
    fill50k/source/0.png   the hint
    fill50k/target/0.png   the image

Every problem of the index is named by file and line: bytes that are not UTF-8, lines that are not JSON
objects, fields that are not strings, and paths that leave the data root (absolute or with `..`), which are
read only when `allow_outside_root` says so.
"""
import json
import logging
from pathlib import Path

import numpy as np

from cldm.data.base import EncodedSample, PairedImageDataset, leaves_root
from cldm.data.images import BadSampleError, Resize, decode, resize

log = logging.getLogger(__name__)

INDEX = "prompt.json"
FIELDS = ("source", "target", "prompt")


def _json_type(value: object) -> str:
    return {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


class Fill50KDataset(PairedImageDataset):
    """A folder in Fill50K's layout. `size` stretches every image to size x size (the original `--image_size`);
    `resize` gives any other sizing (see cldm.data.images.Resize)."""

    def __init__(self, root: str | Path, size: int | None = None, resize: Resize | None = None,
                 allow_outside_root: bool = False) -> None:
        if size is not None and resize is not None:
            raise ValueError("give size (stretch to a square) or resize, not both")
        super().__init__(Resize(size, "stretch") if size is not None else resize)
        self.root, self.size, self.allow_outside_root = Path(root), size, allow_outside_root
        self.index = self.root / INDEX
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} not found: unpack Fill50K there, or generate it "
                                    f"with `python tool_make_fill50k.py --out {self.root}`")
        if not self.index.is_file():
            raise FileNotFoundError(f"{self.index} not found: a data root needs a prompt.json index")
        self.data: list[tuple[int, str, str, str]] = []  # (line number, source, target, prompt)
        outside = 0
        for line_no, raw in enumerate(self.index.read_bytes().splitlines(), 1):
            if raw.strip():
                record = self._parse(raw, line_no)
                outside += any(leaves_root(name) for name in record[:2])
                self.data.append((line_no, *record))
        if not self.data:
            raise ValueError(f"{self.index} has no entries")
        if outside:
            log.warning("%s: %d entries read images outside %s (allowed by allow_outside_root)", self.index,
                        outside, self.root)

    def _parse(self, raw: bytes, line_no: int) -> tuple[str, str, str]:
        where = f"{self.index}, line {line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the "
                             "index as UTF-8") from None
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(item, dict) or not set(FIELDS) <= item.keys():
            raise ValueError(f"{where}: expected an object with source, target and prompt")
        for field in FIELDS:
            if not isinstance(item[field], str):
                raise ValueError(f"{where}: \"{field}\" must be a string, got {_json_type(item[field])}")
        for field in ("source", "target"):
            if leaves_root(item[field]) and not self.allow_outside_root:
                raise ValueError(f"{where}: {field} {item[field]!r} points outside the data root {self.root}; "
                                 "pass --allow_outside_root to read it")
        return item["source"], item["target"], item["prompt"]

    def __len__(self) -> int:
        return len(self.data)

    def _bytes(self, name: str, line_no: int) -> tuple[bytes, str]:
        path = self.root / name
        where = f"{path} (named on line {line_no} of {self.index})"
        try:
            return path.read_bytes(), where
        except FileNotFoundError:
            raise BadSampleError(f"{path} not found (named on line {line_no} of {self.index})") from None
        except OSError as err:
            raise BadSampleError(f"{where} cannot be read: {err.strerror}") from None

    def encoded(self, idx: int) -> EncodedSample:
        line_no, source, target, prompt = self.data[idx]
        (target_bytes, target_name), (hint_bytes, hint_name) = (self._bytes(n, line_no) for n in (target, source))
        return EncodedSample(target_bytes, hint_bytes, prompt, target_name, hint_name)

    def caption(self, idx: int) -> str:
        return self.data[idx][3]

    def caption_source(self, idx: int) -> str:
        return f"{self.index}, line {self.data[idx][0]}"

    def _read(self, name: str, line_no: int) -> np.ndarray:
        """One image of line `line_no` as uint8 RGB, stretched to `size` when set (the latent cache's sizing)."""
        image = decode(*self._bytes(name, line_no))
        return image if self.size is None else resize(image, self.size, self.size)

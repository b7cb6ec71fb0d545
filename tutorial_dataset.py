"""The original tutorial's Fill50K reader, for any folder in that layout (prompt.json, source/, target/).

Each item is dict(jpg=target, txt=prompt, hint=source), names inherited from LDM: target as float32 HWC RGB in
[-1, 1], source as float32 HWC RGB in [0, 1]. `python tool_make_fill50k.py` writes such a folder.
"""
import json
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset


class MyDataset(Dataset):
    def __init__(self, root: str | Path = "./training/fill50k", size: int | None = None):
        """`size`: resize images that are not size x size (None keeps them as they are)."""
        self.root, self.size = Path(root), size
        self.index = self.root / "prompt.json"
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} not found: unpack Fill50K there, or generate it "
                                    f"with `python tool_make_fill50k.py --out {self.root}`")
        if not self.index.is_file():
            raise FileNotFoundError(f"{self.index} not found: a data root needs a prompt.json index")
        self.data = []  # (line number, source, target, prompt), the line number for error messages
        with open(self.index, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    self.data.append((line_no, *self._parse(line, line_no)))
        if not self.data:
            raise ValueError(f"{self.index} has no entries")

    def _parse(self, line: str, line_no: int) -> tuple[str, str, str]:
        where = f"{self.index}, line {line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(item, dict) or not {"source", "target", "prompt"} <= item.keys():
            raise ValueError(f"{where}: expected an object with source, target and prompt")
        return item["source"], item["target"], item["prompt"]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        line_no, source_name, target_name, prompt = self.data[idx]
        source = self._read(source_name, line_no)
        target = self._read(target_name, line_no)

        # Normalize source images to [0, 1] and target images to [-1, 1].
        source = source.astype(np.float32) / 255.0
        target = (target.astype(np.float32) / 127.5) - 1.0
        return dict(jpg=target, txt=prompt, hint=source)

    def _read(self, name: str, line_no: int) -> np.ndarray:
        path = self.root / name
        where = f"named on line {line_no} of {self.index}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found ({where})")
        image = cv2.imread(str(path))
        if image is None:
            raise OSError(f"{path} is not a readable image ({where})")
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        # Do not forget that OpenCV reads images in BGR order.
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

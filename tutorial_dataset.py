"""The original tutorial's Fill50K reader, for any folder in that layout (prompt.json, source/, target/).

Each item is dict(jpg=target, txt=prompt, hint=source), names inherited from LDM: target as float32 HWC RGB in
[-1, 1], source as float32 HWC RGB in [0, 1]. `python tool_make_fill50k.py` writes such a folder.
"""
import json
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

# A latent cache (tool_cache_latents.py): meta.json plus one .npy per array. mean/std: (N, C, h, w) VAE posterior;
# txt_emb: (U, L, D) embeddings of the U distinct prompts; txt_index: (N,) each sample's prompt;
# txt_emb_empty: (L, D) the empty prompt's embedding.
CACHE_META = "meta.json"
CACHE_ARRAYS = ("mean", "std", "txt_emb", "txt_index", "txt_emb_empty")


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


class CachedDataset(MyDataset):
    """MyDataset's hints and prompts, with the VAE posterior and text embeddings read from a latent cache.

    `python tool_cache_latents.py` writes the cache. Items are dict(txt, hint, mean, std, txt_emb, txt_emb_empty):
    ControlLDM.get_input draws the latents from mean and std and takes txt_emb as the text conditioning, so the
    frozen VAE and text encoder do not run in training; txt_emb_empty serves prompt dropout.
    """

    def __init__(self, cache_dir: str | Path, data_root: str | Path | None = None):
        """`data_root` overrides the data folder recorded in the cache (for a moved data set)."""
        self.cache_dir = Path(cache_dir)
        meta_file = self.cache_dir / CACHE_META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: write the cache with `python tool_cache_latents.py "
                                    f"--data_root DATA --out {self.cache_dir}`")
        self.meta = json.loads(meta_file.read_text())
        super().__init__(data_root or self.meta["data_root"], size=self.meta["image_size"])
        prompts, index = self.meta["prompts"], np.load(self.cache_dir / "txt_index.npy")
        if len(index) != len(self.data) or any(prompts[i] != d[3] for i, d in zip(index.tolist(), self.data)):
            raise ValueError(f"{self.cache_dir} does not match {self.index} (prompts differ): rebuild it with "
                             "tool_cache_latents.py --force")
        self._arrays: dict[str, np.ndarray] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        # Memory-mapped on first use, so each DataLoader worker maps the files itself instead of copying them.
        if self._arrays is None:
            self._arrays = {name: np.load(self.cache_dir / f"{name}.npy", mmap_mode="r") for name in CACHE_ARRAYS}
        return self._arrays

    def __getitem__(self, idx: int) -> dict:
        line_no, source_name, _, prompt = self.data[idx]
        a = self.arrays()
        hint = self._read(source_name, line_no).astype(np.float32) / 255.0
        return dict(txt=prompt, hint=hint, mean=np.array(a["mean"][idx]), std=np.array(a["std"][idx]),
                    txt_emb=np.array(a["txt_emb"][a["txt_index"][idx]]), txt_emb_empty=np.array(a["txt_emb_empty"]))

"""The original tutorial's Fill50K reader, for any folder in that layout (prompt.json, source/, target/).

Each item is dict(jpg=target, txt=prompt, hint=source), names inherited from LDM: target as float32 HWC RGB in
[-1, 1], source as float32 HWC RGB in [0, 1]. `python tool_make_fill50k.py` writes such a folder; the other
formats (kohya's, Hugging Face, streaming shards) have their readers in cldm/data/ (docs/data.md).
"""
import json
from pathlib import Path

import numpy as np

from cldm.data.fill50k import Fill50KDataset
from ldm.modules.encoders.conditioner import SIZE_KEYS

# A latent cache (tool_cache_latents.py): meta.json plus one .npy per array. mean/std: (N, C, h, w) VAE posterior;
# txt_emb: (U, L, D) embeddings of the U distinct prompts; txt_index: (N,) each sample's prompt;
# txt_emb_empty: (L, D) the empty prompt's embedding. SDXL caches add txt_pooled (U, P) / txt_pooled_empty (P):
# the pooled text, and the per-sample size conditioning (N, 2) under its batch keys (SIZE_KEYS).
CACHE_META = "meta.json"
CACHE_ARRAYS = ("mean", "std", "txt_emb", "txt_index", "txt_emb_empty")
VECTOR_CACHE_ARRAYS = ("txt_pooled", "txt_pooled_empty", *SIZE_KEYS)


class MyDataset(Fill50KDataset):
    """The tutorial's reader: a Fill50K-layout folder, ./training/fill50k unless told otherwise."""

    def __init__(self, root: str | Path = "./training/fill50k", size: int | None = None, **options) -> None:
        super().__init__(root, size=size, **options)


class CachedDataset(MyDataset):
    """MyDataset's hints and prompts, with the VAE posterior and text embeddings read from a latent cache.

    `python tool_cache_latents.py` writes the cache. Items are dict(txt, hint, mean, std, txt_emb, txt_emb_empty),
    and for SDXL also txt_pooled, txt_pooled_empty and the size conditioning:
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
            vector = (self.cache_dir / "txt_pooled.npy").is_file()  # an SDXL cache
            self._arrays = {name: np.load(self.cache_dir / f"{name}.npy", mmap_mode="r")
                            for name in CACHE_ARRAYS + (VECTOR_CACHE_ARRAYS if vector else ())}
        return self._arrays

    def __getitem__(self, idx: int) -> dict:
        line_no, source_name, _, prompt = self.data[idx]
        a = self.arrays()
        hint = self._read(source_name, line_no).astype(np.float32) / 255.0
        item = dict(txt=prompt, hint=hint, mean=np.array(a["mean"][idx]), std=np.array(a["std"][idx]),
                    txt_emb=np.array(a["txt_emb"][a["txt_index"][idx]]), txt_emb_empty=np.array(a["txt_emb_empty"]))
        if "txt_pooled" in a:
            item |= {"txt_pooled": np.array(a["txt_pooled"][a["txt_index"][idx]]),
                     "txt_pooled_empty": np.array(a["txt_pooled_empty"]),
                     **{key: np.array(a[key][idx]) for key in SIZE_KEYS}}
        return item

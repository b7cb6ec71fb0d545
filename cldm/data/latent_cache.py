"""Latent caches (tool_cache_latents.py writes them): each image's VAE posterior and each prompt's text
embedding computed once, so training skips the frozen encoders; and the reader training takes them from.

The cache holds each image's posterior mean and standard deviation, not a sampled latent: training still
draws a fresh latent every step, with the same random numbers as online training, so the objective is the
same. Each distinct prompt is encoded once, and the empty prompt once more for prompt dropout.
"""
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader

from cldm.data.batch import HINT, ControlCachedItem
from cldm.data.fill50k import Fill50KDataset
from cldm.data.loading import DieWithParent
from ldm.batch import CAPTION, MEAN, STD, TEXT_EMBEDDING, TEXT_POOLED, empty_prompt
from ldm.checkpoint import atomic_output
from ldm.models.diffusion.ddpm import DDPM
from ldm.modules.encoders.conditioner import SIZE_KEYS

log = logging.getLogger(__name__)

# A latent cache (tool_cache_latents.py): meta.json plus one .npy per array, named by its batch key (ldm.batch).
# mean/std: (N, C, h, w) VAE posterior; txt_emb: (U, L, D) embeddings of the U distinct prompts; txt_index: (N,)
# each sample's prompt; txt_emb_empty: (L, D) the empty prompt's embedding. SDXL caches add txt_pooled (U, P) /
# txt_pooled_empty (P): the pooled text, and the per-sample size conditioning (N, 2) under its batch keys.
CACHE_META = "meta.json"
PROMPT_INDEX = "txt_index"
CACHE_ARRAYS = (MEAN, STD, TEXT_EMBEDDING, PROMPT_INDEX, empty_prompt(TEXT_EMBEDDING))
VECTOR_CACHE_ARRAYS = (TEXT_POOLED, empty_prompt(TEXT_POOLED), *SIZE_KEYS)


class CachedDataset(Fill50KDataset):
    """A Fill50K-layout folder's hints and prompts, with the VAE posterior and text embeddings read from a latent cache.

    `python tool_cache_latents.py` writes the cache. Items are ControlCachedItem (cldm.data.batch): txt, hint,
    mean, std, txt_emb, txt_emb_empty, and for SDXL also txt_pooled, txt_pooled_empty and the size conditioning.
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
        prompts, index = self.meta["prompts"], np.load(self.cache_dir / f"{PROMPT_INDEX}.npy")
        if len(index) != len(self.data) or any(prompts[i] != d[3] for i, d in zip(index.tolist(), self.data)):
            raise ValueError(f"{self.cache_dir} does not match {self.index} (prompts differ): rebuild it with "
                             "tool_cache_latents.py --force")
        self._arrays: dict[str, np.ndarray] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        # Memory-mapped on first use, so each DataLoader worker maps the files itself instead of copying them.
        if self._arrays is None:
            vector = (self.cache_dir / f"{TEXT_POOLED}.npy").is_file()  # an SDXL cache
            self._arrays = {name: np.load(self.cache_dir / f"{name}.npy", mmap_mode="r")
                            for name in CACHE_ARRAYS + (VECTOR_CACHE_ARRAYS if vector else ())}
        return self._arrays

    def __getitem__(self, idx: int) -> ControlCachedItem:
        line_no, source_name, _, prompt = self.data[idx]
        a = self.arrays()
        prompt_row = a[PROMPT_INDEX][idx]
        text_keys = (TEXT_EMBEDDING, TEXT_POOLED) if TEXT_POOLED in a else (TEXT_EMBEDDING,)
        item = ControlCachedItem({
            CAPTION: prompt, HINT: self._read(source_name, line_no).astype(np.float32) / 255.0,
            MEAN: np.array(a[MEAN][idx]), STD: np.array(a[STD][idx]),
            **{key: np.array(a[key][prompt_row]) for key in text_keys},
            **{empty_prompt(key): np.array(a[empty_prompt(key)]) for key in text_keys}})
        if TEXT_POOLED in a:
            item |= {key: np.array(a[key][idx]) for key in SIZE_KEYS}
        return item


@torch.no_grad()
def encode_images(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of batch[first_stage_key], from the same input tensor online training builds."""
    x = DDPM.get_input(model, batch, model.first_stage_key)
    posterior = model.encode_first_stage(x.to(next(model.first_stage_model.parameters()).device))
    return posterior.mean, posterior.std


@torch.no_grad()
def encode_prompts(model: torch.nn.Module, prompts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """txt_emb: the text encoder's output per prompt; for SDXL the cross-attention features of both encoders,
    plus txt_pooled: the text part of the vector y (bigG's pooled output)."""
    parts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        if model.vector_conditioned:
            crossattn, pooled = model.conditioner.encode_text(chunk)
            parts.append({TEXT_EMBEDDING: crossattn, TEXT_POOLED: pooled})
        else:
            parts.append({TEXT_EMBEDDING: model.get_learned_conditioning(chunk)})
    return {name: torch.cat([p[name].float().cpu() for p in parts]) for name in parts[0]}


def refuse_nonfinite(dataset: Fill50KDataset, start: int, mean: torch.Tensor, std: torch.Tensor) -> None:
    """ValueError naming the first image of a batch (samples start, start + 1, ...) whose posterior is NaN or
    infinite: such a cache would train on NaN."""
    finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
    if not bool(finite.all()):
        line_no, _, target, _ = dataset.data[start + int((~finite).nonzero()[0])]
        raise ValueError(f"{Path(dataset.root) / target} (line {line_no} of {dataset.index}): the VAE encodes it to "
                         f"non-finite latents (NaN or infinity), which would train on NaN; check the image and the "
                         f"VAE's weights (a float16 VAE overflows on some images)")


def cache_latents(model: torch.nn.Module, dataset: Fill50KDataset, out: str | os.PathLike, batch_size: int = 8,
                  num_workers: int = 0, force: bool = False, source: dict | None = None) -> Path:
    """Write the cache of `dataset` under `out` (see tutorial_dataset.CACHE_ARRAYS); `source` goes into meta.json."""
    prompts = [item[3] for item in dataset.data]
    distinct = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(distinct)}
    with atomic_output(out, force, folder=True) as folder:
        tmp = Path(folder)
        arrays, start = {}, 0
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            worker_init_fn=DieWithParent())
        for batch in loader:
            mean, std = encode_images(model, batch)
            refuse_nonfinite(dataset, start, mean, std)
            per_sample = {MEAN: mean, STD: std}
            if model.vector_conditioned:  # the size conditioning online training would use, per sample
                per_sample |= model.batch_sizes(batch, len(mean), mean.shape[-2:])
            for name, value in per_sample.items():
                if name not in arrays:
                    arrays[name] = open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32,
                                               shape=(len(dataset), *value.shape[1:]))
                arrays[name][start:start + len(value)] = value.float().cpu().numpy()
            start += len(mean)
        for array in arrays.values():
            array.flush()
        empty = encode_prompts(model, [""], 1)
        for name, value in encode_prompts(model, distinct, batch_size).items():
            np.save(tmp / f"{name}.npy", value.numpy())
            np.save(tmp / f"{empty_prompt(name)}.npy", empty[name][0].numpy())
        np.save(tmp / f"{PROMPT_INDEX}.npy", np.array([position[p] for p in prompts], dtype=np.int64))
        meta = {"data_root": str(Path(dataset.root).resolve()), "image_size": dataset.size, "count": len(dataset),
                "latent_shape": list(arrays[MEAN].shape[1:]), **(source or {}), "prompts": distinct}
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=1) + "\n")
        del arrays
    return Path(out)

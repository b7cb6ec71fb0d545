"""Precompute the VAE posterior and the text embeddings of a data set, so training skips the frozen encoders.

    python tool_cache_latents.py --config ./models/cldm_v15.yaml --ckpt ./models/control_sd15_ini.ckpt \\
        --data_root ./training/fill50k --out ./training/fill50k_cache
    python tutorial_train.py --cached_latents ./training/fill50k_cache

The cache holds each image's posterior mean and standard deviation, not a sampled latent: training still
draws a fresh latent every step, with the same random numbers as online training, so the objective is the
same. Each distinct prompt is encoded once, and the empty prompt once more for prompt dropout. For SDXL
(--config ./models/cldm_xl.yaml) the cache holds both text encoders' features, the pooled text and each
image's size conditioning, from which training assembles the vector y exactly as online. Hints and
prompts stay in the data folder (tutorial_dataset.CachedDataset reads both). Encoding runs in float32.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader

from cldm.cli import run_tool
from cldm.model import create_model, load_checkpoint
from cldm.training import ENCODERS_FINGERPRINT, encoders_fingerprints
from ldm.checkpoint import ENCODER_PREFIXES, TEMP_SUFFIX, remove_stale_temps, require_finite, temp_prefix
from ldm.models.diffusion.ddpm import DDPM
from tutorial_dataset import CACHE_META, MyDataset

log = logging.getLogger(__name__)


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
            parts.append({"txt_emb": crossattn, "txt_pooled": pooled})
        else:
            parts.append({"txt_emb": model.get_learned_conditioning(chunk)})
    return {name: torch.cat([p[name].float().cpu() for p in parts]) for name in parts[0]}


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` onto `out`; an old `out` (allowed by --force) is removed only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out), suffix=TEMP_SUFFIX))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def cache_latents(model: torch.nn.Module, dataset: MyDataset, out: str | os.PathLike, batch_size: int = 8,
                  num_workers: int = 0, force: bool = False, source: dict | None = None) -> Path:
    """Write the cache of `dataset` under `out` (see tutorial_dataset.CACHE_ARRAYS); `source` goes into meta.json."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    prompts = [item[3] for item in dataset.data]
    distinct = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(distinct)}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out), suffix=TEMP_SUFFIX))
    try:
        arrays, start = {}, 0
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for batch in loader:
            mean, std = encode_images(model, batch)
            per_sample = {"mean": mean, "std": std}
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
            np.save(tmp / f"{name}_empty.npy", empty[name][0].numpy())
        np.save(tmp / "txt_index.npy", np.array([position[p] for p in prompts], dtype=np.int64))
        meta = {"data_root": str(Path(dataset.root).resolve()), "image_size": dataset.size, "count": len(dataset),
                "latent_shape": list(arrays["mean"].shape[1:]), **(source or {}), "prompts": distinct}
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=1) + "\n")
        del arrays
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="./models/cldm_v15.yaml", help="model YAML (default %(default)s)")
    p.add_argument("--ckpt", required=True,
                   help="weights of the VAE and text encoder (e.g. the tool_add_control.py output); "
                        "'none' keeps the config's random weights (tests)")
    p.add_argument("--data_root", default="./training/fill50k")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--image_size", type=int, default=None, help="resize images to this size, as in training")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="replace an existing cache")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not args.force:  # before the slow work cache_latents would refuse after
        raise FileExistsError(f"{args.out} already exists; pass --force to overwrite it")
    dataset = MyDataset(args.data_root, size=args.image_size)
    model = create_model(args.config).eval()
    if args.ckpt.lower() != "none":
        report = load_checkpoint(model, args.ckpt, prefixes=ENCODER_PREFIXES)
        if report.missing:
            raise ValueError(f"{args.ckpt} lacks {len(report.missing)} VAE / text encoder weights of "
                             f"{args.config}, e.g. {report.missing[:3]}")
        require_finite(model.state_dict(), args.ckpt)
    source = {"config": str(args.config), "ckpt": str(args.ckpt), ENCODERS_FINGERPRINT: encoders_fingerprints(model)}
    model.first_stage_model.to(args.device)
    model.conditioning_model.to(args.device)
    out = cache_latents(model, dataset, args.out, args.batch_size, args.num_workers, args.force, source)
    log.info("Cached %d samples in %s; train with --cached_latents %s", len(dataset), out, out)
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main))

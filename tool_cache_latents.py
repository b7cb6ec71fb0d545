"""Precompute the VAE posterior and the text embeddings of a data set, so training skips the frozen encoders.

    python tool_cache_latents.py --config ./models/cldm_v15.yaml --ckpt ./models/control_sd15_ini.ckpt \\
        --data_root ./training/fill50k --out ./training/fill50k_cache
    python tutorial_train.py --cached_latents ./training/fill50k_cache

The cache holds each image's posterior mean and standard deviation, not a sampled latent: training still
draws a fresh latent every step, with the same random numbers as online training, so the objective is the
same. Each distinct prompt is encoded once, and the empty prompt once more for prompt dropout. For SDXL
(--config ./models/cldm_xl.yaml) the cache holds both text encoders' features, the pooled text and each
image's size conditioning, from which training assembles the vector y exactly as online. Hints and
prompts stay in the data folder (cldm/data/latent_cache.py CachedDataset reads both). Encoding runs in float32.
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

from cldm.cli import run_tool
from cldm.data.fill50k import Fill50KDataset
from cldm.data.latent_cache import cache_latents
from cldm.model import create_model, load_checkpoint
from cldm.training import ENCODERS_FINGERPRINT, encoders_fingerprints
from ldm.checkpoint import ENCODER_PREFIXES, require_finite

log = logging.getLogger(__name__)


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
    dataset = Fill50KDataset(args.data_root, size=args.image_size)
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

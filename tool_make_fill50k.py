"""Generate a data set in Fill50K's format: the original tutorial's toy task of circle filling.

    python tool_make_fill50k.py --out ./training/fill50k --n 50000 --size 512 --seed 0

Layout, as the original's `training/fill50k.zip` and `tutorial_dataset.MyDataset` have it:
    <out>/prompt.json    JSON lines {"source": "source/N.png", "target": "target/N.png", "prompt": "..."}
    <out>/source/N.png   the circle's outline: a white line on black
    <out>/target/N.png   the circle filled with one named colour on a background of another
    <out>/meta.jsonl     an extra that Fill50K readers ignore: each sample's centre, radius, line thickness,
                         RGB values and colour names, for evaluation

Prompts read like "burly wood circle with orange background": CSS/X11 colour names split into words, as in
Fill50K. The pixels are exactly the named RGB values (no anti-aliasing), so a prompt's colours can be checked
against an image. Sample N depends only on (seed, N, size):
`sample_circle(np.random.default_rng([seed, N]), size)` rebuilds it, and the same arguments give
byte-identical files (with the same OpenCV build) whatever the number of workers.
"""
import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from cldm.cli import run_tool
from cldm.data.circles import render, sample_circle

log = logging.getLogger(__name__)

MIN_SIZE = 16
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]  # zlib's default: less than half the bytes of OpenCV's level 1
SET_ENTRIES = ("prompt.json", "source", "target", "meta.jsonl")  # prompt.json first: its absence marks no set
STAGING_PREFIX = ".fill50k-"  # hidden folders of a run in progress inside the output folder

def _write_sample(job: tuple[Path, int, int, int]) -> tuple[str, str]:
    out, seed, i, size = job
    circle = sample_circle(np.random.default_rng([seed, i]), size)
    source, target = render(circle, size)
    for folder, image in (("source", source), ("target", target)):
        path = out / folder / f"{i}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), PNG_PARAMS):
            raise OSError(f"could not write {path}")
    record = {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": circle["prompt"]}
    meta = {"source": record["source"], **{k: v for k, v in circle.items() if k != "prompt"}}
    return json.dumps(record), json.dumps(meta)


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_fill50k(out: str | Path, n: int = 50000, size: int = 512, seed: int = 0, force: bool = False,
                 workers: int = 1) -> Path:
    """Write n samples in Fill50K's layout under `out` and return its path.

    A non-empty `out` is refused unless `force`. The new set is written into a hidden folder inside `out` and
    swapped in at the end (prompt.json last), so an interrupted run leaves the old set, or no prompt.json,
    never an index that names images of another set. Files of `out` that are not part of a set are kept.
    """
    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    for stale in out.glob(f"{STAGING_PREFIX}*") if out.is_dir() else ():
        shutil.rmtree(stale)  # left by a run that was killed
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace the data set in it "
                              "(other files are kept)")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    try:
        for folder in ("source", "target"):
            (staging / folder).mkdir()
        jobs = [(staging, seed, i, size) for i in range(n)]
        step = max(1, n // 10)
        records = []
        for done, record in enumerate(_records(jobs, workers), 1):
            records.append(record)
            if done % step == 0 or done == n:
                print(f"{done}/{n} samples", flush=True)
        _write_lines_atomic(staging / "meta.jsonl", [meta for _, meta in records])
        _write_lines_atomic(staging / "prompt.json", [prompt for prompt, _ in records])
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _swap_in(staging: Path, out: Path) -> None:
    """Replace the set in `out` by the one in `staging`: the old index leaves first and the new one comes last."""
    trash = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    for name in SET_ENTRIES:
        if (out / name).exists():
            os.replace(out / name, trash / name)
        if name != "prompt.json":
            os.replace(staging / name, out / name)
    os.replace(staging / "prompt.json", out / "prompt.json")
    shutil.rmtree(trash)


def _records(jobs: list[tuple[Path, int, int, int]], workers: int):
    """(prompt line, meta line) per job, in order; in-process for one worker, saving the pool's start-up."""
    if workers <= 1:
        yield from map(_write_sample, jobs)
        return
    with mp.Pool(workers) as pool:
        yield from pool.imap(_write_sample, jobs, chunksize=64)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="./training/fill50k", help="output folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=50000, help="number of samples (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace the data set in a non-empty output folder (written beside it, then swapped in)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing PNGs (default: all CPUs, %(default)s)")
    args = parser.parse_args(argv)
    out = make_fill50k(args.out, args.n, args.size, args.seed, args.force, args.workers)
    log.info("wrote %d samples (%dx%d) to %s", args.n, args.size, args.size, out)
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main))

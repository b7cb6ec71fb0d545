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
from pathlib import Path

import cv2
import numpy as np

from cldm.cli import run_tool
from cldm.data.circles import render, sample_circle
from ldm.checkpoint import live_temps, move_into_place, new_temp, remove_stale_temps

log = logging.getLogger(__name__)

MIN_SIZE = 16
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]  # zlib's default: less than half the bytes of OpenCV's level 1
SET_ENTRIES = ("source", "target", "meta.jsonl", "prompt.json")  # prompt.json last: its presence marks a set
STAGING = "fill50k"  # a run writes its set into `.fill50k.PID-HOST.RANDOM.tmp` inside the output folder


def _write_sample(job: tuple[Path, int, int, int]) -> tuple[str, str]:
    out, seed, i, size = job
    circle = sample_circle(np.random.default_rng([seed, i]), size)
    source, target = render(circle, size)
    for folder, image in (("source", source), ("target", target)):
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), PNG_PARAMS)
        if not ok:
            raise OSError(f"could not encode {out / folder / f'{i}.png'}")
        (out / folder / f"{i}.png").write_bytes(png.tobytes())  # (a full disk raises with its errno)
    record = {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": circle["prompt"]}
    meta = {"source": record["source"], **{k: v for k, v in circle.items() if k != "prompt"}}
    return json.dumps(record), json.dumps(meta)


def make_fill50k(out: str | Path, n: int = 50000, size: int = 512, seed: int = 0, force: bool = False,
                 workers: int = 1) -> Path:
    """Write n samples in Fill50K's layout under `out` and return its path.

    A non-empty `out` is refused unless `force`, and so is one that another run is writing into. The new set is
    written into a hidden folder inside `out` and swapped in at the end (prompt.json last), so an interrupted
    run leaves the old set, or no prompt.json, never an index that names images of another set. Files of `out`
    that are not part of a set are kept; the hidden folders of killed runs are removed.
    """
    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # every time: a set's hidden folders must not count as files of `out`
    writing = live_temps(out)
    if writing:
        raise FileExistsError(f"another run (process {writing[0][1]}) is writing a data set into {out} "
                              f"({writing[0][0].name}); wait for it, or choose another --out")
    if any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace the data set in it "
                              "(other files are kept)")
    staging = new_temp(out / STAGING, folder=True)
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
        (staging / "meta.jsonl").write_text("".join(meta + "\n" for _, meta in records), encoding="utf-8")
        (staging / "prompt.json").write_text("".join(prompt + "\n" for prompt, _ in records), encoding="utf-8")
        if (out / "prompt.json").exists():  # the old index leaves first: it must never name the new images
            os.replace(out / "prompt.json", staging / "prompt.json.old")
        for name in SET_ENTRIES:
            move_into_place(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


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

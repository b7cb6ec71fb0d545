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
import logging
import os
import sys
from pathlib import Path

from cldm.cli import run_tool
from cldm.data.circles import make_fill50k

log = logging.getLogger(__name__)


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

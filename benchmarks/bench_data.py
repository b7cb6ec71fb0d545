"""How fast each reader delivers training items, against what a training step consumes.

    python benchmarks/bench_data.py --n 256 --resolution 512 --workers 0 1 2

Builds one set of N pairs (a 768x512 JPEG photo-like target and a PNG hint, both resized and cropped to
--resolution on reading) in each format: Fill50K layout, kohya's layout, a Hugging Face imagefolder, and LitData
shards. For each reader and worker count it times a training loader (TrainData: batch --batch_size, shuffled),
the first batch left out (worker start-up), and reports samples per second. The GPU side is the training rate
measured on the H200 (benchmarks/RESULTS.md: 36.5 samples/s at batch 4, SD1.5 512 px bf16 with cached latents);
"workers to feed it" is that rate over the best rate per worker process, rounded up (loading in the training
process, 0 workers, does not overlap the GPU step, so it does not count): the data path keeps up with the GPU
when the machine has that many cores free for loading.
"""
import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cldm.bench.measure import machine  # noqa: E402
from cldm.data import Fill50KDataset, HFDataset, KohyaDataset, Resize, ShardDataset, folder_subsets  # noqa: E402
from cldm.data.loading import TrainData  # noqa: E402
from cldm.data.shards import write_shards  # noqa: E402
from ldm.batch import CAPTION  # noqa: E402

H200_TRAIN_RATE = 36.5  # samples/s, SD1.5 512 px batch 4 bf16-mixed cached latents (benchmarks/RESULTS.md)
READERS = ("fill50k", "kohya", "hf", "shards")


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth picture with shapes (compresses like a photo, not like noise)."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    image = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(100, 255, 3)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return image.clip(0, 255).astype(np.uint8)


def make_sets(base: Path, n: int, size: tuple[int, int]) -> dict[str, Path]:
    """The same n pairs in every format; returns each format's data root."""
    rng = np.random.default_rng(0)
    fill, kohya, hf = base / "fill50k", base / "kohya", base / "hf"
    for folder in (fill / "target", fill / "source", kohya / "images", kohya / "cond", hf / "hints"):
        folder.mkdir(parents=True)
    lines, meta = [], []
    for i in range(n):
        picture = photo(rng, size[1], size[0])
        target, hint = Image.fromarray(picture), Image.fromarray(cv2.Canny(picture, 100, 200))
        target.save(fill / "target" / f"{i}.jpg", quality=90)
        hint.save(fill / "source" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.jpg", "prompt": f"photo {i}"}))
        shutil.copy(fill / "target" / f"{i}.jpg", kohya / "images" / f"{i}.jpg")
        shutil.copy(fill / "source" / f"{i}.png", kohya / "cond" / f"{i}.png")
        (kohya / "images" / f"{i}.txt").write_text(f"photo {i}")
        shutil.copy(fill / "target" / f"{i}.jpg", hf / f"{i}.jpg")
        shutil.copy(fill / "source" / f"{i}.png", hf / "hints" / f"{i}.png")
        meta.append(json.dumps({"file_name": f"{i}.jpg", "conditioning_image_file_name": f"hints/{i}.png",
                                "text": f"photo {i}"}))
    (fill / "prompt.json").write_text("\n".join(lines) + "\n")
    (hf / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    write_shards(Fill50KDataset(fill), base / "shards")
    return {"fill50k": fill, "kohya": kohya, "hf": hf, "shards": base / "shards"}


def open_reader(name: str, root: Path, resize: Resize, cache: Path):
    if name == "fill50k":
        return Fill50KDataset(root, resize=resize)
    if name == "kohya":
        return KohyaDataset(folder_subsets(root / "images", root / "cond"), resize=resize)
    if name == "hf":
        return HFDataset(root, resize=resize, cache_dir=str(cache))
    return ShardDataset(root, resize=resize, cache_dir=str(cache / "litdata"))


def samples_per_second(dataset, batch_size: int, workers: int) -> float:
    loader = TrainData(dataset, batch_size, workers).train_dataloader()
    batches = iter(loader)
    next(batches)  # worker start-up and first reads left out
    count, start = 0, time.perf_counter()
    for batch in batches:
        count += len(batch[CAPTION])
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="pairs per format (default %(default)s)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    p.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS))
    p.add_argument("--smoke", action="store_true", help="tiny run for the tests: 12 pairs at 64 px")
    p.add_argument("--table", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    size = (768, 512)
    if args.smoke:
        args.n, args.resolution, args.workers, size = 12, 64, [0], (96, 64)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        roots = make_sets(Path(tmp), args.n, size)
        resize = Resize(args.resolution, "center_crop")
        for name in args.readers:
            for workers in args.workers:
                rate = samples_per_second(open_reader(name, roots[name], resize, Path(tmp) / "cache"),
                                          args.batch_size, workers)
                rows.append({"reader": name, "workers": workers, "samples_per_s": rate})
    lines = [f"### bench_data: {' '.join(argv if argv is not None else sys.argv[1:])}", "",
             f"{machine()}, {args.n} pairs {size[0]}x{size[1]} (JPEG target, PNG hint) -> {args.resolution} px "
             f"centre crop, batch {args.batch_size}", "",
             "| reader | workers | samples/s | per worker | workers to feed the H200's 36.5 samples/s |",
             "|---|---|---|---|---|"]
    for name in args.readers:
        mine = [r for r in rows if r["reader"] == name]
        # loading in the training process (0 workers) does not overlap the GPU step: rate per worker process only
        per_worker = max(r["samples_per_s"] / max(1, r["workers"]) for r in mine
                         if r["workers"] > 0 or all(m["workers"] == 0 for m in mine))
        for r in mine:
            r["per_worker"] = r["samples_per_s"] / max(1, r["workers"])
            r["workers_needed"] = math.ceil(H200_TRAIN_RATE / per_worker)
            lines.append(f"| {name} | {r['workers']} | {r['samples_per_s']:.1f} | {r['per_worker']:.1f} | "
                         f"{r['workers_needed']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        with open(args.table, "a") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()

"""Make a training set from a folder of images: hints from any annotator, captions from files or one prompt.

    python tool_make_dataset.py ./photos --out ./training/photos_canny --detector canny
    python tool_make_dataset.py ./photos --out ./training/photos_depth --detector midas --prompt "a room"
    python tool_make_dataset.py ./photos --out ./training/shards --detector hed --format shards
    python tool_make_dataset.py --convert ./training/fill50k --out ./training/fill50k_shards --format shards
    python tool_make_dataset.py --convert ./train --conditioning_data_dir ./conditioning --out ./shards --format shards

Images: jpg, png, webp, ... in any subfolder, any size. Captions: same-basename .txt files (--caption_extension),
a metadata.jsonl / metadata.csv (file_name, text) in the folder or named by --metadata, or --prompt for all.
Writes Fill50K's layout (prompt.json, source/ hints, target/ images) or, with --format shards, LitData shards
(built from that layout in --work_dir). Resumable: run it again and only what is missing is done. Unreadable,
tiny or captionless images are skipped and listed in OUT/report.json. docs/data.md has the whole recipe.
"""
import argparse
import sys
from pathlib import Path

import torch

from annotator.hints import HINTS
from cldm.cli import run_tool
from cldm.data import open_dataset
from cldm.data.build import build_from_images, default_captions
from cldm.data.images import set_max_image_pixels
from cldm.data.options import add_format_arguments, format_options
from cldm.data.shards import write_shards

FORMATS = ("fill50k", "shards")
READER_OPTIONS = ("data_format", "conditioning_data_dir", "image_column", "conditioning_image_column", "caption_column",
                  "split", "allow_outside_root")  # how --convert reads its data root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="?", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (Fill50K layout) or shard folder")
    p.add_argument("--detector", choices=sorted(HINTS), help="the annotator that makes the hints")
    p.add_argument("--format", choices=FORMATS, default="fill50k", help="output format (default %(default)s)")
    p.add_argument("--work_dir", default=None,
                   help="with --format shards: where the resumable Fill50K layout is built (default OUT.work)")
    p.add_argument("--convert", default=None, metavar="DATA_ROOT",
                   help="instead of images: write shards of an existing data root in any format (--format shards)")
    p.add_argument("--prompt", default=None, help="one caption for every image")
    p.add_argument("--metadata", default=None, help="metadata.jsonl or .csv with file_name and text columns")
    p.add_argument("--caption_extension", default=".txt", help="same-basename caption files (default %(default)s)")
    p.add_argument("--min_size", type=int, default=64, help="skip images with a side under this (default %(default)s)")
    p.add_argument("--detect_resolution", type=int, default=512,
                   help="short side the detector sees (default %(default)s); the hint is stored at the image's size")
    p.add_argument("--device", default="auto", help="where the detector runs: auto (cuda when present), cpu, cuda:0")
    p.add_argument("--workers", type=int, default=2, help="processes decoding images (default %(default)s)")
    p.add_argument("--force", action="store_true", help="with --format shards: replace existing shards")
    p.add_argument("--max_image_pixels", type=int, default=None,
                   help="images claiming more pixels are skipped as decompression bombs (default PIL's, 89478485)")
    reader = p.add_argument_group("--convert: how to read DATA_ROOT (docs/data.md; each applies to its format)")
    add_format_arguments(reader, purpose="convert")
    p.add_argument("--random_weights", action="store_true",
                   help="FOR TESTS ONLY: the detector keeps random weights (no weight files needed)")
    options = p.add_argument_group("detector options (each applies to the detectors that take it)")
    declared: dict[str, set[str]] = {}
    for name, maker in HINTS.items():
        for option, default in maker.options.items():
            if option not in declared:
                kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
                options.add_argument(f"--{option}", type=kind, default=None, help=f"default {default}")
            declared.setdefault(option, set()).add(name)
    args = p.parse_args(argv)
    args.detector_options = {o: getattr(args, o) for o in declared if getattr(args, o) is not None}
    wrong = [o for o in args.detector_options if args.detector not in declared[o]]
    if wrong:
        p.error(f"--{wrong[0]} is an option of {', '.join(sorted(declared[wrong[0]]))}, not of {args.detector}")
    if args.convert is None and (args.images is None or args.detector is None):
        p.error("give an image folder and --detector (or --convert DATA_ROOT --format shards)")
    if args.convert is not None and args.format != "shards":
        p.error("--convert writes shards: add --format shards")
    if args.convert is None:
        given = [f"--{name}" for name in READER_OPTIONS if getattr(args, name) != p.get_default(name)]
        if given:
            p.error(f"{given[0]} describes the data root of --convert, which is not given")
    return args


def make(args: argparse.Namespace) -> str:
    out = Path(args.out)
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    if args.convert is not None:
        reader = open_dataset(args.convert, **format_options(args), caption_extension=args.caption_extension)
        write_shards(reader, out, num_workers=args.workers, force=args.force)
        return f"shards of {args.convert} written to {out}"
    if args.format == "shards" and out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace the shards")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    maker = HINTS[args.detector]
    detector = maker.detector(device=device, random_init=args.random_weights)
    captions = default_captions(Path(args.images), args.prompt, Path(args.metadata) if args.metadata else None,
                                args.caption_extension)
    folder = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work") \
        if args.format == "shards" else out
    report = build_from_images(args.images, folder, lambda image: maker.make(
        detector, image, args.detect_resolution, **args.detector_options), captions, args.min_size, args.workers)
    lines = [report.summary()]
    if report.skipped:
        lines.append(f"skipped files and reasons: {folder / 'report.json'}")
    if args.format == "shards":
        write_shards(open_dataset(folder, "fill50k"), out, num_workers=args.workers, force=args.force)
        lines.append(f"shards: {out} (from {folder}, which a later run resumes)")
    else:
        lines.append(f"data set: {out} (train with --data_root {out})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    print(make(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run_tool(main))

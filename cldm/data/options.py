"""The readers' command-line options for the commands that read a data root in any format (the dataset
builder's --convert, the evaluation): which format, each format's own options, and the sizing."""

import argparse

from cldm.data import FORMATS
from cldm.data.images import RESIZE_MODES

# option -> open_dataset's keyword of the same name
FORMAT_OPTIONS = ("conditioning_data_dir", "image_column", "conditioning_image_column", "caption_column", "split",
                  "allow_outside_root")


def add_format_arguments(group: argparse._ArgumentGroup, purpose: str = "train on") -> None:
    """--data_format and the format options (kohya's hint folder, hf's columns and split, the outside-root
    switch); `purpose` ends the help of --split ("the split to ...")."""
    group.add_argument("--data_format", choices=FORMATS, default=None,
                       help="the reader of the data root (default: told by the files it holds)")
    group.add_argument("--conditioning_data_dir", default=None, help="kohya format: the folder of hint images")
    group.add_argument("--image_column", default="image", help="hf format: the target image column")
    group.add_argument("--conditioning_image_column", default="conditioning_image", help="hf format: the hint column")
    group.add_argument("--caption_column", default="text", help="hf format: the caption column")
    group.add_argument("--split", default="train", help=f"hf format: the split to {purpose}")
    group.add_argument("--allow_outside_root", action="store_true",
                       help="fill50k and hf formats: read image paths (prompt.json entries, path columns) that are "
                            "absolute or contain '..'")


def add_resize_arguments(group: argparse._ArgumentGroup, resolution_default: str = "as stored") -> None:
    """--resolution and --resize: how images of any size are brought to one."""
    group.add_argument("--resolution", type=int, default=None,
                       help=f"bring images of any size to this resolution with --resize (default: "
                            f"{resolution_default})")
    group.add_argument("--resize", choices=RESIZE_MODES, default="center_crop",
                       help="with --resolution: short side to N then a centre or random N x N crop, a stretch to "
                            "N x N, or aspect-ratio buckets of about N*N pixels (default %(default)s)")


def format_options(args: argparse.Namespace) -> dict:
    """open_dataset's keywords from the options of add_format_arguments."""
    return {"data_format": args.data_format, **{name: getattr(args, name) for name in FORMAT_OPTIONS}}

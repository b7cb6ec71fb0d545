"""Is the control obeyed? Sample a ControlLDM on held-out data with and without control, and score both.

    python tool_eval_control.py --config models/cldm_demo.yaml \\
        --ckpt demo_out/control_demo_ini.safetensors demo_out/train/control_model.safetensors \\
        --data_root demo_out/data/val --n 128 --metrics fill canny ssim --out demo_out/eval.json
    python tool_eval_control.py ... --sampler dpmpp_2m_karras --steps 20
    python tool_eval_control.py --config models/cldm_v15_lllite.yaml \
        --ckpt models/v1-5-pruned.ckpt out/control_model.safetensors --data_root ...   # an LLLite or LoRA export

On SDXL configs --original_size, --crops_coords_top_left and --target_size set the size conditioning of
both passes (diffusers' names; default: the image size and crop 0 0).

The metrics (fill, canny, ssim, depth, seg) are defined in cldm/fidelity.py. Sample i starts from noise seeded
by seed + i in both runs, so the two are paired; "without control" samples with no control at all.
The table gives mean ± std over the samples and the paired difference with its 95% interval; --out writes
the same as JSON and --sheet a PNG of hint | target | without control | with control.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from cldm.cli import run_tool
from cldm.fidelity import Scorers, evaluate, format_table, load_samples, save_sheet, summarize
from cldm.loader import load_model
from ldm.checkpoint import write_text
from ldm.models.diffusion.samplers import SAMPLERS

# SDXL's size conditioning, sample()'s arguments (diffusers' names)
SIZE_OPTIONS = {"original_size": "original (height, width)", "crops_coords_top_left": "crop's (top, left)",
                "target_size": "target (height, width)"}
SIZE_DEFAULTS = {"original_size": "the image size", "crops_coords_top_left": "0 0", "target_size": "the image size"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="./models/cldm_demo.yaml")
    p.add_argument("--ckpt", nargs="+", required=True,
                   help="weights, loaded in order: a whole checkpoint, or a base then a control export of the config's "
                        "mode (full ControlNet, control-LoRA or LLLite, in any of its layouts)")
    p.add_argument("--data_root", required=True, help="held-out data (any format of docs/data.md, e.g. Fill50K's)")
    p.add_argument("--n", type=int, default=128, help="samples to evaluate (the first N of the data root)")
    p.add_argument("--metrics", nargs="+", default=["fill", "canny", "ssim"],
                   help="any of fill canny ssim depth seg (depth/seg need their detector weights)")
    p.add_argument("--detector", default="canny", help="what ssim applies to the output: canny or hed")
    p.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded by seed + i")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=20, help="sampling steps")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=64)
    for name, meaning in SIZE_OPTIONS.items():
        p.add_argument(f"--{name}", type=int, nargs=2, default=None, metavar=("A", "B"),
                       help=f"SDXL configs: condition on this {meaning} (default: {SIZE_DEFAULTS[name]})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    p.add_argument("--sheet", default=None, help="write a PNG of hint | target | without | with control here")
    p.add_argument("--force", action="store_true", help="overwrite existing --out / --sheet files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON summary (also written to --out)."""
    args = parse_args(argv)
    for path in (args.out, args.sheet):
        if path and Path(path).exists() and not args.force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    model = load_model(args.config, args.ckpt)[0].to(args.device).eval()
    prompts, hints, targets = load_samples(args.data_root, args.n)
    scorers = Scorers(args.metrics, args.detector, args.device)
    for name, why in scorers.skipped.items():
        print(f"Skipping {name}: {why}")
    sizes = {name: tuple(getattr(args, name)) for name in SIZE_OPTIONS if getattr(args, name) is not None}
    scores, images = evaluate(model, prompts, hints, targets, scorers, args.seed, args.steps, args.scale,
                              args.batch_size, args.sampler, sizes=sizes)
    summary = {"n": args.n, "seed": args.seed, "sampler": args.sampler, "steps": args.steps,
               "guidance_scale": args.scale, **sizes, "checkpoints": [str(p) for p in args.ckpt],
               "data_root": str(args.data_root), "metrics": summarize(scores), "skipped": scorers.skipped}
    print(format_table(summary["metrics"]))
    if args.out:
        write_text(args.out, json.dumps(summary, indent=2))
    if args.sheet:
        save_sheet(args.sheet, hints, targets, images, prompts)
    return summary


if __name__ == "__main__":
    sys.exit(run_tool(main))

"""Is the control obeyed? Sample a ControlLDM on held-out data and score it, on our own terms or by ControlNet++'s
evaluation protocol.

Our own terms: with and without control, paired.

    python tool_eval_control.py --config models/cldm_demo.yaml \\
        --ckpt demo_out/control_demo_ini.safetensors demo_out/train/control_model.safetensors \\
        --data_root demo_out/data/val --n 128 --metrics fill canny ssim --out demo_out/eval.json
    python tool_eval_control.py ... --sampler dpmpp_2m_karras --steps 20
    python tool_eval_control.py --config models/cldm_v15_lllite.yaml \\
        --ckpt models/v1-5-pruned.ckpt out/control_model.safetensors --data_root ...   # an LLLite or LoRA export
    python tool_eval_control.py --config models/cldm_xl_union.yaml --control_type depth \
        --ckpt models/sd_xl_base_1.0.safetensors controlnet-union-sdxl-1.0/diffusion_pytorch_model.safetensors ...

The metrics (fill, canny, ssim, depth, seg) are defined in cldm/fidelity.py. Sample i starts from noise seeded
by seed + i in both runs, so the two are paired; "without control" samples with no control at all.
The table gives mean ± std over the samples and the paired difference with its 95% interval; --out writes
the same as JSON (with each sample's scores) and --sheet a PNG of hint | target | without control | with control.
--compare_with EARLIER.json compares with an earlier --out of the same samples, seeds and sampling (a model before
reward fine-tuning, for one): each metric with control before and after, and their paired difference with its 95%
interval.

ControlNet++'s protocol (cldm/protocol.py, docs/evaluation.md): one condition's number as the paper computes it,
with the paper's sampling (4 images per prompt, UniPC, 20 steps, guidance 7.5, 512 x 512) unless overridden, and a
95% bootstrap interval over the prompts; --compare_with an earlier protocol --out of the same prompts and seeds
adds the paired difference.

    python tool_eval_control.py --protocol controlnet++ --condition hed --config models/cldm_v15.yaml \\
        --ckpt models/v1-5-pruned.ckpt models/control_v11p_sd15_softedge.pth \\
        --data_root data/multigen_eval --out eval_hed.json --markdown eval_hed.md

On SDXL configs --original_size, --crops_coords_top_left and --target_size set the size conditioning of
both passes (diffusers' names; default: the image size and crop 0 0).
"""

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cldm.cli import run_tool
from cldm.controlnet_union import control_type_params
from cldm.data import Resize, open_dataset
from cldm.data.options import add_format_arguments, add_resize_arguments, format_options
from cldm.fidelity import (
    PAIRING,
    Scorers,
    compare,
    evaluate,
    format_comparison,
    format_table,
    load_samples,
    save_sheet,
    summarize,
)
from cldm.image_quality import FID, CLIPScore
from cldm.loader import load_model
from cldm.protocol import HINT_SOURCES, LINEART_INVERSIONS, PAPER, TASKS, ProtocolRun, Sampling, paired_difference
from cldm.protocol import run as run_protocol
from cldm.protocol import summarize as summarize_protocol
from ldm.checkpoint import UserError, write_text
from ldm.models.diffusion.samplers import SAMPLERS

log = logging.getLogger(__name__)

PROTOCOLS = ("controlnet++",)
# SDXL's size conditioning, sample()'s arguments (diffusers' names)
SIZE_OPTIONS = {"original_size": "original (height, width)", "crops_coords_top_left": "crop's (top, left)",
                "target_size": "target (height, width)"}
SIZE_DEFAULTS = {"original_size": "the image size", "crops_coords_top_left": "0 0", "target_size": "the image size"}
# our own evaluation's sampling; the protocol's is cldm.protocol.Sampling's
OWN = {"n": 128, "seed": 0, "sampler": "ddim", "steps": 20, "scale": 3.0, "batch_size": 64}
PAPER_RESOLUTION = 512  # the paper resizes every image and condition to 512 x 512
OWN_ONLY = ("metrics", "detector", "sheet")
PROTOCOL_ONLY = ("condition", "images_per_prompt", "hint_source", "negative_prompt", "markdown", "fid", "clip_score",
                 "lineart_inversion")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    paper = PAPER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="./models/cldm_demo.yaml")
    p.add_argument("--ckpt", nargs="+", required=True,
                   help="weights, loaded in order: a whole checkpoint, or a base then a control export of the config's "
                        "mode (ControlNet, control-LoRA, LLLite, T2I-Adapter, ControlNet-XS or ControlNet-Union, in "
                        "any of its layouts)")
    p.add_argument("--control_type", default=None,
                   help="ControlNet-Union configs: what the held-out hints show (openpose, depth, canny, ...; default "
                        "the config's control_type)")
    p.add_argument("--data_root", required=True, help="held-out data (any format of docs/data.md, e.g. Fill50K's)")
    p.add_argument("--n", type=int, default=None,
                   help=f"samples to evaluate, the first N of the data root (default {OWN['n']}; the protocol: all)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="any of fill canny ssim depth seg (default fill canny ssim; depth/seg need their detector "
                        "weights)")
    p.add_argument("--detector", default=None, help="what ssim applies to the output: canny (default) or hed")
    p.add_argument("--seed", type=int, default=None,
                   help=f"sample i starts from noise seeded by seed + i (default {OWN['seed']}); the protocol: image "
                        f"g of prompt i from seed + G*i + g (default {paper.seed})")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help=f"(default {OWN['sampler']}; the protocol: {paper.sampler})")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=None,
                   help=f"sampling steps (default {OWN['steps']}; the protocol: {paper.steps})")
    p.add_argument("--scale", type=float, default=None,
                   help=f"classifier-free guidance scale (default {OWN['scale']}; the protocol: "
                        f"{paper.guidance_scale})")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"images per sampling call (default {OWN['batch_size']}; the protocol: {paper.batch_size})")
    for name, meaning in SIZE_OPTIONS.items():
        p.add_argument(f"--{name}", type=int, nargs=2, default=None, metavar=("A", "B"),
                       help=f"SDXL configs: condition on this {meaning} (default: {SIZE_DEFAULTS[name]})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    p.add_argument("--sheet", default=None, help="write a PNG of hint | target | without | with control here")
    p.add_argument("--compare_with", default=None, metavar="EARLIER_JSON",
                   help="an earlier --out of the same samples, seeds and sampling: report the paired difference of "
                        "each metric with control, or of the protocol's number (after - before)")
    p.add_argument("--force", action="store_true", help="overwrite existing --out / --sheet / --markdown files")
    protocol = p.add_argument_group("a published protocol (docs/evaluation.md)")
    protocol.add_argument("--protocol", choices=PROTOCOLS, default=None,
                          help="evaluate as this paper does instead of with and without control")
    protocol.add_argument("--condition", choices=sorted(TASKS), default=None, help="the condition to score")
    protocol.add_argument("--images_per_prompt", type=int, default=None,
                          help=f"images drawn per prompt, each from its own seed (default {paper.images_per_prompt})")
    protocol.add_argument("--hint_source", choices=HINT_SOURCES, default=None,
                          help="canny, hed, lineart: make the hint from the image with the condition's detector, as "
                               "the paper does (default), or take the data's hint")
    protocol.add_argument("--negative_prompt", default=None, help=f"(default {paper.negative_prompt!r})")
    protocol.add_argument("--lineart_inversion", choices=LINEART_INVERSIONS, default=None,
                          help="lineart: invert the images' drawings as the paper's code does, wrapping around "
                               "uint8 (default), or exactly (docs/evaluation.md)")
    protocol.add_argument("--fid", action="store_true", default=None,
                          help="also FID of each group of images against the targets, averaged over the groups "
                               "(needs annotator/ckpts/weights-inception-2015-12-05-6726825d.pth)")
    protocol.add_argument("--clip_score", action="store_true", default=None,
                          help="also the CLIP score of the images with their prompts (needs "
                               "annotator/ckpts/clip-vit-base-patch16/)")
    protocol.add_argument("--bootstrap", type=int, default=2000, help="resamples of the 95%% interval")
    protocol.add_argument("--markdown", default=None, help="write the result as a Markdown table here")
    data = p.add_argument_group("reading --data_root (docs/data.md)")
    add_format_arguments(data, purpose="evaluate")
    add_resize_arguments(data, resolution_default=f"as stored; the protocol: {PAPER_RESOLUTION}, stretched")
    data.add_argument("--caption_extension", default=None, help="kohya format: caption files' extension (default .txt)")
    return p.parse_args(argv)


def refuse_misplaced(args: argparse.Namespace) -> None:
    """Options of the other mode are refused by name: none would take effect."""
    misplaced = OWN_ONLY if args.protocol else PROTOCOL_ONLY
    given = [f"--{name}" for name in misplaced if getattr(args, name) is not None]
    if given:
        where = f"--protocol {args.protocol}" if args.protocol else "the evaluation with and without control"
        raise UserError(f"{', '.join(given)} does not apply to {where}",
                        "the protocol takes --condition and its own options; the paired evaluation --metrics, "
                        "--detector and --sheet")
    if args.protocol and args.condition is None:
        raise UserError(f"--protocol {args.protocol} needs --condition (one of {', '.join(sorted(TASKS))})")


def dataset_of(args: argparse.Namespace):
    """The reader of --data_root, sized as asked (the protocol's default: the paper's 512 x 512 stretch)."""
    resolution = args.resolution if args.resolution is not None or not args.protocol else PAPER_RESOLUTION
    resize = Resize(resolution, "stretch" if args.resolution is None else args.resize)
    return open_dataset(args.data_root, resize=resize, shuffle=False, caption_extension=args.caption_extension,
                        **format_options(args))


def model_of(args: argparse.Namespace) -> torch.nn.Module:
    """The config's model with --ckpt's weights (the Union configs' --control_type), on --device for sampling."""
    model = load_model(args.config, args.ckpt, params=control_type_params(args.config, args.control_type))[0]
    return model.to(args.device).eval()


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON summary (also written to --out)."""
    args = parse_args(argv)
    refuse_misplaced(args)
    for path in (args.out, args.sheet, args.markdown):
        if path and Path(path).exists() and not args.force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    sizes = {name: tuple(getattr(args, name)) for name in SIZE_OPTIONS if getattr(args, name) is not None}
    if args.protocol:
        return protocol_main(args, sizes)
    own = {k: OWN[k] if getattr(args, k) is None else getattr(args, k) for k in OWN}
    earlier = read_earlier(args.compare_with, "per_sample") if args.compare_with else None
    model = model_of(args)
    reader = {"resize": Resize(args.resolution, args.resize), **format_options(args)}
    prompts, hints, targets = load_samples(args.data_root, own["n"], caption_extension=args.caption_extension,
                                           **reader)
    scorers = Scorers(args.metrics or ["fill", "canny", "ssim"], args.detector or "canny", args.device)
    for name, why in scorers.skipped.items():
        print(f"Skipping {name}: {why}")
    scores, images = evaluate(model, prompts, hints, targets, scorers, own["seed"], own["steps"], own["scale"],
                              own["batch_size"], own["sampler"], sizes=sizes)
    summary = {"n": own["n"], "seed": own["seed"], "sampler": own["sampler"], "steps": own["steps"],
               "guidance_scale": own["scale"], **sizes, "checkpoints": [str(p) for p in args.ckpt],
               "data_root": str(args.data_root), "metrics": summarize(scores), "skipped": scorers.skipped,
               "per_sample": {c: {k: v.tolist() for k, v in s.items()} for c, s in scores.items()}}
    print(format_table(summary["metrics"]))
    if earlier is not None:
        summary["compared_with"] = {"path": str(args.compare_with),
                                    "metrics": compared(summary, earlier, args.compare_with)}
        print(f"\nAgainst {args.compare_with}:\n{format_comparison(summary['compared_with']['metrics'])}")
    if args.out:
        write_text(args.out, json.dumps(summary, indent=2))
    if args.sheet:
        save_sheet(args.sheet, hints, targets, images, prompts)
    return summary


def read_earlier(path: str, scores: str = "per_sample") -> dict:
    """An earlier evaluation's summary (--out), which must hold each sample's ("per_sample") or each prompt's
    ("per_prompt", the protocol's) scores."""
    try:
        earlier = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--compare_with {path} is not JSON: {err}") from err
    if not isinstance(earlier, dict) or scores not in earlier:
        kind = "a run with --protocol" if scores == "per_prompt" else "a run with and without control"
        raise UserError(f"--compare_with {path} holds no {scores.replace('_', '-')} scores",
                        f"give the --out file of {kind} of tool_eval_control.py")
    return earlier


def compared(summary: dict, earlier: dict, path: str) -> dict:
    """This evaluation's scores with control against the earlier one's, refused by name where the two did not
    sample the same things."""
    differ = [key for key in PAIRING if summary[key] != earlier.get(key)]
    if differ:
        raise UserError(f"--compare_with {path} was evaluated with other settings: "
                        + ", ".join(f"{k} {earlier.get(k)!r} there, {summary[k]!r} here" for k in differ),
                        "evaluate both with the same data, --n, --seed, --sampler, --steps and --scale")
    return compare({k: np.asarray(v) for k, v in summary["per_sample"]["control"].items()},
                   {k: np.asarray(v) for k, v in earlier["per_sample"]["control"].items()})


def protocol_main(args: argparse.Namespace, sizes: dict) -> dict:
    chosen = {"images_per_prompt": args.images_per_prompt, "seed": args.seed, "sampler": args.sampler,
              "steps": args.steps, "guidance_scale": args.scale, "negative_prompt": args.negative_prompt,
              "batch_size": args.batch_size}
    sampling = Sampling(**{k: v for k, v in chosen.items() if v is not None})
    if args.lineart_inversion is not None and args.condition != "lineart":
        raise UserError(f"--lineart_inversion applies to --condition lineart, not {args.condition}")
    options = {"inversion": args.lineart_inversion} if args.lineart_inversion else {}
    task = TASKS[args.condition](args.device, args.hint_source, **options)
    earlier = read_earlier(args.compare_with, "per_prompt") if args.compare_with else None
    if earlier is not None and (earlier.get("condition"), earlier.get("sampling")) != (task.name, asdict(sampling)):
        raise UserError(f"--compare_with {args.compare_with} is a {earlier.get('condition')} evaluation sampled with "
                        f"{earlier.get('sampling')}, not {task.name} with {asdict(sampling)}",
                        "evaluate both with the same condition and sampling options")
    quality = {}  # the networks load before sampling starts, so a missing file stops the run at once
    if args.fid:
        quality["fid"] = FID(sampling.images_per_prompt, args.device)
    if args.clip_score:
        quality["clip_score"] = CLIPScore(args.device)
    dataset = dataset_of(args)
    model = model_of(args)
    result = run_protocol(model, dataset, task, args.n, sampling, list(quality.values()), sizes)
    summary = {"protocol": args.protocol, **summarize_protocol(result, args.bootstrap), **sizes,
               "image_quality": {name: sink.summary(args.bootstrap) for name, sink in quality.items()},
               "checkpoints": [str(p) for p in args.ckpt], "data_root": str(args.data_root)}
    if earlier is not None:
        try:
            difference = paired_difference(result, ProtocolRun.from_summary(earlier), args.bootstrap)
        except ValueError as err:
            raise UserError(f"--compare_with {args.compare_with}: {err}") from err
        summary["compared_with"] = {"path": str(args.compare_with), "before": earlier["value"], **difference}
    table = protocol_table(summary)
    print(table)
    if args.out:
        write_text(args.out, json.dumps(summary, indent=2), force=args.force)
    if args.markdown:
        write_text(args.markdown, table + "\n", force=args.force)
    return summary


def protocol_table(summary: dict) -> str:
    """The result as a Markdown table with what it was measured on."""
    s = summary["sampling"]
    size = f"{summary['prompts']} x {s['images_per_prompt']}"

    def row(name: str, figure: dict) -> str:
        better = "higher" if figure["higher_is_better"] else "lower"
        spread = (f"{figure['ci95'][0]:.4g} to {figure['ci95'][1]:.4g}" if "ci95" in figure else
                  "groups " + ", ".join(f"{v:.4g}" for v in figure["per_group"]))
        return f"| {name}{figure['metric']} ({better} is better) | {figure['value']:.4g} | {spread} | {size} |"
    lines = ["| figure | value | 95% interval | prompts x images |", "|---|---|---|---|",
             row(f"{summary['condition']} ", summary)]
    lines += [row("", figure) for figure in summary["image_quality"].values()]
    lines += ["",
              f"{summary['protocol']} protocol: {s['sampler']}, {s['steps']} steps, guidance {s['guidance_scale']}, "
              f"negative prompt {s['negative_prompt']!r}, seed {s['seed']}, {summary['resolution'][0]}x"
              f"{summary['resolution'][1]}, hint from the {summary['hint_source']}; checkpoints "
              f"{', '.join(summary['checkpoints'])}; data {summary['data_root']}."]
    if summary["differs_from_paper"]:
        lines.append(f"Differs from the paper's settings in: {', '.join(summary['differs_from_paper'])}.")
    if "compared_with" in summary:
        c = summary["compared_with"]
        lines.append(f"Against {c['path']} (same prompts and seeds): {c['before']:.4g} there, "
                     f"{summary['value']:.4g} here, difference {c['difference']:+.4g} (95% interval "
                     f"{c['ci95'][0]:+.4g} to {c['ci95'][1]:+.4g}).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_tool(main))

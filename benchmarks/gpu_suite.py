"""The GPU figures of issue 7 in one process: full-size SD1.5 ControlNet, random weights, ours beside diffusers.

    bash benchmarks/run_gpu.sh [TABLE.md]          # installs what is missing, then runs this
    python benchmarks/gpu_suite.py --table TABLE.md

Stages, in this order (a failed stage is reported in the table and the next one still runs; the table
file is rewritten after every stage, so a run cut short keeps what it measured):
  train      bf16-mixed, cached latents, batch 4: samples/s and peak memory, the sides alternating
             (plus ours without bf16 GroupNorm, and without fused AdamW)
  sample     DDIM 20 steps, CFG, batch 1, bf16 weights, eager (plus ours without batched CFG, and without
             reusing the hint encoding)
  max_batch  the largest batch of --max_batches at which our step fits with only our model on the GPU;
             each side alone on the GPU at that batch: samples/s and peak memory
  compiled   sampling again with torch.compile(mode="reduce-overhead") (CUDA graphs) on both sides
  train_compiled  (not run unless named) training as in `train`, both sides under torch.compile: minutes of
             compiling per side, so it is a stage of its own
Models are built once. Before each stage both sides get back float32 weights and the same initial
ControlNet weights, so they always compute the same function.
"""
import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cldm.bench import sampling as bench_sample  # noqa: E402
from cldm.bench import training as bench_train  # noqa: E402
from cldm.bench.measure import TINY, Precision, build_ours, mib, release, timed, write_table  # noqa: E402
from cldm.cli import run_tool  # noqa: E402
from cldm.diffusers_peer import build_peer  # noqa: E402

STAGES = ("train", "sample", "max_batch", "compiled", "train_compiled")
DEFAULT_STAGES = STAGES[:4]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="models/cldm_v15.yaml")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=STAGES)
    p.add_argument("--max_batches", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64],
                   help="batch sizes tried in order by the max_batch stage")
    p.add_argument("--table", default=None, help="write the markdown table to this file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny config on the CPU, one step of each kind, no compile stage (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.resolution, args.device = str(TINY), 32, "cpu"
        args.stages, args.max_batches = [s for s in args.stages if "compiled" not in s], [1, 2]
    return args


def one_side_at(side, device: torch.device, steps: int) -> dict:
    """Peak memory of one step, then samples per second over `steps` steps, for a lone side."""
    step, holders, optimizer = side
    step()
    memory = bench_train.step_memory(step, holders, optimizer, device)["memory"]
    return {"memory": memory, "seconds_per_step": timed(step, steps, device) / steps}


def fits(model: torch.nn.Module, args: argparse.Namespace, batch_size: int, device: torch.device) -> bool:
    """Whether one bf16 cached training step of ours at `batch_size` runs without running out of memory."""
    try:
        batch = bench_train.make_batch(model, batch_size, args.resolution, device, cached=True)
        bench_train.our_side(model, batch, Precision("bf16-mixed", device))[0]()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        release(device)


def max_batch_stage(args: argparse.Namespace, model, peer, device: torch.device) -> list[tuple]:
    movable = [peer.unet, peer.controlnet, peer.vae]
    for net in movable:
        net.to("cpu")
    release(device)
    batch_size = None
    for candidate in args.max_batches:
        if not fits(model, args, candidate, device):
            break
        batch_size = candidate
    if batch_size is None:
        return [("train max batch", f"none of {args.max_batches} fits", "-", "-", "-")]
    precision = Precision("bf16-mixed", device)
    batch = bench_train.make_batch(model, batch_size, args.resolution, device, cached=True)
    ours = one_side_at(bench_train.our_side(model, batch, precision), device, steps=3)
    model.zero_grad(set_to_none=True)
    model.to("cpu")
    for net in movable:
        net.to(device)
    release(device)
    try:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        theirs = one_side_at(bench_train.peer_side(model, peer, batch, precision), device, steps=3)
        theirs_text = (f"{batch_size / theirs['seconds_per_step']:.3g}", mib(theirs["memory"]))
        ratio = f"{theirs['seconds_per_step'] / ours['seconds_per_step']:.2f}x"
    except torch.OutOfMemoryError:
        theirs_text, ratio = ("out of memory", "out of memory"), "-"
    peer.controlnet.zero_grad(set_to_none=True)
    model.to(device)
    release(device)
    setting = f"{Path(args.config).stem} {args.resolution}px b{batch_size} bf16-mixed cached, each side alone"
    return [("train samples/s at max batch", setting, f"{batch_size / ours['seconds_per_step']:.3g}",
             theirs_text[0], ratio),
            ("train peak memory at max batch", setting, mib(ours["memory"]), theirs_text[1], "-")]


def main(argv: list[str] | None = None) -> list[tuple]:
    args = parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    model = build_ours(args.config, device)
    peer = build_peer(model, args.config, device)
    print(f"built both sides in {time.perf_counter() - start:.0f} s")
    initial = {"ours": {k: v.detach().to("cpu", copy=True) for k, v in model.control_model.state_dict().items()},
               "diffusers": {k: v.detach().to("cpu", copy=True) for k, v in peer.controlnet.state_dict().items()}}
    common = ["--config", args.config, "--resolution", str(args.resolution), "--device", args.device,
              *(["--smoke"] if args.smoke else [])]
    train = ["--precision", "bf16-mixed", "--cached", "--batch", "4", "--warmup", "3", "--steps", "5"]
    sample = ["--precision", "bf16", "--batch", "1", "--rounds", "3"]
    # the eager stages also time our model with single changes undone (see cldm.bench.measure.ABLATIONS)
    ablate_train = ["--without", "bf16_groupnorm", "fused_adamw"]
    ablate_sample = ["--without", "batched_cfg", "hint_reuse"]
    runs = {"train": lambda: bench_train.run(bench_train.parse_args(common + train + ablate_train), model,
                                             peer)["rows"],
            "max_batch": lambda: max_batch_stage(args, model, peer, device),
            "sample": lambda: bench_sample.run(bench_sample.parse_args(common + sample + ablate_sample), model,
                                               peer)["rows"],
            "compiled": lambda: bench_sample.run(bench_sample.parse_args(
                common + sample + ["--compile", "reduce-overhead", "--warmup", "2"]), model, peer)["rows"],
            "train_compiled": lambda: bench_train.run(bench_train.parse_args(common + train + ["--compile"]), model,
                                                      peer)["rows"]}
    rows, title = [], f"gpu_suite: {' '.join(argv if argv is not None else sys.argv[1:])}"
    for stage in args.stages:
        for net in (model.model, model.control_model, peer.unet, peer.controlnet):
            net.float()
        model.control_model.load_state_dict(initial["ours"])
        peer.controlnet.load_state_dict(initial["diffusers"])
        began = time.perf_counter()
        try:
            rows += runs[stage]()
        except Exception as err:  # one broken stage must not cost the figures of the others
            traceback.print_exc()
            rows.append((stage, "failed", f"{type(err).__name__}: {str(err)[:120]}", "-", "-"))
        release(device)
        print(f"stage {stage}: {time.perf_counter() - began:.0f} s", flush=True)
        write_table(rows, title, args.table, append=False)
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    sys.exit(run_tool(main))

"""One row of the control-mode table in docs/modes.md: what a mode trains, ships and costs, for one config.

    python benchmarks/bench_modes.py --header
    python benchmarks/bench_modes.py --config models/cldm_v15_lora.yaml --meta --label LoRA-offset
    python benchmarks/bench_modes.py --config models/cldm_tiny_lora.yaml --label LoRA-offset --threads 1

--meta builds the config on the meta device (no memory, any size): trainable parameters, control-file size
(`control_state_dict()` tensor bytes in fp16 and fp32, header excluded) and static training memory (distinct
weights in fp32 plus AdamW's two moments per trainable parameter; activations excluded).

Without --meta the model is built for real, its UNet's zero-initialised layers made random, and trained on
random images, hints and prompts. One step: shared_step (VAE, text encoder, random t and noise, control + UNet
forward, MSE), backward, optimizer step, zero_grad. steps/s is over --steps timed steps after --warmup; peak
memory is cldm/bench/measure.py's: static tensor bytes (weights, buffers, optimizer state) plus the peak of the
tensors allocated during one more step. The measurements are cldm/bench/costs.py's.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cldm.bench.costs import (  # noqa: E402
    control_file_bytes,
    random_batch,
    static_bytes_from_shapes,
    step_cost,
    trainable_count,
)
from cldm.bench.measure import PRECISIONS, machine, randomize_zero_layers  # noqa: E402
from cldm.model import create_model  # noqa: E402

HEADER = ("| mode | config | device | trainable params | control file fp16 / fp32 | static memory | "
          "peak training memory | steps/s |\n|---|---|---|---|---|---|---|---|")


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="models/cldm_tiny_lora.yaml")
    p.add_argument("--label", default=None, help="the mode's name in the table (default: the model class)")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--meta", action="store_true", help="counts and sizes from shapes only; no training")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.header:
        print(HEADER)
    torch.manual_seed(0)
    model = create_model(args.config, device="meta" if args.meta else None)
    fp16, fp32 = control_file_bytes(model)
    if args.meta:
        device = "meta (shapes)"
        static, peak, speed = f"{megabytes(static_bytes_from_shapes(model))} (fp32 weights + AdamW)", "–", "–"
    else:
        target = torch.device(args.device)
        randomize_zero_layers(model.model)  # a trained-looking UNet, so the control's gradients are not trivial
        cost = step_cost(model, random_batch(model, args.batch_size, target), args.precision, target, args.warmup,
                         args.steps)
        static, peak, speed = megabytes(cost.static), megabytes(cost.peak), f"{1 / cost.seconds_per_step:.2f}"
        device = f"{machine()}; batch {args.batch_size}, {args.precision}"
    label = args.label or type(model).__name__
    print(f"| {label} | {Path(args.config).name} | {device} | {trainable_count(model):,} | {megabytes(fp16)} / "
          f"{megabytes(fp32)} | {static} | {peak} | {speed} |")


if __name__ == "__main__":
    main()

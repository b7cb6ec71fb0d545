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
tensors allocated during one more step.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cldm.bench.measure import (  # noqa: E402
    PRECISIONS,
    PeakMemory,
    Precision,
    machine,
    randomize_zero_layers,
    tensor_bytes,
    timed,
)
from cldm.data.batch import HINT  # noqa: E402
from cldm.model import create_model  # noqa: E402
from ldm.batch import CAPTION, IMAGE  # noqa: E402

HEADER = ("| mode | config | device | trainable params | control file fp16 / fp32 | static memory | "
          "peak training memory | steps/s |\n|---|---|---|---|---|---|---|---|")


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def file_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Tensor bytes of the control file in fp16 and in fp32."""
    numel = sum(v.numel() for v in model.control_state_dict().values())
    return 2 * numel, 4 * numel


def meta_row(model: torch.nn.Module) -> tuple[str, str, str]:
    """(device, static memory, peak) of a meta-built model: fp32 weights + AdamW moments, from shapes."""
    distinct = {id(p): p for p in model.parameters()}.values()
    weights = 4 * sum(p.numel() for p in distinct)
    moments = 2 * 4 * sum(p.numel() for p in model.trainable_parameters())
    return "meta (shapes)", f"{megabytes(weights + moments)} (fp32 weights + AdamW)", "–"


def make_batch(model: torch.nn.Module, batch: int, device: torch.device) -> dict:
    size = model.image_size * model.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    return {IMAGE: (torch.rand(batch, size, size, 3, generator=gen) * 2 - 1).to(device),
            HINT: torch.rand(batch, size, size, 3, generator=gen).to(device),
            CAPTION: [f"a circle of colour {i} on a plain background" for i in range(batch)]}


def measure(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[str, str, str]:
    """(static memory, peak training memory, steps/s) of real training steps."""
    randomize_zero_layers(model.model)  # a trained-looking UNet, so the control's gradients are not trivial
    model.to(device).train()
    optimizer = model.configure_optimizers()
    precision = Precision(args.precision, device)
    batch = make_batch(model, args.batch_size, device)

    def step() -> None:
        with precision.autocast():
            loss, _ = model.shared_step(batch)
        precision.step(loss, optimizer)

    timed(step, args.warmup, device)  # the optimizer's moments exist after the first step
    static = tensor_bytes([model], optimizer)
    seconds = timed(step, args.steps, device)
    with PeakMemory(device) as peak:  # one step: the CPU measure records every allocation, which is slow
        step()
    return megabytes(static), megabytes(static + peak.peak), f"{args.steps / seconds:.2f}"


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
    trainable = sum(p.numel() for p in model.trainable_parameters())
    fp16, fp32 = file_bytes(model)
    if args.meta:
        device, static, peak = meta_row(model)
        speed = "–"
    else:
        target = torch.device(args.device)
        static, peak, speed = measure(model, args, target)
        device = f"{machine()}; batch {args.batch_size}, {args.precision}"
    label = args.label or type(model).__name__
    print(f"| {label} | {Path(args.config).name} | {device} | {trainable:,} | {megabytes(fp16)} / "
          f"{megabytes(fp32)} | {static} | {peak} | {speed} |")


if __name__ == "__main__":
    main()

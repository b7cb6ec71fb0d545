"""Per-GPU memory of training a config under each distributed strategy, from its shapes (meta device) and each
strategy's sharding arithmetic: the table in docs/train.md.

    python benchmarks/bench_sharding.py --config models/cldm_xl.yaml --gpus 1 8 16

The model is built on the meta device (no memory, any size). Counted: every distinct weight, the gradients
and AdamW moments of the trainable ones, and the buffers each strategy adds; activations are excluded (they
depend on batch, resolution and gradient checkpointing, and are the same under every strategy). What each
strategy keeps, per parameter, on each of N GPUs (T trainable, B frozen parameters):

  ddp           B weights (fp32, or bf16 with --frozen_dtype bf16), T x (4 weight + 4 gradient + 4 DDP's
                bucketed copy of the gradients + 8 AdamW moments); on one GPU (no DDP) without the buckets
  ddp, adamw8bit   as ddp with 2 bytes of 8-bit moments instead of 8 (bitsandbytes' block scales are <1%)
  fsdp          B weights whole on every GPU (cldm/sharding.py leaves the frozen base unsharded), T x 16 / N,
                and the units being computed whole: two units' weights (the current and the prefetched one)
                and one unit's gradients, 12 bytes per parameter of the largest unit
  fsdp_cpu_offload   the same, with T x 16 / N in CPU memory instead
  deepspeed_stage_2  DeepSpeed's bf16 mode (what --precision bf16-mixed gives it): every weight in bf16 (2 bytes,
                the frozen base too) on every GPU, and per trainable parameter / N: bf16 gradient 2, fp32 master
                weight 4, moments 8, fp32 gradient 4 at the step; plus the reduce and all-gather buckets
                (Lightning's defaults: 2e8 elements each, bf16)
  deepspeed_stage_2_offload  master weights, moments and fp32 gradients in CPU memory instead
  deepspeed_stage_3  everything / N, the frozen base included, plus the parameters gathered at a time (DeepSpeed's
                stage3_max_live_parameters, 1e9, and the prefetch bucket, 5e7, in bf16)
  deepspeed_stage_3_offload  weights and optimizer state in CPU memory; the gathered parameters on the GPU
"""
import argparse
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cldm.model import create_model  # noqa: E402
from cldm.sharding import sharding_units  # noqa: E402

GB = 1e9
# DeepSpeed ZeRO-3's defaults (deepspeed/runtime/zero/config.py): parameters gathered at once, prefetch bucket.
ZERO3_MAX_LIVE, ZERO3_PREFETCH = 1e9, 5e7


def lightning_deepspeed_default(name: str) -> int:
    """A default of Lightning's DeepSpeedStrategy, read from its signature (deepspeed need not be installed)."""
    from pytorch_lightning.strategies import DeepSpeedStrategy
    return inspect.signature(DeepSpeedStrategy.__init__).parameters[name].default


def counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and frozen parameters (tied ones once), and the trainable parameters of the largest FSDP unit
    (each unit holds what its inner units leave)."""
    distinct = {id(p): p for p in model.parameters()}.values()
    assigned: set[int] = set()
    largest = 0
    for unit in sharding_units([model.control_model, model.model.diffusion_model]):
        own = [p for p in unit.parameters() if p.requires_grad and id(p) not in assigned]
        assigned |= {id(p) for p in own}
        largest = max(largest, sum(p.numel() for p in own))
    return {"trainable": sum(p.numel() for p in distinct if p.requires_grad),
            "frozen": sum(p.numel() for p in distinct if not p.requires_grad), "largest_unit": largest}


def per_gpu(c: dict[str, int], n: int, frozen_bytes: int) -> dict[str, tuple[float, float]]:
    """Strategy -> (GPU bytes, CPU bytes) per process on n GPUs (module docstring)."""
    t, b = c["trainable"], c["frozen"]
    units = 12 * c["largest_unit"]
    buckets = 2 * (lightning_deepspeed_default("reduce_bucket_size")
                   + lightning_deepspeed_default("allgather_bucket_size"))
    gathered = 2 * (ZERO3_MAX_LIVE + ZERO3_PREFETCH)
    return {
        "ddp (1 GPU: auto)": (b * frozen_bytes + t * (20 if n > 1 else 16), 0),
        "ddp, --optimizer adamw8bit": (b * frozen_bytes + t * (14 if n > 1 else 10), 0),
        "fsdp": (b * frozen_bytes + t * 16 / n + units, 0),
        "fsdp_cpu_offload": (b * frozen_bytes + units, t * 16 / n),
        "deepspeed_stage_2": (2 * (b + t) + t * 18 / n + buckets, 0),
        "deepspeed_stage_2_offload": (2 * (b + t) + t * 2 / n + buckets, t * 16 / n),
        "deepspeed_stage_3": ((2 * b + t * 20) / n + gathered, 0),
        "deepspeed_stage_3_offload": (gathered, (2 * b + t * 20) / n),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="models/cldm_xl.yaml")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16], help="GPU counts, one column each")
    p.add_argument("--frozen_dtype", choices=("fp32", "bf16"), default="bf16",
                   help="the frozen base's dtype under ddp and fsdp (DeepSpeed's bf16 mode casts everything)")
    args = p.parse_args(argv)
    model = create_model(args.config, device="meta")
    c = counts(model)
    frozen_bytes = 4 if args.frozen_dtype == "fp32" else 2
    print(f"{args.config}: {c['trainable']:,} trainable parameters, {c['frozen']:,} frozen "
          f"({args.frozen_dtype} under ddp / fsdp), largest FSDP unit {c['largest_unit']:,}; GB per GPU "
          f"(+ CPU GB per process), activations excluded\n")
    print("| --strategy | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in args.gpus) + " |")
    print("|---|" + "---|" * len(args.gpus))
    columns = [per_gpu(c, n, frozen_bytes) for n in args.gpus]
    for name in columns[0]:
        cells = [f"{gpu / GB:.1f}" + (f" (+{cpu / GB:.1f} CPU)" if cpu else "")
                 for gpu, cpu in (column[name] for column in columns)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

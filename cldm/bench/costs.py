"""What a control mode trains, ships and costs: trainable parameters, the control file's bytes, static and peak
training memory, seconds per training step (benchmarks/bench_modes.py prints one row; cldm/bench/comparison.py
reports them beside each mode's fidelity).

One step is what Lightning runs for a ControlLDM: shared_step (VAE, text encoder, random t and noise, control +
UNet forward, loss) under the precision's autocast, backward, optimizer step, zero_grad(set_to_none=True), with the
optimizer of `configure_optimizers` (the mode's trainable set and its learning-rate groups). Peak memory is
cldm/bench/measure.py's: the static tensor bytes (weights, buffers, optimizer state) plus the peak of the tensors
allocated during one more step.
"""

from dataclasses import dataclass

import torch

from cldm.bench.measure import CLOCKS, PeakMemory, Precision, tensor_bytes, timed
from cldm.data.batch import HINT
from ldm.batch import CAPTION, IMAGE


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.trainable_parameters())


def control_file_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Tensor bytes of the mode's control file (`control_state_dict()`, what training exports) in fp16 and fp32."""
    numel = sum(v.numel() for v in model.control_state_dict().values())
    return 2 * numel, 4 * numel


def static_bytes_from_shapes(model: torch.nn.Module) -> int:
    """Every distinct weight in fp32 plus AdamW's two fp32 moments per trainable weight, from shapes alone (a model
    on the meta device); activations excluded."""
    distinct = {id(p): p for p in model.parameters()}.values()
    return 4 * sum(p.numel() for p in distinct) + 2 * 4 * trainable_count(model)


def random_batch(model: torch.nn.Module, batch: int, device: torch.device) -> dict:
    """Random images, hints and prompts of the model's training size."""
    size = model.image_size * model.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    return {IMAGE: (torch.rand(batch, size, size, 3, generator=gen) * 2 - 1).to(device),
            HINT: torch.rand(batch, size, size, 3, generator=gen).to(device),
            CAPTION: [f"a circle of colour {i} on a plain background" for i in range(batch)]}


@dataclass(frozen=True)
class StepCost:
    """Bytes held between steps (weights, buffers, optimizer state), their sum with one step's peak, and seconds per
    step: of the wall clock, and of the process's CPU time (all its threads; with one thread on a shared, loaded
    machine, the time the step itself took, without the time other processes held the core)."""

    static: int
    peak: int
    seconds_per_step: float
    cpu_seconds_per_step: float


def step_cost(model: torch.nn.Module, batch: dict, precision: str, device: torch.device, warmup: int = 3,
              steps: int = 20) -> StepCost:
    """Train `model` (in place) on `batch` for warmup + steps + 1 steps: seconds per step over the `steps` timed
    ones, peak memory over the last (on the CPU the profiler records every allocation, which is slow)."""
    model.to(device).train()
    optimizer = model.configure_optimizers()
    if not isinstance(optimizer, torch.optim.Optimizer):  # (optimizers, schedulers) when the config has a scheduler
        optimizer = optimizer[0][0]
    autocast = Precision(precision, device)

    def step() -> None:
        with autocast.autocast():
            loss, _ = model.shared_step(batch)
        autocast.step(loss, optimizer)

    timed(step, max(1, warmup), device)  # the optimizer's moments exist after the first step
    static = tensor_bytes([model], optimizer)
    cpu_start, wall_start = CLOCKS["cpu"](), CLOCKS["wall"]()
    timed(step, steps, device)
    cpu, wall = (CLOCKS["cpu"]() - cpu_start) / steps, (CLOCKS["wall"]() - wall_start) / steps
    with PeakMemory(device) as peak:
        step()
    return StepCost(static, static + peak.peak, wall, cpu)

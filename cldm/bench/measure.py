"""What the benchmarks share (benchmarks/ are their command lines): our model and diffusers' on the same
weights, precision, timing, memory, tables.

The peer is cldm.diffusers_peer's: diffusers' UNet2DConditionModel + ControlNetModel (+ AutoencoderKL) on our
state dict; both sides use our text encoder: it runs only without cached latents, and then for both alike.

Memory is reported as static + transient: the bytes of the side's own weights, buffers and optimizer state,
plus the peak of the tensors allocated during one step above the level at its start (PeakMemory: the CUDA
allocator's peak, or on CPU the profiler's allocation records). Both sides live in one process, so a
side's figure counts nothing of the other's.
"""
import contextlib
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import unittest.mock
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn

from cldm.diffusers_peer import Peer, build_peer, peer_eps
from cldm.model import create_model
from ldm.modules.diffusionmodules.openaimodel import set_gradient_checkpointing

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]

PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TINY = ROOT / "models" / "cldm_tiny.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Memory of the models just dropped, back before the next is built (and measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def randomize_zero_layers(module: nn.Module, std: float = 0.05, seed: int = 2) -> None:
    """Give zero-initialised weights (zero convs, output convs) random values, as a trained model has.

    Otherwise the residuals and eps are exactly zero and the equality check against diffusers proves nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_ours(config: str | Path, device: torch.device, seed: int = 0) -> nn.Module:
    """The config's ControlLDM with random weights, built on `device` (on a GPU: seconds for SD1.5)."""
    torch.manual_seed(seed)
    model = create_model(config, device=device)
    randomize_zero_layers(model.model)
    randomize_zero_layers(model.control_model)
    return model


@torch.no_grad()
def max_eps_difference(model: nn.Module, peer: Peer, resolution: int, device: torch.device) -> float:
    """max |eps_ours - eps_diffusers| / max |eps_ours| on one random input, in float32 (TF32 off).

    Near float32 rounding when the two sides compute the same function on the same weights.
    """
    gen = torch.Generator().manual_seed(3)
    f = model.vae_scale_factor
    x = torch.randn(2, model.channels, resolution // f, resolution // f, generator=gen).to(device)
    t = torch.tensor([10, 700], device=device)
    context = model.get_learned_conditioning(["a red circle", "a blue square"])
    hint = torch.rand(2, 3, resolution, resolution, generator=gen).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ours = model.apply_model(x, t, {"c_concat": [hint], "c_crossattn": [context]})
        theirs = peer_eps(peer, x, t, context, hint)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def apply_speed_options(model: nn.Module, peer: Peer | None, channels_last: bool, compile_mode: str | None,
                        checkpointing: bool | None = None) -> None:
    """The same options on both sides: memory format, torch.compile, gradient checkpointing."""
    if checkpointing is not None:
        set_gradient_checkpointing(model, checkpointing)
        if peer is not None:
            for net in (peer.unet, peer.controlnet):
                if checkpointing:
                    net.enable_gradient_checkpointing()
                else:
                    net.disable_gradient_checkpointing()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if peer is not None:
            for net in peer.modules:
                net.to(memory_format=torch.channels_last)
    if compile_mode:
        model.compile_denoiser(mode=compile_mode)
        if peer is not None:
            peer.unet.compile(mode=compile_mode)
            peer.controlnet.compile(mode=compile_mode)


def ablation(change: str) -> contextlib.AbstractContextManager:
    """Undo one speed change of issue 7 while the context is open: `--without CHANGE` times our model
    without it as a third side, in the same run (see ABLATIONS)."""
    import ldm.models.diffusion.ddpm
    import ldm.models.diffusion.guidance
    from cldm.cldm import ControlNet
    from ldm.modules.diffusionmodules.util import GroupNorm32

    def recompute_hint(model: nn.Module, hint: torch.Tensor) -> torch.Tensor:
        return model.input_hint_block(hint.to(next(model.parameters()).dtype), None, None)

    patches = {"batched_cfg": (ldm.models.diffusion.guidance, "batch_conditionings", lambda c, uc: None),
               "hint_reuse": (ControlNet, "encode_hint", recompute_hint),
               "bf16_groupnorm": (GroupNorm32, "forward",
                                  lambda self, x: nn.GroupNorm.forward(self, x.float()).type(x.dtype)),
               "fused_adamw": (ldm.models.diffusion.ddpm, "FUSED_ADAMW_DEVICES", ())}
    return unittest.mock.patch.object(*patches[change])


# What `--without` can undo: cond and uncond in one batch (sampling), the hint block run once per image
# (sampling), GroupNorm in bf16 under bf16 autocast, AdamW's fused kernel (training).
ABLATIONS = ("batched_cfg", "hint_reuse", "bf16_groupnorm", "fused_adamw")


def without(change: str, fn):
    """fn, run with `change` undone."""
    def undone():
        with ablation(change):
            return fn()
    return undone


class Precision:
    """Lightning's precision settings by name: autocast, and a GradScaler for 16-mixed."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
        self.name, self.device, self.dtype = name, device, PRECISIONS[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward, optimizer step and zero_grad(set_to_none=True), as Lightning does."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


class PeakMemory:
    """Peak bytes of tensors allocated above the level at entry, while the block runs.

    CUDA: the caching allocator's peak. CPU: the running sum of the allocation and free records of
    torch.profiler(profile_memory=True), in time order; this sees every tensor, including those kernels
    allocate and free inside one op, and nothing of the interpreter or the allocator's reuse.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self.profiler.__exit__(*exc)
        records = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = 0
        for record in sorted(records, key=lambda e: e.start_ns()):
            live += record.nbytes()
            self.peak = max(self.peak, live)


def tensor_bytes(modules: list[nn.Module], optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct tensors the modules and the optimizer hold (weights, buffers, moments)."""
    seen, total = set(), 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# "cpu" counts the CPU seconds of the process (all its threads) instead of the wall clock: on a shared,
# loaded machine it leaves out the time other processes hold the cores. Use it with --threads 1.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, steps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds for `steps` calls of fn, the device drained before and after."""
    sync(device)
    start = CLOCKS[clock]()
    for _ in range(steps):
        fn()
    sync(device)
    return CLOCKS[clock]() - start


def alternate(sides: dict[str, callable], steps: int, rounds: int, device: torch.device,
              clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per step of each side, per round; the order flips every round so drift hits both alike."""
    names, times = list(sides), {name: [] for name in sides}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(sides[name], steps, device, clock) / steps)
    return times


def median_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of diffusers' time / ours (above 1: ours is faster)."""
    return statistics.median(b / a for a, b in zip(ours, theirs))


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return (f"{model_name}, {os.cpu_count()} CPUs, {threads} thread{'' if threads == 1 else 's'}, "
            f"torch {torch.__version__}")


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def comparison_row(metric: str, setting: str, fmt, ours: float | None, theirs: float | None,
                   ratio: float | None = None) -> tuple[str, str, str, str, str]:
    """One table row (metric, setting, ours, diffusers, ratio); a missing figure prints as "-"."""
    def text(value):
        return "-" if value is None else fmt(value)
    return metric, setting, text(ours), text(theirs), "-" if ratio is None else f"{ratio:.2f}x"


def write_table(rows: list[tuple[str, str, str, str, str]], title: str, path: str | None,
                append: bool = True) -> str:
    """A markdown table (metric, setting, ours, diffusers, ratio), logged and appended to (or written as) `path`."""
    lines = [f"### {title}", "", f"{machine()}, {date.today().isoformat()}", "",
             "| metric | setting | ours | diffusers | ours ÷ diffusers |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    text = "\n".join(lines) + "\n"
    logger.info(text)
    if path:
        with open(path, "a" if append else "w") as f:
            f.write(text + "\n")
    return text


def bench_main(name: str, args, run, argv: list[str] | None) -> dict:
    """The shared driver of the benchmarks: threads and attention slicing as asked, build ours and the
    peer, run(args, model, peer), log (and append) the table."""
    from ldm.modules.attention import set_attention_slicing
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model_channels:
        args.config = str(narrowed_config(args.config, args.model_channels))
    model = build_ours(args.config, device)
    set_attention_slicing(model, args.sliced_attention)
    peer = build_peer(model, args.config, device) if args.peer == "diffusers" else None
    result = run(args, model, peer)
    write_table(result["rows"], f"{name}: {' '.join(argv if argv is not None else sys.argv[1:])}", args.table)
    return result


def narrowed_config(config: str | Path, model_channels: int) -> Path:
    """A copy of `config` (in a temporary folder) whose UNet and ControlNet have `model_channels` channels.

    SD1.5's structure at a tenth of its width keeps every layer and kernel launch but makes each one cheap:
    on a CPU it stands in for the regime of eager GPU sampling at batch 1, where the host's per-layer work,
    not the arithmetic, sets the pace.
    """
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(config)
    for key in ("unet_config", "control_stage_config"):
        cfg.model.params[key].params.model_channels = model_channels
    out = Path(tempfile.mkdtemp(prefix="bench_config_")) / f"{Path(config).stem}_ch{model_channels}.yaml"
    OmegaConf.save(cfg, out)
    return out


def add_run_args(p) -> None:
    """The options bench_train and bench_sample share: the config and device, the peer, the speed options
    (compile, channels_last, threads, slicing, width), the clock, the table and the ablations (--without)."""
    p.add_argument("--config", default=str(TINY))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile both sides' UNet and ControlNet, optionally with a mode ('reduce-overhead' "
                        "adds CUDA graphs)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--peer", default="diffusers", choices=["diffusers", "none"])
    p.add_argument("--model_channels", type=int, default=None, metavar="N",
                   help="build the config with N base channels (e.g. 32 for SD1.5's layers at a tenth of the "
                        "width: the host-bound regime of eager GPU sampling, on a CPU)")
    p.add_argument("--sliced_attention", type=int, default=None, metavar="N",
                   help="our side attends N queries at a time (the apps' --low-vram slicing)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: CPU seconds of the process, for a loaded machine (with --threads 1)")
    p.add_argument("--table", default=None, help="append the markdown table to this file")
    p.add_argument("--without", nargs="+", default=[], choices=ABLATIONS,
                   help="also time our side with these changes undone, as more sides of the same run")

"""Training-step throughput and peak memory: our ControlLDM against diffusers on the same weights, in one process
(benchmarks/bench_train.py is its command line).

One step: latents (the VAE on the images, or a draw from a cached posterior), text embeddings (the text
encoder, or cached), random t and noise, ControlNet + UNet forward under the precision's autocast, MSE,
backward, AdamW step (fused where the device has it), zero_grad(set_to_none=True). Only the ControlNet trains,
on both sides. The sides alternate round by round; figures are per side over all rounds, the ratio is the
median of the per-round ratios.
"""
import argparse
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from cldm.bench.measure import (
    PRECISIONS,
    TINY,
    PeakMemory,
    Precision,
    ablation,
    add_run_args,
    alternate,
    apply_speed_options,
    bench_main,
    comparison_row,
    max_eps_difference,
    median_ratio,
    mib,
    tensor_bytes,
    without,
)
from cldm.data.batch import HINT
from cldm.data.latent_cache import encode_images, encode_prompts
from cldm.diffusers_peer import Peer, peer_eps
from ldm.batch import CAPTION, IMAGE, MEAN, STD, TEXT_EMBEDDING
from ldm.models.diffusion.ddpm import OPTIMIZERS

logger = logging.getLogger(__name__)


def make_batch(model: torch.nn.Module, batch: int, resolution: int, device: torch.device, cached: bool) -> dict:
    """Random images, hints and prompts; with `cached`, the posterior and text embedding instead of images."""
    gen = torch.Generator().manual_seed(0)
    data = {IMAGE: torch.rand(batch, resolution, resolution, 3, generator=gen) * 2 - 1,
            HINT: torch.rand(batch, resolution, resolution, 3, generator=gen),
            CAPTION: [f"a circle of colour {i}, on a plain background" for i in range(batch)]}
    if cached:
        # a few images at a time: the VAE encoder at 512 px needs more memory than the training step itself
        parts = [encode_images(model, {model.first_stage_key: data[IMAGE][i:i + 4]}) for i in range(0, batch, 4)]
        data[MEAN], data[STD] = (torch.cat(halves) for halves in zip(*parts))
        data |= encode_prompts(model, data[CAPTION], 4)  # txt_emb (and for SDXL txt_pooled)
        del data[IMAGE]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}


def our_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
    with precision.autocast():
        loss, _ = model.shared_step(batch)
    precision.step(loss, optimizer)


def peer_step(peer: Peer, batch: dict, optimizer: torch.optim.Optimizer, precision: Precision,
              scheduler: DDPMScheduler) -> None:
    """diffusers' train_controlnet.py step on the same batch (eps objective, ControlNet trained)."""
    with torch.no_grad(), precision.autocast():
        if MEAN in batch:
            latents = batch[MEAN] + batch[STD] * torch.randn_like(batch[MEAN])
            context = batch[TEXT_EMBEDDING]
        else:
            pixels = batch[IMAGE].permute(0, 3, 1, 2).contiguous()
            latents = peer.vae.encode(pixels).latent_dist.sample()
            context = peer.text_encoder(batch[CAPTION])
        latents = latents.float() * peer.scale_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    hint = batch[HINT].permute(0, 3, 1, 2).contiguous()
    with precision.autocast():
        loss = F.mse_loss(peer_eps(peer, noisy, t, context, hint).float(), noise)
    precision.step(loss, optimizer)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels (latents are /8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--cached", action="store_true", help="cached latents and text embeddings (no VAE/text encoder)")
    p.add_argument("--frozen_dtype", choices=["bf16"], default=None,
                   help="the frozen weights in bf16 on both sides (tutorial_train --frozen_dtype; diffusers' "
                        "training scripts' weight_dtype), with --precision bf16-mixed")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="both sides' optimizer: AdamW (fused where the device has it) or bitsandbytes' AdamW8bit")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (compilation happens here)")
    add_run_args(p)
    p.add_argument("--smoke", action="store_true", help="tiny config, 32 px, one step of each kind (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.resolution, args.batch = str(TINY), 32, 1
        args.steps, args.rounds, args.warmup = 1, 1, 1
    return args


def check_same_function(model: torch.nn.Module, peer: Peer | None, resolution: int, device: torch.device) -> float:
    """max |eps ours - eps diffusers| / max |eps ours| in float32; refuses to compare different functions."""
    if peer is None:
        return float("nan")
    diff = max_eps_difference(model, peer, resolution, device)
    logger.info(f"max |eps ours - eps diffusers| / max |eps ours| = {diff:.2e} (same weights, float32)")
    if not math.isfinite(diff) or diff > 1e-4:
        raise RuntimeError("the two sides compute different functions: the comparison would be meaningless")
    return diff


def our_side(model: torch.nn.Module, batch: dict, precision: Precision) -> tuple:
    """(step, modules it holds, optimizer) for our ControlLDM, the ControlNet trained."""
    model.train()
    opt = model.make_optimizer(model.trainable_parameters())
    return lambda: our_step(model, batch, opt, precision), [model], opt


def peer_side(model: torch.nn.Module, peer: Peer, batch: dict, precision: Precision) -> tuple:
    """(step, modules it holds, optimizer) for diffusers' ControlNet + UNet, the same weights trained."""
    peer.controlnet.train()
    trained = [p for p in peer.controlnet.parameters() if p.requires_grad]
    if sum(p.numel() for p in trained) != sum(p.numel() for p in model.trainable_parameters()):
        raise RuntimeError("the two sides do not train the same number of weights")
    opt = model.make_optimizer(trained)
    scheduler = DDPMScheduler(num_train_timesteps=model.num_timesteps, beta_start=model.linear_start,
                              beta_end=model.linear_end, beta_schedule="scaled_linear")
    return lambda: peer_step(peer, batch, opt, precision, scheduler), peer.modules, opt


def step_memory(step, holders: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
                device: torch.device) -> dict[str, int]:
    """Static bytes (weights, buffers, optimizer state) and their sum with one step's peak rise."""
    with PeakMemory(device) as peak:
        step()
    static = tensor_bytes(holders, optimizer)
    return {"memory": static + peak.peak, "static": static}


def setting_name(args: argparse.Namespace) -> str:
    return (f"{Path(args.config).stem} {args.resolution}px b{args.batch} {args.precision}"
            f"{' cached' if args.cached else ''}{f' {args.optimizer}' if args.optimizer != 'adamw' else ''}"
            f"{f' frozen {args.frozen_dtype}' if args.frozen_dtype else ''}"
            f"{' ckpt' if args.gradient_checkpointing else ''}"
            f"{' channels_last' if args.channels_last else ''}{f' compile={args.compile}' if args.compile else ''}"
            f"{f' sliced_attention={args.sliced_attention}' if args.sliced_attention else ''}")


def run(args: argparse.Namespace, model: torch.nn.Module, peer: Peer | None) -> dict:
    """The benchmark on built models: {side: {samples_per_s, memory, static}, ratio, max_eps_diff, rows}."""
    device = torch.device(args.device)
    model.optimizer_name = args.optimizer  # make_optimizer builds both sides' optimizers
    result = {"max_eps_diff": check_same_function(model, peer, args.resolution, device)}
    batch = make_batch(model, args.batch, args.resolution, device, args.cached)
    if args.frozen_dtype is not None:
        if args.precision != "bf16-mixed":
            raise SystemExit("--frozen_dtype bf16 needs --precision bf16-mixed")
        model.cast_frozen(torch.bfloat16)
        if peer is not None:
            peer.unet.to(torch.bfloat16)
            peer.vae.to(torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the float32 copies go back before anything is measured
    apply_speed_options(model, peer, args.channels_last, args.compile, args.gradient_checkpointing)
    precision = Precision(args.precision, device)
    sides = {"ours": our_side(model, batch, precision)}
    for change in args.without:
        with ablation(change):
            step, holders, optimizer = our_side(model, batch, precision)
        sides[f"ours without {change}"] = (without(change, step), holders, optimizer)
    if peer is not None:
        sides["diffusers"] = peer_side(model, peer, batch, precision)
    for name, (step, holders, optimizer) in sides.items():
        for _ in range(args.warmup):
            step()
        result[name] = step_memory(step, holders, optimizer, device)
    times = alternate({name: side[0] for name, side in sides.items()}, args.steps, args.rounds, device, args.clock)
    for name, per_step in times.items():
        result[name]["samples_per_s"] = args.batch * len(per_step) / sum(per_step)
    theirs = result.get("diffusers", {})
    setting, result["rows"] = setting_name(args), []
    for name in [n for n in sides if n != "diffusers"]:
        ours = result[name]
        label = setting + name[len("ours"):]
        if theirs:
            ours["ratio"] = median_ratio(times[name], times["diffusers"])
        result["rows"] += [
            comparison_row("train samples/s", label, "{:.3g}".format, ours["samples_per_s"],
                           theirs.get("samples_per_s"), ours.get("ratio")),
            comparison_row("train peak memory", label, mib, ours["memory"], theirs.get("memory"),
                           ours["memory"] / theirs["memory"] if theirs else None)]
    result["ratio"] = result["ours"].get("ratio")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Build both sides, run, log (and append) the table; returns run()'s result."""
    return bench_main("bench_train", parse_args(argv), run, argv)

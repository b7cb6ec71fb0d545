"""Sampling speed: a sampler with classifier-free guidance and the VAE decode, ours against diffusers, in one
process (benchmarks/bench_sample.py is its command line).

Ours: cldm.pipeline.sample (text encoding, guided sampling), then decode_first_stage. diffusers: the loop of
StableDiffusionControlNetPipeline (latents doubled for guidance, ControlNet residuals into the UNet,
scheduler.step) on the same weights, noise and text embeddings (our text encoder, in the timing too), then
AutoencoderKL.decode. Its scheduler: DDIMScheduler for our DDIM, else the very scheduler our sampler steps
with. The final latents of the two sides are compared.
it/s counts guided denoising steps (one step = the conditional and the unconditional prediction).
Precision: fp32; bf16-mixed / 16-mixed (autocast over float32 weights, as in training); bf16 / fp16 (UNet and
ControlNet weights converted, as inference pipelines load them; the VAE decodes under autocast).
"""
import argparse
import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from cldm.bench.measure import (
    PRECISIONS,
    TINY,
    Precision,
    add_run_args,
    alternate,
    apply_speed_options,
    bench_main,
    comparison_row,
    median_ratio,
    sync,
    timed,
    without,
)
from cldm.diffusers_peer import Peer, peer_eps
from cldm.pipeline import sample
from ldm.models.diffusion.samplers import SAMPLERS, get_sampler

logger = logging.getLogger(__name__)

# --precision values that convert the UNet and ControlNet weights (inference), and their dtype.
HALF_WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


PROMPT = "a red circle on a white background"


class Inputs:
    """One hint and prompt, and the seeds whose noise both sides start from."""

    def __init__(self, model: torch.nn.Module, batch: int, resolution: int, device: torch.device):
        f = model.vae_scale_factor
        self.seeds = list(range(batch))
        generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.noise = randn_tensor((batch, model.channels, resolution // f, resolution // f), generator=generators,
                                  device=device)
        hint = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
        self.hint = hint.to(device)


@torch.no_grad()
def our_denoise(model: torch.nn.Module, sampler: str, x: Inputs, steps: int, scale: float) -> torch.Tensor:
    return sample(model, PROMPT, negative_prompt="", units=[model.unit(x.hint)], sampler=sampler, steps=steps,
                  cfg_scale=scale, seed=x.seeds, num_images=len(x.seeds), decode=False).latents


def peer_scheduler(model: torch.nn.Module, sampler: str) -> SchedulerMixin:
    """diffusers' DDIMScheduler in SD's settings for our DDIM; for the others, the scheduler ours steps with."""
    if sampler == "ddim":
        return DDIMScheduler(num_train_timesteps=model.num_timesteps, beta_start=model.linear_start,
                             beta_end=model.linear_end, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)
    return get_sampler(sampler).make_scheduler(model)


@torch.no_grad()
def peer_denoise(model: torch.nn.Module, peer: Peer, sampler: str, x: Inputs, steps: int, scale: float
                 ) -> torch.Tensor:
    """StableDiffusionControlNetPipeline's denoising loop (eta 0) on our text encoder's embeddings."""
    scheduler = peer_scheduler(model, sampler)
    scheduler.set_timesteps(steps, device=x.noise.device)
    latents = x.noise * scheduler.init_noise_sigma
    dtype = peer.unet.dtype
    n = len(x.noise)
    context = model.get_learned_conditioning([""] * n + [PROMPT] * n).to(dtype)
    hint = torch.cat([x.hint, x.hint]).to(dtype)
    for t in scheduler.timesteps:
        latent_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(dtype)
        eps_uncond, eps_cond = peer_eps(peer, latent_in, t, context, hint).float().chunk(2)
        latents = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample
    return latents


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    p.add_argument("--ddim_steps", type=int, default=20, help="sampling steps (any sampler)")
    p.add_argument("--scale", type=float, default=9.0, help="classifier-free guidance scale")
    p.add_argument("--precision", default="fp32", choices=[*PRECISIONS, *HALF_WEIGHTS],
                   help="autocast over float32 weights (as in training), or bf16 / fp16 weights")
    p.add_argument("--rounds", type=int, default=3, help="timed images per side, alternating")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per side first (compilation happens here)")
    add_run_args(p)
    p.add_argument("--smoke", action="store_true", help="tiny config, 32 px, 2 sampling steps (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.resolution, args.ddim_steps, args.rounds, args.warmup = str(TINY), 32, 2, 1, 0
    return args


def run(args: argparse.Namespace, model: torch.nn.Module, peer: Peer | None) -> dict:
    """The benchmark on built models: {side: {it_per_s, s_per_image, decode_s}, ratio, max_latent_diff, rows}."""
    device = torch.device(args.device)
    model.eval()
    if peer is not None:
        peer.controlnet.eval()
    x = Inputs(model, args.batch, args.resolution, device)
    sampler, steps, scale = args.sampler, args.ddim_steps, args.scale
    sides = {"ours": (lambda: our_denoise(model, sampler, x, steps, scale), model.decode_first_stage)}
    if peer is not None:
        sides["diffusers"] = (lambda: peer_denoise(model, peer, sampler, x, steps, scale),
                              lambda z: peer.vae.decode(z / peer.scale_factor).sample)
    half = HALF_WEIGHTS.get(args.precision)
    # With half weights, each side's own float32 result first: how far rounding alone moves each side.
    fp32_latents = {name: denoise().float() for name, (denoise, _) in sides.items()} if half else {}
    apply_speed_options(model, peer, args.channels_last, args.compile)
    if half is not None:
        model.set_denoiser_dtype(half)
        for net in (peer.unet, peer.controlnet) if peer else ():
            net.to(half)
    # Half weights run as they are; the VAE (float32) decodes under autocast to the same dtype.
    precision = Precision("bf16-mixed" if half == torch.bfloat16 else "16-mixed" if half else args.precision, device)
    denoise_precision = Precision("fp32" if half else args.precision, device)

    def image(denoise, decode) -> tuple[torch.Tensor, torch.Tensor]:
        with denoise_precision.autocast():
            latents = denoise()
        with precision.autocast(), torch.no_grad():
            return latents, decode(latents)

    for change in args.without:
        sides[f"ours without {change}"] = (without(change, sides["ours"][0]), model.decode_first_stage)
    latents = {}
    for name, (denoise, decode) in sides.items():
        for _ in range(args.warmup):
            image(denoise, decode)
        latents[name] = image(denoise, decode)[0].float()
    sync(device)
    times = alternate({name: lambda d=denoise: image(d, lambda z: z) for name, (denoise, _) in sides.items()},
                      1, args.rounds, device, args.clock)
    result = {"max_latent_diff": (latents["ours"] - latents["diffusers"]).abs().max().item() if peer else None}
    for name, per_image in times.items():
        with precision.autocast(), torch.no_grad():
            decode_s = timed(lambda d=sides[name][1]: d(latents[name]), 1, device, args.clock)
        denoise_s = sum(per_image) / len(per_image)
        result[name] = {"it_per_s": steps / denoise_s, "s_per_image": (denoise_s + decode_s) / args.batch,
                        "decode_s": decode_s}
    theirs = result.get("diffusers", {})
    if theirs:
        logger.info(f"max |final latents ours - diffusers| = {result['max_latent_diff']:.2e}")
    result["drift"] = {name: (latents[name] - ref).abs().max().item() for name, ref in fp32_latents.items()}
    if fp32_latents:
        logger.info(f"max |final latents {args.precision} - float32|: "
              + ", ".join(f"{name} {d:.3g}" for name, d in result["drift"].items())
              + f" (latents up to {fp32_latents['ours'].abs().max().item():.3g})")
    setting, result["rows"] = (f"{Path(args.config).stem} {args.resolution}px b{args.batch} {args.precision} "
                               f"{get_sampler(sampler).label} {steps} CFG {scale:g}"
                               f"{' channels_last' if args.channels_last else ''}"
                               f"{f' compile={args.compile}' if args.compile else ''}"
                               f"{f' sliced_attention={args.sliced_attention}' if args.sliced_attention else ''}"), []
    three_digits = "{:.3g}".format
    for name in [n for n in sides if n != "diffusers"]:
        ours, label = result[name], setting + name[len("ours"):]
        if theirs:
            ours["ratio"] = median_ratio(times[name], times["diffusers"])
        result["rows"] += [
            comparison_row("sample it/s", label, three_digits, ours["it_per_s"], theirs.get("it_per_s"),
                           ours.get("ratio")),
            comparison_row("s/image (+decode)", label, three_digits, ours["s_per_image"], theirs.get("s_per_image"),
                           theirs["s_per_image"] / ours["s_per_image"] if theirs else None)]
    if fp32_latents:
        result["rows"] += [
            comparison_row("final latents: max abs diff to own fp32", setting, three_digits,
                           result["drift"]["ours"], result["drift"].get("diffusers")),
            comparison_row("final latents: max abs diff ours to diffusers", setting, three_digits,
                           result["max_latent_diff"], None)]
    result["ratio"] = result["ours"].get("ratio")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Build both sides, run, log (and append) the table; returns run()'s result."""
    return bench_main("bench_sample", parse_args(argv), run, argv)

"""DDIM: our own sampler (the others come from diffusers' schedulers, see samplers.py).

Timesteps are uniform: exactly `S` of them, for any S from 1 to the number of training steps (the original
produced S+1 timesteps, and an index past the schedule, whenever T/S left no remainder room, e.g. S = 3, 9,
27, 36, 37); a zero-terminal-SNR schedule is sampled from its last step (diffusers' "trailing" spacing).

`sample_ddim` is a function over a denoiser (guidance sits outside it, in guidance.py); `DDIMSampler` keeps
the original's class, its `sample()` signature and its img2img methods (`stochastic_encode`, `decode`, and
`encode`, DDIM inversion) on top of it.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from ldm.models.diffusion.guidance import Denoiser, GuidedDenoiser

logger = logging.getLogger(__name__)

Generators = torch.Generator | list[torch.Generator] | None
# (step index, latents after the step, the step's x0 prediction or None)
StepCallback = Callable[[int, torch.Tensor, torch.Tensor | None], None]


class NoiseSchedule(Protocol):
    """What a sampler reads of a diffusion model (DDPM provides it): the training schedule's float32 buffers."""

    num_timesteps: int
    parameterization: str
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor


def uniform_timesteps(num_ddim_steps: int, num_ddpm_steps: int) -> np.ndarray:
    """Every c-th training step, c = T // S, offset by 1 like the original where that stays in range."""
    if not 1 <= num_ddim_steps <= num_ddpm_steps:
        raise ValueError(f"DDIM steps must be between 1 and {num_ddpm_steps}, got {num_ddim_steps}")
    c = num_ddpm_steps // num_ddim_steps
    steps = np.arange(num_ddim_steps) * c
    offset = 1 if steps[-1] + 1 < num_ddpm_steps else 0
    return steps + offset


def trailing_timesteps(num_ddim_steps: int, num_ddpm_steps: int) -> np.ndarray:
    """S timesteps ending at the last training step, T / S apart (diffusers' "trailing" spacing), for a schedule
    whose last step is pure noise (zero terminal SNR; Lin et al. 2024 sample from it)."""
    if not 1 <= num_ddim_steps <= num_ddpm_steps:
        raise ValueError(f"DDIM steps must be between 1 and {num_ddpm_steps}, got {num_ddim_steps}")
    return np.round(np.arange(num_ddpm_steps, 0, -num_ddpm_steps / num_ddim_steps)).astype(np.int64)[::-1] - 1


@dataclass(frozen=True)
class DDIMSchedule:
    """The S timesteps and their coefficients, indexed by position in `timesteps` (ascending)."""

    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    eta: float

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0) -> "DDIMSchedule":
        spacing = trailing_timesteps if float(alphas_cumprod[-1]) == 0 else uniform_timesteps
        timesteps = spacing(steps, len(alphas_cumprod))
        alphas_cumprod = alphas_cumprod.detach().double().cpu()
        a = alphas_cumprod[timesteps]
        a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
        sigmas = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        return cls(timesteps, a.float(), a_prev.float(), sigmas.float(), torch.sqrt(1.0 - a).float(), eta)

    @classmethod
    def every_step(cls, alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor, eta: float = 0.0
                   ) -> "DDIMSchedule":
        """All training steps, each stepping to the one before it (the original's use_original_steps=True)."""
        a, a_prev = (buf.detach().double().cpu() for buf in (alphas_cumprod, alphas_cumprod_prev))
        sigmas = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        return cls(np.arange(len(a)), a.float(), a_prev.float(), sigmas.float(), torch.sqrt(1.0 - a).float(), eta)


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` an img2img run takes at denoising `strength`: the last int(steps * strength) of the
    schedule, as diffusers' img2img pipelines count them (get_timesteps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising strength must be in (0, 1], got {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"denoising strength {strength} of {steps} steps runs no step (int(steps * strength) is 0); "
                         "raise the strength or the steps")
    return run


@dataclass(frozen=True)
class Inpainting:
    """Keep `x0` where `mask` is 1 and sample where it is 0 (latent blending, as the original DDIM does).

    Before each step the known region is set to x0 noised to that step's level; after the last step, to x0.
    """

    mask: torch.Tensor
    x0: torch.Tensor

    def check(self, latents: torch.Size) -> None:
        """Refuse a mask or x0 that does not fit latents of shape (B, C, h, w), naming the argument and the shape
        expected (both are at latent size, pixel size / the VAE factor; x0 is latents, not an RGB image)."""
        b, c, h, w = latents
        fits = {"mask": (self.mask, (1, c)), "x0": (self.x0, (c,))}
        for name, (tensor, channels) in fits.items():
            if tensor.dim() != 4 or tensor.shape[0] not in (1, b) or tensor.shape[1] not in channels or (
                    tuple(tensor.shape[-2:]) != (h, w)):
                want = " or ".join(f"({n}, {k}, {h}, {w})" for n in dict.fromkeys((b, 1)) for k in channels)
                what = ("latents (encode an image with model.get_first_stage_encoding(model.encode_first_stage(x)))"
                        if name == "x0" else "a mask at latent size, 1 where x0 is kept")
                raise ValueError(f"inpainting {name} has shape {tuple(tensor.shape)}; expected {want}: {what}")

    def blend(self, x: torch.Tensor, x0_noised: torch.Tensor) -> torch.Tensor:
        return x0_noised * self.mask + (1.0 - self.mask) * x


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
                generator: Generators = None, callback: StepCallback | None = None,
                inpainting: Inpainting | None = None, temperature: float = 1.0, progress: bool = False,
                init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """DDIM from noise x (x_T) in `steps` steps; eta 0 is deterministic, eta 1 is DDPM-like.

    img2img: `init` (latents) noised with x to the level of the first step run, then the last
    int(steps * strength) steps of the schedule (as diffusers' img2img pipelines with DDIMScheduler).
    """
    ddim = DDIMSchedule.make(schedule.alphas_cumprod, steps, eta)
    run = len(ddim.timesteps)
    if init is not None:
        run = denoising_steps(steps, strength)
        t = torch.full((x.shape[0],), int(ddim.timesteps[run - 1]), device=x.device, dtype=torch.long)
        x = noised(schedule, init, t, x)
    return ddim_steps(denoiser, x, schedule, ddim, run, generator, callback, inpainting, temperature, progress)


def ddim_steps(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, ddim: DDIMSchedule, run: int,
               generator: Generators = None, callback: StepCallback | None = None,
               inpainting: Inpainting | None = None, temperature: float = 1.0, progress: bool = False,
               desc: str = "DDIM Sampler") -> torch.Tensor:
    """The DDIM updates from ddim.timesteps[run - 1] down to the first timestep, reported as steps (i, run)."""
    if inpainting is not None:
        inpainting.check(x.shape)
    for i, index in enumerate(tqdm(range(run - 1, -1, -1), desc=desc, total=run, disable=not progress)):
        t = torch.full((x.shape[0],), int(ddim.timesteps[index]), device=x.device, dtype=torch.long)
        if inpainting is not None:
            x = inpainting.blend(x, q_sample(schedule, inpainting.x0, t, generator))
        out = denoiser(x, t, (i, run))
        x, pred_x0 = ddim_step(schedule, ddim, index, x, t, out, generator, temperature)
        if callback is not None:
            callback(i, x, pred_x0)
    return x if inpainting is None else inpainting.blend(x, inpainting.x0)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, generator: Generators) -> torch.Tensor:
    """x0 noised to timestep t with noise drawn from `generator`."""
    return noised(schedule, x0, t, randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))


def noised(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x0 at timesteps t (one per sample): sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    shape = (-1, *(1,) * (x0.dim() - 1))
    return (schedule.sqrt_alphas_cumprod[t].view(shape) * x0
            + schedule.sqrt_one_minus_alphas_cumprod[t].view(shape) * noise)


def ddim_step(schedule: NoiseSchedule, ddim: DDIMSchedule, index: int, x: torch.Tensor, t: torch.Tensor,
              out: torch.Tensor, generator: Generators = None, temperature: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from timestep ddim.timesteps[index] with the model output `out`: (x_prev, pred_x0)."""
    shape = (x.shape[0], 1, 1, 1)
    a_t = torch.full(shape, float(ddim.alphas[index]), device=x.device)
    a_prev = torch.full(shape, float(ddim.alphas_prev[index]), device=x.device)
    sigma_t = torch.full(shape, float(ddim.sigmas[index]), device=x.device)
    sqrt_one_minus_at = torch.full(shape, float(ddim.sqrt_one_minus_alphas[index]), device=x.device)
    if schedule.parameterization == "v":
        sqrt_a, sqrt_one_minus_a = (buf[t].view(shape) for buf in (schedule.sqrt_alphas_cumprod,
                                                                    schedule.sqrt_one_minus_alphas_cumprod))
        e_t = sqrt_a * out + sqrt_one_minus_a * x
        pred_x0 = sqrt_a * x - sqrt_one_minus_a * out
    elif schedule.parameterization == "eps":
        e_t = out
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    else:
        raise ValueError(f"DDIM samples eps- and v-prediction models, not {schedule.parameterization!r}")
    dir_xt = (1.0 - a_prev - sigma_t ** 2).clamp(min=0).sqrt() * e_t
    noise = sigma_t * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype) * temperature
    return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0


# Arguments of the original's DDIMSampler.sample that this one does not implement, with their inert values.
UNSUPPORTED = {"normals_sequence": None, "quantize_x0": False, "noise_dropout": 0.0, "score_corrector": None,
               "corrector_kwargs": None, "dynamic_threshold": None, "ucg_schedule": None}


class DDIMSampler:
    """The original's DDIM sampler class over a LatentDiffusion-like model (apply_model and its schedule).

    `batch_guidance=False` always runs cond and uncond as separate passes: half the peak memory of a step.
    """

    def __init__(self, model: Any, schedule: str = "linear", batch_guidance: bool = True):
        if schedule != "linear":
            raise ValueError(f"DDIMSampler follows the model's own noise schedule; schedule={schedule!r} is not "
                             "supported")
        self.model = model
        self.batch_guidance = batch_guidance
        self.ddpm_num_timesteps = model.num_timesteps

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = False) -> None:
        """The original's attributes (ddim_timesteps, ddim_alphas, ...), for scripts that read them."""
        if ddim_discretize != "uniform":
            raise ValueError(f"only uniform DDIM discretization is supported, got {ddim_discretize!r}")
        ddim = DDIMSchedule.make(self.model.alphas_cumprod, ddim_num_steps, ddim_eta)
        self.ddim_timesteps, self.ddim_eta = ddim.timesteps, ddim_eta
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = ddim.alphas, ddim.alphas_prev, ddim.sigmas
        self.ddim_sqrt_one_minus_alphas = ddim.sqrt_one_minus_alphas

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: Callable[[int], None] | None = None, img_callback: Callable | None = None,
               eta: float = 0.0, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               x_T: torch.Tensor | None = None, temperature: float = 1.0, verbose: bool = True,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: Generators = None, **unsupported: Any
               ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, intermediates).

        `mask` and `x0` inpaint: x0 is kept where mask is 1 and sampled where it is 0.
        """
        for name, value in unsupported.items():
            if name not in UNSUPPORTED:
                raise TypeError(f"DDIMSampler.sample() got an unexpected keyword argument {name!r}")
            if value is not None and value != UNSUPPORTED[name]:
                raise ValueError(f"DDIMSampler.sample(): {name}={value!r} is not supported here; "
                                 f"leave it at {UNSUPPORTED[name]!r}")
        if (mask is None) != (x0 is None):
            raise ValueError("inpainting needs both mask and x0")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta)
        device = self.model.betas.device
        size = (batch_size, *shape)
        img = randn_tensor(size, generator=generator, device=device) if x_T is None else x_T.to(device)
        inpainting = None if mask is None else Inpainting(mask.to(device), x0.to(device))
        denoiser = GuidedDenoiser(self.model, conditioning, unconditional_conditioning,
                                  unconditional_guidance_scale, batch=self.batch_guidance)
        intermediates = {"x_inter": [img], "pred_x0": [img]}

        def record(i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            index = S - i - 1
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == S - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)

        samples = sample_ddim(denoiser, img, self.model, S, eta=eta, generator=generator, callback=record,
                              inpainting=inpainting, temperature=temperature, progress=verbose)
        return samples, intermediates

    def schedule(self, use_original_steps: bool) -> DDIMSchedule:
        """The DDIM schedule of the last make_schedule (or sample), or every training step."""
        if use_original_steps:
            return DDIMSchedule.every_step(self.model.alphas_cumprod, self.model.alphas_cumprod_prev,
                                           getattr(self, "ddim_eta", 0.0))
        if not hasattr(self, "ddim_timesteps"):
            raise RuntimeError("DDIMSampler: call make_schedule(ddim_num_steps) (or sample) before encoding or "
                               "decoding, or pass use_original_steps=True")
        return DDIMSchedule(self.ddim_timesteps, self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas,
                            self.ddim_sqrt_one_minus_alphas, self.ddim_eta)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """x0 noised to the level of DDIM step index t (one per sample; a training timestep with
        use_original_steps): the original img2img's first half, followed by decode(z, cond, t_start)."""
        ddim = self.schedule(use_original_steps)
        if noise is None:
            noise = torch.randn_like(x0)
        shape = (-1, *(1,) * (x0.dim() - 1))
        index = t.long().cpu()
        sqrt_alpha = ddim.alphas.sqrt()[index].to(x0.device).view(shape)
        sqrt_one_minus_alpha = ddim.sqrt_one_minus_alphas[index].to(x0.device).view(shape)
        return sqrt_alpha * x0 + sqrt_one_minus_alpha * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Callable[[int], None] | None = None) -> torch.Tensor:
        """DDIM from the level of step index t_start - 1 down to the end of the schedule (the original img2img's
        second half), with the eta of make_schedule; callback(i) after each step."""
        ddim = self.schedule(use_original_steps)
        if not 1 <= t_start <= len(ddim.timesteps):
            raise ValueError(f"t_start must be between 1 and {len(ddim.timesteps)}, got {t_start}")
        logger.info("Running DDIM Sampling with %d timesteps", t_start)
        denoiser = GuidedDenoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale,
                                  batch=self.batch_guidance)
        step_done = None if callback is None else (lambda i, x, pred_x0: callback(i))
        return ddim_steps(denoiser, x_latent, self.model, ddim, t_start, callback=step_done, progress=True,
                          desc="Decoding image")

    @torch.no_grad()
    def encode(self, x0: torch.Tensor, c: Any, t_enc: int, use_original_steps: bool = False,
               return_intermediates: int | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, callback: Callable[[int], None] | None = None
               ) -> tuple[torch.Tensor, dict[str, Any]]:
        """DDIM inversion: x0 run t_enc steps up the schedule, deterministically, so that decode(x, c, t_enc)
        comes back to it; returns (x_encoded, {"x_encoded", "intermediate_steps"[, "intermediates"]}).

        Step i asks the model at the schedule's timestep i (the fix the original's cldm/ddim_hacked.py carries;
        its ldm copy passed the index i as the timestep) and, for a v-prediction model, converts the output to eps.
        """
        ddim = self.schedule(use_original_steps)
        if not 0 <= t_enc <= len(ddim.timesteps):
            raise ValueError(f"t_enc must be between 0 and {len(ddim.timesteps)}, got {t_enc}")
        denoiser = GuidedDenoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale,
                                  batch=self.batch_guidance)
        shape = (x0.shape[0], 1, 1, 1)
        x, intermediates, inter_steps = x0, [], []
        for i in tqdm(range(t_enc), desc="Encoding Image"):
            t = torch.full((x0.shape[0],), int(ddim.timesteps[i]), device=x0.device, dtype=torch.long)
            out = denoiser(x, t, (i, t_enc))
            if self.model.parameterization == "v":
                out = (self.model.sqrt_alphas_cumprod[t].view(shape) * out
                       + self.model.sqrt_one_minus_alphas_cumprod[t].view(shape) * x)
            a_next, a = float(ddim.alphas[i]), float(ddim.alphas_prev[i])
            x = (a_next / a) ** 0.5 * x + a_next ** 0.5 * ((1 / a_next - 1) ** 0.5 - (1 / a - 1) ** 0.5) * out
            if return_intermediates and ((i % max(t_enc // return_intermediates, 1) == 0 and i < t_enc - 1)
                                         or i >= t_enc - 2):
                intermediates.append(x)
                inter_steps.append(i)
            if callback is not None:
                callback(i)
        out = {"x_encoded": x, "intermediate_steps": inter_steps}
        if return_intermediates:
            out["intermediates"] = intermediates
        return x, out

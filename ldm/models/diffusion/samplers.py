"""The samplers, by name: our DDIM, and diffusers' schedulers for the rest (Euler, DPM++, UniPC, ...).

Each sampler is a function over a `Denoiser` (guidance.py): it only steps. diffusers' schedulers are the
field's maintained implementations (k-diffusion's have not had a release since 2023 and pull in a dozen
training dependencies); they are built here on the model's own betas and prediction type, and driven by the
same loop as diffusers' pipelines, so a sampler here is the same function as there (tests/test_samplers.py).

Every sampler calls the denoiser once per step with step = (i, steps run): a control's start/end window covers
the same steps under each of them. img2img (an initial latent and a denoising strength) runs the last
int(steps * strength) steps of the schedule from the initial latent noised to the first of them, as diffusers'
img2img pipelines do. A step count a sampler cannot take is refused by name (`check_steps`).
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from ldm.models.diffusion.ddim import (
    Generators,
    Inpainting,
    NoiseSchedule,
    StepCallback,
    denoising_steps,
    sample_ddim,
)
from ldm.models.diffusion.guidance import Denoiser

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@dataclass(frozen=True)
class Sampler:
    """A sampler as the apps list it: its name, the label A1111 and ComfyUI users know, a good step count,
    and (except for DDIM) the diffusers scheduler with its settings."""

    name: str
    label: str
    default_steps: int
    scheduler: type[SchedulerMixin] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise at every step (eta > 0 makes DDIM so too)

    def make_scheduler(self, schedule: NoiseSchedule) -> SchedulerMixin:
        """The scheduler on the model's training betas and prediction type; a schedule rescaled to zero terminal
        SNR gets the scheduler's own switch for it, whose rescaling leaves it as is and which keeps the first
        sigma finite (2**-24 for the last alphas_cumprod, as diffusers does)."""
        if schedule.parameterization not in PREDICTION_TYPES:
            raise ValueError(f"unknown parameterization {schedule.parameterization!r}")
        zero_terminal_snr = {"rescale_betas_zero_snr": True} if float(schedule.alphas_cumprod[-1]) == 0 else {}
        return self.scheduler(num_train_timesteps=schedule.num_timesteps,
                              trained_betas=schedule.betas.detach().cpu().double().numpy(),
                              prediction_type=PREDICTION_TYPES[schedule.parameterization], **self.settings,
                              **zero_terminal_snr)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", "DDIM", 20),
    # timesteps spread over the whole schedule, as k-diffusion's (A1111's, ComfyUI's) Euler samplers
    Sampler("euler", "Euler", 25, EulerDiscreteScheduler, {"timestep_spacing": "linspace"}),
    Sampler("euler_a", "Euler a", 25, EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"},
            stochastic=True),
    Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", 20, DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras", 20, DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, stochastic=True),
    # UniPC as A1111 and ComfyUI default to: the bh1 variant at order 3, lower orders at the end, stopping at the
    # lowest training noise level (diffusers' default, bh2 at order 2 to zero noise, is another sampler)
    Sampler("unipc", "UniPC", 20, UniPCMultistepScheduler,
            {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True, "final_sigmas_type": "sigma_min"}),
    # diffusers' UniPCMultistepScheduler as it comes (bh2 at order 2, ending at zero noise): the sampler of
    # ControlNet++'s evaluation protocol (cldm/protocol.py)
    Sampler("unipc_bh2", "UniPC bh2", 20, UniPCMultistepScheduler,
            {"solver_type": "bh2", "solver_order": 2, "lower_order_final": True, "final_sigmas_type": "zero"}),
)}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_steps(spec: Sampler, steps: int, schedule: NoiseSchedule) -> None:
    """Refuse a step count the sampler cannot take on this schedule, with the range it can."""
    if not 1 <= steps <= schedule.num_timesteps or (
            spec.scheduler is not None and repeats_a_level(spec.make_scheduler(schedule), steps)):
        raise ValueError(f"the {spec.label} sampler takes 1 to {max_steps(spec, schedule)} steps on this model's "
                         f"{schedule.num_timesteps}-step schedule, not {steps}")


def max_steps(spec: Sampler, schedule: NoiseSchedule) -> int:
    """The most steps the sampler takes: one per training step, fewer where its scheduler would then step
    twice from one noise level (UniPC spreads steps + 1 rounded timesteps over the training steps, and divides
    by their distance)."""
    most = schedule.num_timesteps
    if spec.scheduler is not None:
        scheduler = spec.make_scheduler(schedule)
        while most > 1 and repeats_a_level(scheduler, most):
            most -= 1
    return most


def repeats_a_level(scheduler: SchedulerMixin, steps: int) -> bool:
    """Whether the scheduler, set to `steps`, steps twice from or to the same noise level."""
    scheduler.set_timesteps(steps)
    levels = scheduler.sigmas
    return bool((levels[1:] >= levels[:-1]).any())


def sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule, sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, generator: Generators = None,
           callback: StepCallback | None = None, inpainting: Inpainting | None = None,
           progress: bool = False, init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Latents from pure noise x_T (unit variance) in `steps` steps of the named sampler.

    `generator` (one per sample, or one for the batch) draws the noise of stochastic samplers; `eta` is
    DDIM's. `inpainting` keeps its x0 where its mask is 1. img2img: `init` (latents) is noised with x_T to
    the level of the first step run, and the last int(steps * strength) steps run from there.
    """
    spec = get_sampler(sampler)
    steps = spec.default_steps if steps is None else steps
    if eta and spec.name != "ddim":
        raise ValueError(f"eta is DDIM's; the {spec.label} sampler has none (choose ddim, or set eta to 0)")
    check_steps(spec, steps, schedule)
    if init is not None and init.shape != x_T.shape:
        raise ValueError(f"img2img: the initial latents have shape {tuple(init.shape)}, the noise {tuple(x_T.shape)}")
    if spec.scheduler is None:
        return sample_ddim(denoiser, x_T, schedule, steps, eta=eta, generator=generator, callback=callback,
                           inpainting=inpainting, progress=progress, init=init, strength=strength)
    return sample_scheduler(spec.make_scheduler(schedule), denoiser, x_T, steps,
                            generator if spec.stochastic else None, callback, inpainting, progress, desc=spec.label,
                            init=init, strength=strength)


def sample_scheduler(scheduler: SchedulerMixin, denoiser: Denoiser, x: torch.Tensor, steps: int,
                     generator: Generators = None, callback: StepCallback | None = None,
                     inpainting: Inpainting | None = None, progress: bool = False, desc: str = "Sampling",
                     init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """The denoising loop of diffusers' pipelines over one of its schedulers (StableDiffusionControlNetPipeline's;
    with `init`, StableDiffusionControlNetImg2ImgPipeline's); `generator` draws the noise of a stochastic one
    (None for the others, whose step takes none)."""
    scheduler.set_timesteps(steps, device=x.device)
    timesteps = scheduler.timesteps
    if len(timesteps) != steps:  # a scheduler with several model calls per step would need its own loop
        raise ValueError(f"{type(scheduler).__name__} makes {len(timesteps)} model calls for {steps} steps")
    if init is None:
        x = x * scheduler.init_noise_sigma
    else:
        skipped = steps - denoising_steps(steps, strength)
        scheduler.set_begin_index(skipped)
        timesteps = timesteps[skipped:]
        x = scheduler.add_noise(init, x, timesteps[:1].repeat(x.shape[0]))
    if inpainting is not None:
        inpainting.check(x.shape)
    run = len(timesteps)
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress)):
        if inpainting is not None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = inpainting.blend(x, scheduler.add_noise(inpainting.x0, noise, t.reshape(1)))
        out = denoiser(scheduler.scale_model_input(x, t), t.expand(x.shape[0]), (i, run))
        result = scheduler.step(out, t, x, **({} if generator is None else {"generator": generator}))
        x = result.prev_sample
        if callback is not None:
            callback(i, x, result.get("pred_original_sample"))
    return x if inpainting is None else inpainting.blend(x, inpainting.x0)

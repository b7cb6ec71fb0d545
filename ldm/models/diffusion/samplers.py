"""The samplers, by name: our DDIM, and diffusers' schedulers for the rest (Euler, DPM++, UniPC, ...).

Each sampler is a function over a `Denoiser` (guidance.py): it only steps. diffusers' schedulers are the
field's maintained implementations (k-diffusion's have not had a release since 2023 and pull in a dozen
training dependencies); they are built here on the model's own betas and prediction type, and driven by the
same loop as diffusers' pipelines, so a sampler here is the same function as there (tests/test_samplers.py).

Every sampler calls the denoiser once per step with step = (i, steps): a control's start/end window covers
the same steps under each of them.
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

from ldm.models.diffusion.ddim import Generators, Inpainting, NoiseSchedule, StepCallback, sample_ddim
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
        """The scheduler on the model's training betas and prediction type."""
        if schedule.parameterization not in PREDICTION_TYPES:
            raise ValueError(f"unknown parameterization {schedule.parameterization!r}")
        return self.scheduler(num_train_timesteps=schedule.num_timesteps,
                              trained_betas=schedule.betas.detach().cpu().double().numpy(),
                              prediction_type=PREDICTION_TYPES[schedule.parameterization], **self.settings)


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
    Sampler("unipc", "UniPC", 20, UniPCMultistepScheduler, {"solver_order": 2}),
)}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule, sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, generator: Generators = None,
           callback: StepCallback | None = None, inpainting: Inpainting | None = None,
           progress: bool = False) -> torch.Tensor:
    """Latents from pure noise x_T (unit variance) in `steps` steps of the named sampler.

    `generator` (one per sample, or one for the batch) draws the noise of stochastic samplers; `eta` is
    DDIM's. `inpainting` keeps its x0 where its mask is 1.
    """
    spec = get_sampler(sampler)
    steps = steps or spec.default_steps
    if eta and spec.name != "ddim":
        raise ValueError(f"eta is DDIM's; the {spec.label} sampler has none (choose ddim, or set eta to 0)")
    if spec.scheduler is None:
        return sample_ddim(denoiser, x_T, schedule, steps, eta=eta, generator=generator, callback=callback,
                           inpainting=inpainting, progress=progress)
    return sample_scheduler(spec.make_scheduler(schedule), denoiser, x_T, steps,
                            generator if spec.stochastic else None, callback, inpainting, progress, desc=spec.label)


def sample_scheduler(scheduler: SchedulerMixin, denoiser: Denoiser, x: torch.Tensor, steps: int,
                     generator: Generators = None, callback: StepCallback | None = None,
                     inpainting: Inpainting | None = None, progress: bool = False, desc: str = "Sampling"
                     ) -> torch.Tensor:
    """The denoising loop of diffusers' pipelines over one of its schedulers; `generator` draws the noise of
    a stochastic one (None for the others, whose step takes none)."""
    scheduler.set_timesteps(steps, device=x.device)
    timesteps = scheduler.timesteps
    if len(timesteps) != steps:  # a scheduler with several model calls per step would need its own loop
        raise ValueError(f"{type(scheduler).__name__} makes {len(timesteps)} model calls for {steps} steps")
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress)):
        if inpainting is not None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = inpainting.blend(x, scheduler.add_noise(inpainting.x0, noise, t.reshape(1)))
        out = denoiser(scheduler.scale_model_input(x, t), t.expand(x.shape[0]), (i, steps))
        result = scheduler.step(out, t, x, **({} if generator is None else {"generator": generator}))
        x = result.prev_sample
        if callback is not None:
            callback(i, x, result.get("pred_original_sample"))
    return x if inpainting is None else inpainting.blend(x, inpainting.x0)


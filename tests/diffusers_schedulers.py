"""diffusers' schedulers as diffusers documents them for each A1111 sampler name: the peers' side of the sampler
tests, written from diffusers' and A1111's documentation, never from our SAMPLERS settings, so that a wrong
setting there fails the tests.

Sources: diffusers' docs, "Schedulers" overview (the table of A1111/k-diffusion names -> diffusers classes and
init arguments); Stable Diffusion 1.5's scheduler_config.json as the base configuration (`from_config`); for
UniPC, which that table leaves out, A1111's own settings (uni_pc_variant bh1, uni_pc_order 3,
uni_pc_lower_order_final, and its sampling stopping at the first training step, t = 1/N, not at zero noise).
"""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD15_SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                         "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                         "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                         "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                         "steps_offset": 1, "trained_betas": None, "clip_sample": False, "interpolation_type": "linear",
                         "prediction_type": "epsilon", "sample_max_value": 1.0, "timestep_spacing": "leading",
                         "use_karras_sigmas": False}

# A1111 name -> (diffusers class, init arguments over the base configuration)
DOCUMENTED = {
    "DDIM": (DDIMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True,
                                                          "algorithm_type": "sde-dpmsolver++"}),
    "UniPC": (UniPCMultistepScheduler, {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True,
                                        "final_sigmas_type": "sigma_min"}),
    # diffusers' UniPCMultistepScheduler.from_config(SD1.5's), as ControlNet++'s eval/eval.py builds it
    "UniPC bh2": (UniPCMultistepScheduler, {}),
}


def documented_scheduler(a1111_name: str, prediction_type: str = "epsilon") -> SchedulerMixin:
    """The scheduler diffusers documents for an A1111 sampler name, on Stable Diffusion's configuration."""
    scheduler, kwargs = DOCUMENTED[a1111_name]
    return scheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type}, **kwargs)

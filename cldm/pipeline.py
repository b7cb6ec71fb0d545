"""One way to sample a ControlLDM: prompts and control units in, images out.

Every caller samples through `sample()`: ControlLDM.log_images, the Gradio apps, tool_eval_control.py, the
demo, tool_train_tiny_base.py and the benchmarks. It builds the two conditionings (the unconditional pass
carries only the units that act on it), the guided denoiser (ldm/models/diffusion/guidance.py) and runs the
named sampler (ldm/models/diffusion/samplers.py); it changes nothing on the model.

It lives in cldm/ because its requests are control units; the guidance and the samplers below it know
nothing of control.
"""

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from cldm.control import ControlUnit, unconditional_units
from ldm.models.diffusion.ddim import Inpainting
from ldm.models.diffusion.guidance import GuidedDenoiser
from ldm.models.diffusion.samplers import get_sampler
from ldm.models.diffusion.samplers import sample as run_sampler

if TYPE_CHECKING:
    from cldm.cldm import ControlLDM

logger = logging.getLogger(__name__)
MAX_SEED = 2 ** 32 - 1


@dataclass
class Samples:
    """The images of one request, in the order of the prompts, with the seed each started from."""

    images: np.ndarray  # (B, H, W, 3) uint8 RGB
    tensors: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (B, C, H / f, W / f), the sampler's output
    seeds: list[int]


def per_image(value: str | Sequence[str], n: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} given for {n} images")
    return value


def image_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """One seed per image: seed, seed + 1, ... for a single one (as A1111 does), a random start for None."""
    if seed is None:
        seed = random.randint(0, MAX_SEED)
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: {len(seeds)} seeds given for {n} images")
    return seeds


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """BCHW in [-1, 1] -> BHWC uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(model: "ControlLDM", prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
           units: Sequence[ControlUnit] = (), sampler: str = "ddim", steps: int | None = None,
           cfg_scale: float = 9.0, seed: int | Sequence[int] | None = None, num_images: int | None = None,
           height: int | None = None, width: int | None = None, eta: float = 0.0,
           callback: Callable[[int, int], None] | None = None, batch_guidance: bool = True,
           low_vram: bool = False, inpainting: Inpainting | None = None, decode: bool = True) -> Samples:
    """Images for `prompt` (one per image, or one for all `num_images`) under the control `units`.

    sampler: a name of ldm.models.diffusion.samplers.SAMPLERS, with `steps` (default: the sampler's own) and,
      for DDIM, `eta`.
    cfg_scale: classifier-free guidance against `negative_prompt`; 1 runs the conditional pass alone.
    seed: image i starts from (and, with a stochastic sampler, draws its noise from) a generator seeded
      with seed + i, or with seed[i] for a list; the same seed gives the same image in any batch.
    height, width: in pixels, multiples of the VAE factor; default the hints' size, else the model's.
    callback(done, total) after every step. low_vram: the original's save_memory (text encoder and VAE leave
    the accelerator while the UNet samples). inpainting: latents kept where its mask is 1.
    `decode=False` skips the VAE (images and tensors are then empty).
    """
    n = len(prompt) if num_images is None and not isinstance(prompt, str) else (num_images or 1)
    prompts, negatives = per_image(prompt, n, "prompt"), per_image(negative_prompt, n, "negative_prompt")
    seeds = image_seeds(seed, n)
    spec = get_sampler(sampler)
    steps = steps or spec.default_steps
    if not np.isfinite(cfg_scale) or not np.isfinite(eta):
        raise ValueError(f"cfg_scale and eta must be finite numbers, got {cfg_scale} and {eta}")
    device = model.device
    units = [replace(u, hint=u.hint.to(device)) for u in units]  # new units: the caller's stay as they are
    height, width = image_size(model, units, height, width)
    f = model.vae_scale_factor

    if low_vram:
        model.low_vram_shift(is_diffusing=False)
    size = (height, width)
    cond = {**model.text_conditioning(prompts, size), "control": units}
    uncond = None
    if cfg_scale != 1.0:
        uncond = {**model.text_conditioning(negatives, size),
                  "control": unconditional_units(units)}
    if low_vram:
        model.low_vram_shift(is_diffusing=True)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = randn_tensor((n, model.channels, height // f, width // f), generator=generators, device=device)
    denoiser = GuidedDenoiser(model, cond, uncond, cfg_scale, batch=batch_guidance)
    step_done = None if callback is None else (lambda i, x, x0: callback(i + 1, steps))
    latents = run_sampler(denoiser, x_T, model, sampler=spec.name, steps=steps, eta=eta, generator=generators,
                          callback=step_done, inpainting=inpainting)

    if low_vram:
        model.low_vram_shift(is_diffusing=False)
    tensors = model.decode_first_stage(latents).float() if decode else torch.empty(0)
    images = to_uint8(tensors) if decode else np.empty((0, height, width, 3), np.uint8)
    return Samples(images=images, tensors=tensors, latents=latents, seeds=seeds)


def image_size(model: "ControlLDM", units: Sequence[ControlUnit], height: int | None, width: int | None
               ) -> tuple[int, int]:
    """(height, width) in pixels: as given, else the hints', else the model's training size; checked against
    the VAE factor and every hint."""
    f = model.vae_scale_factor
    if units:
        default = tuple(units[0].hint.shape[-2:])
    else:
        default = (model.image_size * f,) * 2
    size = (height or default[0], width or default[1])
    if size[0] % f or size[1] % f or min(size) <= 0:
        raise ValueError(f"image size {size[1]}x{size[0]}: width and height must be positive multiples of {f}")
    for i, unit in enumerate(units):
        if tuple(unit.hint.shape[-2:]) != size:
            raise ValueError(f"control unit {i + 1}: its hint is {unit.hint.shape[-1]}x{unit.hint.shape[-2]}, "
                             f"the images are {size[1]}x{size[0]}")
    return size

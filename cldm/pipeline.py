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
from ldm.models.diffusion.ddim import Inpainting, denoising_steps
from ldm.models.diffusion.guidance import GuidedDenoiser
from ldm.models.diffusion.samplers import check_steps, get_sampler
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


Size = tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor  # (h, w) or (top, left): one, or one per image
DEFAULT_DENOISING_STRENGTH = 0.75  # A1111's img2img default
# sample()'s SDXL size arguments (diffusers' names) -> text_conditioning's
SIZE_ARGUMENTS = {"original_size": "original_size", "crops_coords_top_left": "crop", "target_size": "target_size"}


@torch.no_grad()
def sample(model: "ControlLDM", prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
           units: Sequence[ControlUnit] = (), sampler: str = "ddim", steps: int | None = None,
           cfg_scale: float = 9.0, seed: int | Sequence[int] | None = None, num_images: int | None = None,
           height: int | None = None, width: int | None = None, eta: float = 0.0,
           callback: Callable[[int, int], None] | None = None, batch_guidance: bool = True,
           low_vram: bool = False, inpainting: Inpainting | None = None, decode: bool = True,
           init_image: torch.Tensor | None = None, denoising_strength: float | None = None,
           original_size: Size | None = None, crops_coords_top_left: Size | None = None,
           target_size: Size | None = None,
           negative_original_size: Size | None = None, negative_crops_coords_top_left: Size | None = None,
           negative_target_size: Size | None = None) -> Samples:
    """Images for `prompt` (one per image, or one for all `num_images`) under the control `units`.

    sampler: a name of ldm.models.diffusion.samplers.SAMPLERS, with `steps` (default: the sampler's own) and,
      for DDIM, `eta`.
    cfg_scale: classifier-free guidance against `negative_prompt`; 1 runs the conditional pass alone.
    seed: image i starts from (and, with a stochastic sampler, draws its noise from) a generator seeded
      with seed + i, or with seed[i] for a list; the same seed gives the same image in any batch.
    height, width: in pixels, multiples of the VAE factor; default the hints' size, else the initial image's,
      else the model's.
    init_image: img2img: BCHW in [0, 1] (one per image, or one for all), encoded by the VAE and noised to the
      level of the first step run; `denoising_strength` (default 0.75) in (0, 1] sets how many of the `steps`
      run: the last int(steps * strength), as in diffusers' StableDiffusionControlNetImg2ImgPipeline (whose
      draws from the generators ours repeat: the VAE's sample, then the noise). A unit's start/end window is a
      fraction of the steps that run.
    original_size, crops_coords_top_left, target_size (and their negative_ counterparts for the unconditional
      pass, each defaulting to the conditional one): SDXL's size conditioning, (h, w) and (top, left) as in
      diffusers' SDXL pipelines, one for all images or one per image; original and target default to the
      image size, the crop to (0, 0). Refused for models without vector conditioning.
    callback(done, total) after every step. low_vram: the original's save_memory (text encoder and VAE leave
    the accelerator while the UNet samples). inpainting: latents kept where its mask is 1.
    `decode=False` skips the VAE (images and tensors are then empty).
    """
    n = len(prompt) if num_images is None and not isinstance(prompt, str) else (num_images or 1)
    prompts, negatives = per_image(prompt, n, "prompt"), per_image(negative_prompt, n, "negative_prompt")
    seeds = image_seeds(seed, n)
    spec = get_sampler(sampler)
    steps = spec.default_steps if steps is None else steps
    if not np.isfinite(cfg_scale) or not np.isfinite(eta):
        raise ValueError(f"cfg_scale and eta must be finite numbers, got {cfg_scale} and {eta}")
    if init_image is None and denoising_strength is not None:
        raise ValueError("denoising_strength applies to img2img: give an init_image too")
    strength = DEFAULT_DENOISING_STRENGTH if denoising_strength is None else denoising_strength
    check_steps(spec, steps, model)
    total = steps if init_image is None else denoising_steps(steps, strength)
    device = model.device
    units = [replace(u, hint=u.hint.to(device)) for u in units]  # new units: the caller's stay as they are
    height, width = image_size(model, units, height, width, init_image)
    f = model.vae_scale_factor
    sizes, negative_sizes = size_conditioning(
        model, n, original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
        negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
        negative_target_size=negative_target_size)

    if low_vram:
        model.low_vram_shift(is_diffusing=False)
    size = (height, width)
    cond = {**model.text_conditioning(prompts, size, **sizes), "control": units}
    uncond = None
    if cfg_scale != 1.0:
        uncond = {**model.text_conditioning(negatives, size, **negative_sizes),
                  "control": unconditional_units(units)}
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    init = None if init_image is None else init_latents(model, init_image, n, generators)
    if low_vram:
        model.low_vram_shift(is_diffusing=True)

    x_T = randn_tensor((n, model.channels, height // f, width // f), generator=generators, device=device)
    denoiser = GuidedDenoiser(model, cond, uncond, cfg_scale, batch=batch_guidance)
    step_done = None if callback is None else (lambda i, x, x0: callback(i + 1, total))
    latents = run_sampler(denoiser, x_T, model, sampler=spec.name, steps=steps, eta=eta, generator=generators,
                          callback=step_done, inpainting=inpainting, init=init, strength=strength)
    if not torch.isfinite(latents).all():
        raise FloatingPointError(f"the {spec.label} sampler ended in NaN or infinite latents at {steps} steps "
                                 "(check the model's weights and the precision)")

    if low_vram:
        model.low_vram_shift(is_diffusing=False)
    tensors = model.decode_first_stage(latents).float() if decode else torch.empty(0)
    images = to_uint8(tensors) if decode else np.empty((0, height, width, 3), np.uint8)
    return Samples(images=images, tensors=tensors, latents=latents, seeds=seeds)


def init_latents(model: "ControlLDM", init_image: torch.Tensor, n: int, generators: list[torch.Generator]
                 ) -> torch.Tensor:
    """The scaled latents of img2img's initial images (BCHW in [0, 1]): the VAE posterior sampled with image i's
    generator, as diffusers' img2img pipelines draw it."""
    if init_image.shape[0] not in (1, n):
        raise ValueError(f"init_image: {init_image.shape[0]} images given for {n}")
    pixels = init_image.to(model.device, torch.float32).expand(n, -1, -1, -1) * 2.0 - 1.0
    posterior = model.encode_first_stage(pixels)
    noise = randn_tensor(posterior.mean.shape, generator=generators, device=posterior.mean.device,
                         dtype=posterior.mean.dtype)
    return model.scale_factor * (posterior.mean + posterior.std * noise)


def size_conditioning(model: "ControlLDM", n: int, **sizes: Size | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """text_conditioning's size arguments, (n, 2) each, for the conditional and the unconditional pass; each
    negative_ one defaults to its conditional counterpart."""
    given = [name for name, value in sizes.items() if value is not None]
    if not model.vector_conditioned:
        if given:
            raise ValueError(f"{', '.join(given)}: size conditioning applies to SDXL-type models only "
                             f"({type(model).__name__} has no vector conditioning)")
        return {}, {}
    cond, uncond = {}, {}
    for name, key in SIZE_ARGUMENTS.items():
        negative = f"negative_{name}"
        if sizes[name] is not None:
            cond[key] = per_image_pair(sizes[name], n, name)
        if sizes[negative] is not None:
            uncond[key] = per_image_pair(sizes[negative], n, negative)
        elif key in cond:
            uncond[key] = cond[key]
    return cond, uncond


def per_image_pair(value: Size, n: int, name: str) -> torch.Tensor:
    """(n, 2) float32 from one pair or n pairs."""
    pairs = value.detach().float().cpu() if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float32)
    if pairs.dim() == 1:
        pairs = pairs[None]
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] not in (1, n) or not torch.isfinite(pairs).all():
        raise ValueError(f"{name}: expected one pair of numbers or {n} pairs, got {tuple(pairs.shape)} values")
    return pairs.expand(n, 2)


def image_size(model: "ControlLDM", units: Sequence[ControlUnit], height: int | None, width: int | None,
               init_image: torch.Tensor | None = None) -> tuple[int, int]:
    """(height, width) in pixels: as given, else the hints', else the initial image's, else the model's training
    size; checked against the VAE factor, every hint and the initial image."""
    f = model.vae_scale_factor
    if init_image is not None and (init_image.dim() != 4 or init_image.shape[1] != 3):
        raise ValueError(f"init_image: expected RGB images as (B, 3, H, W) in [0, 1], got shape "
                         f"{tuple(init_image.shape)}")
    if units:
        default = tuple(units[0].hint.shape[-2:])
    elif init_image is not None:
        default = tuple(init_image.shape[-2:])
    else:
        default = (model.image_size * f,) * 2
    size = (height or default[0], width or default[1])
    if size[0] % f or size[1] % f or min(size) <= 0:
        raise ValueError(f"image size {size[1]}x{size[0]}: width and height must be positive multiples of {f}")
    for i, unit in enumerate(units):
        if tuple(unit.hint.shape[-2:]) != size:
            raise ValueError(f"control unit {i + 1}: its hint is {unit.hint.shape[-1]}x{unit.hint.shape[-2]}, "
                             f"the images are {size[1]}x{size[0]}")
    if init_image is not None:
        if tuple(init_image.shape[-2:]) != size:
            raise ValueError(f"init_image is {init_image.shape[-1]}x{init_image.shape[-2]}, the images are "
                             f"{size[1]}x{size[0]}")
        low, high = float(init_image.min()), float(init_image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"init_image: values must be in [0, 1] (as hints are), got {low:.3g} to {high:.3g}")
    return size

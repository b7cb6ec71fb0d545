"""DDIM sampling with classifier-free guidance; cond and uncond run as one batch when they can.

They share one doubled batch when both conditionings have the same structure and shapes (the usual case);
otherwise they run as separate passes, so the unconditional side may carry different conditioning (for
ControlNet's guess mode: no control at all) or per-pass objects such as control units.

Timesteps are uniform: exactly `S` of them, for any S from 1 to the number of training steps (the original
produced S+1 timesteps, and an index past the schedule, whenever T/S left no remainder room, e.g. S = 3, 9,
27, 36, 37).
"""

from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm


def uniform_timesteps(num_ddim_steps: int, num_ddpm_steps: int) -> np.ndarray:
    """Every c-th training step, c = T // S, offset by 1 like the original where that stays in range."""
    if not 1 <= num_ddim_steps <= num_ddpm_steps:
        raise ValueError(f"DDIM steps must be between 1 and {num_ddpm_steps}, got {num_ddim_steps}")
    c = num_ddpm_steps // num_ddim_steps
    steps = np.arange(num_ddim_steps) * c
    offset = 1 if steps[-1] + 1 < num_ddpm_steps else 0
    return steps + offset


class Unbatchable(Exception):
    """Raised inside batch_conditionings where the two structures differ."""


def batch_conditionings(c: Any, uc: Any) -> Any:
    """c and uc concatenated along the batch (c first), or None where their structures differ.

    Tensors of equal shape concatenate; dicts with the same keys, and lists or tuples of the same length,
    recurse; None pairs only with None. Anything else (e.g. control units holding their own hints) cannot batch.
    """
    try:
        return concat_structures(c, uc)
    except Unbatchable:
        return None


def concat_structures(c: Any, uc: Any) -> Any:
    if c is None and uc is None:
        return None
    if torch.is_tensor(c) and torch.is_tensor(uc) and c.shape == uc.shape:
        return torch.cat([c, uc])
    if isinstance(c, dict) and isinstance(uc, dict) and c.keys() == uc.keys():
        return {k: concat_structures(c[k], uc[k]) for k in c}
    if isinstance(c, (list, tuple)) and isinstance(uc, (list, tuple)) and len(c) == len(uc):
        return [concat_structures(a, b) for a, b in zip(c, uc)]
    raise Unbatchable


class DDIMSampler:
    """DDIM over a LatentDiffusion-like model (needs apply_model, alphas_cumprod, parameterization).

    `batch_guidance=False` always runs cond and uncond as separate passes: half the peak memory of a step.
    """

    def __init__(self, model: Any, schedule: str = "linear", batch_guidance: bool = True, **kwargs):
        self.model = model
        self.batch_guidance = batch_guidance
        self._batched = None
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = False) -> None:
        if ddim_discretize != "uniform":
            raise ValueError(f"only uniform DDIM discretization is supported, got {ddim_discretize!r}")
        self.ddim_timesteps = uniform_timesteps(ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod.detach().double().cpu()
        a = alphas_cumprod[self.ddim_timesteps]
        a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])
        sigmas = ddim_eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = a.float(), a_prev.float(), sigmas.float()
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - a).float()
        self.ddim_eta = ddim_eta
        if verbose:
            print(f"DDIM timesteps: {self.ddim_timesteps.tolist()}; sigmas: {self.ddim_sigmas.tolist()}")

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: Callable[[int], None] | None = None, img_callback: Callable | None = None,
               eta: float = 0.0, x_T: torch.Tensor | None = None, temperature: float = 1.0,
               verbose: bool = True, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None,
               **kwargs) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, intermediates)."""
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=False)
        size = (batch_size, *shape)
        device = self.model.betas.device
        img = torch.randn(size, device=device, generator=generator) if x_T is None else x_T.to(device)
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(self.ddim_timesteps)
        total = len(time_range)
        for i, step in enumerate(tqdm(time_range, desc="DDIM Sampler", total=total, disable=not verbose)):
            index = total - i - 1
            ts = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            img, pred_x0 = self.p_sample_ddim(
                img, conditioning, ts, index=index, temperature=temperature,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, generator=generator,
                sampling_step=(i, total))
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        self._batched = None  # the conditionings of this call are not kept alive
        return img, intermediates

    def model_output(self, x: torch.Tensor, t: torch.Tensor, c: Any, uc: Any, scale: float,
                     sampling_step: tuple[int, int]) -> torch.Tensor:
        """The guided prediction: uncond + scale * (cond - uncond), or cond alone when scale is 1."""
        if uc is None or scale == 1.0:
            return self.model.apply_model(x, t, c, sampling_step=sampling_step)
        both = self.batched(c, uc) if self.batch_guidance else None
        if both is not None:
            out_c, out_uc = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both,
                                                   sampling_step=sampling_step).chunk(2)
        else:
            out_c = self.model.apply_model(x, t, c, sampling_step=sampling_step)
            out_uc = self.model.apply_model(x, t, uc, sampling_step=sampling_step)
        return out_uc + scale * (out_c - out_uc)

    def batched(self, c: Any, uc: Any) -> Any:
        """batch_conditionings(c, uc), built once per pair: the same tensors every step let models reuse
        work that depends on the conditioning alone (e.g. cldm.cldm.encoded_hint)."""
        cached = self._batched
        if cached is None or cached[0] is not c or cached[1] is not uc:
            self._batched = cached = (c, uc, batch_conditionings(c, uc))
        return cached[2]

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, temperature: float = 1.0,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      generator: torch.Generator | None = None, sampling_step: tuple[int, int] = (0, 1)
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model_output(x, t, c, unconditional_conditioning, unconditional_guidance_scale, sampling_step)
        if self.model.parameterization == "v":
            e_t = self.model.predict_eps_from_z_and_v(x, t, out)
        else:
            e_t = out
        shape = (x.shape[0], 1, 1, 1)
        a_t = torch.full(shape, float(self.ddim_alphas[index]), device=x.device)
        a_prev = torch.full(shape, float(self.ddim_alphas_prev[index]), device=x.device)
        sigma_t = torch.full(shape, float(self.ddim_sigmas[index]), device=x.device)
        sqrt_one_minus_at = torch.full(shape, float(self.ddim_sqrt_one_minus_alphas[index]), device=x.device)
        if self.model.parameterization == "v":
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, out)
        else:
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).clamp(min=0).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape, device=x.device, generator=generator) * temperature
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0

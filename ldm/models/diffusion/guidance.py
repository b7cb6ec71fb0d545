"""Classifier-free guidance, apart from any sampler: the one place where cond and uncond meet.

A sampler sees a `Denoiser`: (x_t, t, step) -> the model's output (eps, v or x0, as the model predicts),
already guided. `GuidedDenoiser` makes one from a model with `apply_model` and two conditionings. Cond and
uncond run as one doubled batch when their structures batch (the usual case), and as separate passes when
they do not (e.g. a control that acts on the cond pass only), so the unconditional side may carry other
conditioning than the conditional one.

`step` is the (index, total) of the sampler's step the call belongs to: models with step-dependent parts
(a control's start/end window) read it, so every sampler reports the schedule the same way.
"""

from typing import Any, Protocol

import torch

Step = tuple[int, int]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        """The model's (guided) output for latents x at timesteps t (one per sample), in x's dtype."""


class DiffusionModel(Protocol):
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any,
                    sampling_step: Step | None = None) -> torch.Tensor:
        ...


class Unbatchable(Exception):
    """Raised inside concat_structures where the two structures differ."""


def batch_conditionings(c: Any, uc: Any) -> Any:
    """c and uc concatenated along the batch (c first), or None where their structures differ.

    Tensors of equal shape concatenate; dicts with the same keys, and lists or tuples of the same length,
    recurse; None pairs with None, and any other object with itself (shared by both halves, e.g. a control
    unit acting on both passes). Anything else cannot batch.
    """
    try:
        return concat_structures(c, uc)
    except Unbatchable:
        return None


def concat_structures(c: Any, uc: Any) -> Any:
    if torch.is_tensor(c) and torch.is_tensor(uc):
        if c.shape != uc.shape:
            raise Unbatchable
        return torch.cat([c, uc])
    if isinstance(c, dict) and isinstance(uc, dict) and c.keys() == uc.keys():
        return {k: concat_structures(c[k], uc[k]) for k in c}
    if isinstance(c, (list, tuple)) and isinstance(uc, (list, tuple)) and len(c) == len(uc):
        return [concat_structures(a, b) for a, b in zip(c, uc)]
    if c is uc and not isinstance(c, (dict, list, tuple)):
        return c
    raise Unbatchable


class GuidedDenoiser:
    """uncond + scale * (cond - uncond) of a model's output; cond alone when scale is 1 or there is no uncond.

    `batch=False` always runs cond and uncond as separate passes: half the peak memory of a step.
    """

    def __init__(self, model: DiffusionModel, cond: Any, uncond: Any = None, scale: float = 1.0,
                 batch: bool = True):
        self.model = model
        self.cond = cond
        self.uncond = uncond if scale != 1.0 else None
        self.scale = scale
        # built once: the same tensors at every step let models reuse work that depends on the conditioning
        # alone (e.g. a ControlNet's hint encoding)
        self.both = batch_conditionings(cond, uncond) if batch and self.uncond is not None else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        if self.uncond is None:
            return self.model.apply_model(x, t, self.cond, sampling_step=step)
        if self.both is not None:
            out_c, out_uc = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), self.both,
                                                   sampling_step=step).chunk(2)
        else:
            out_c = self.model.apply_model(x, t, self.cond, sampling_step=step)
            out_uc = self.model.apply_model(x, t, self.uncond, sampling_step=step)
        return out_uc + self.scale * (out_c - out_uc)

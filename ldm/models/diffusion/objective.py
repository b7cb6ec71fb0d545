"""The training objective of a diffusion model: how a step's noise is drawn and how each sample's loss is weighted.

DDPM.p_losses calls it once per step; each option is a parameter of the model's config (`snr_gamma`,
`noise_offset`, and `zero_terminal_snr` for the schedule, see ldm/modules/diffusionmodules/util.py), which
tutorial_train's option of the same name overrides. All are off by default, which is the original's objective.

- min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): the loss of a
  sample at timestep t is weighted by min(SNR(t), gamma) / SNR(t) for eps-prediction, min(SNR(t), gamma) /
  (SNR(t) + 1) for v-prediction and min(SNR(t), gamma) for x0-prediction, SNR(t) = a_t / (1 - a_t); diffusers'
  training scripts weight eps and v so (gamma 5 is the paper's recommendation).
- noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): each sample's noise gets one extra Gaussian value
  per channel times `noise_offset`, as diffusers' and kohya's scripts add it (0.05 to 0.1 is usual), which lets
  the model learn very dark and very bright images.

A further term on the model's one-step estimate of the clean latents (a reward on the decoded image, as
ControlNet++ trains; cldm/reward.py) is a `DenoisedLoss` that p_losses adds to the loss.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from ldm.models.diffusion.ddim import NoiseSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def signal_to_noise(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t) of each sample's timestep, from the square roots (1 - a_t in float32 would lose
    digits near t = 0): finite, and 0 at the last timestep of a zero-terminal-SNR schedule (which only v-prediction
    models train on, so no eps weight divides by it)."""
    return (schedule.sqrt_alphas_cumprod[t].float() / schedule.sqrt_one_minus_alphas_cumprod[t].float()) ** 2


def min_snr_weights(snr: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Each sample's loss weight under min-SNR-gamma, for a model that predicts `parameterization`."""
    clipped = snr.clamp(max=gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "v":
        return clipped / (snr + 1.0)
    if parameterization == "x0":
        return clipped
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")


class DenoisedLoss(Protocol):
    """A loss term on the one-step estimate of the clean latents: called by p_losses with x0 predicted from the step's
    model output and each sample's timestep; returns the term to add to the loss (weighted as it is meant to count)
    and values to log, by name."""

    def __call__(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class Objective:
    """The objective's options: `snr_gamma` (None: every timestep weighs 1) and `noise_offset` (0: plain noise)."""

    snr_gamma: float | None = None
    noise_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive (5 is the paper's), got {self.snr_gamma}")
        if not self.noise_offset >= 0:
            raise ValueError(f"noise_offset must be 0 or more (0.05 to 0.1 is usual), got {self.noise_offset}")

    def noise_like(self, x_start: torch.Tensor) -> torch.Tensor:
        """The noise of a training step: standard Gaussian, plus noise_offset times one Gaussian value per sample
        and channel (drawn after the per-pixel noise, as diffusers' scripts draw it)."""
        noise = torch.randn_like(x_start)
        if self.noise_offset:
            shape = (*x_start.shape[:2], *(1,) * (x_start.dim() - 2))
            noise = noise + self.noise_offset * torch.randn(shape, device=x_start.device, dtype=x_start.dtype)
        return noise

    def sample_weights(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        """Each sample's weight in the loss, by its timestep and the model's prediction (float32, one per sample)."""
        if self.snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        return min_snr_weights(signal_to_noise(schedule, t), self.snr_gamma, schedule.parameterization)

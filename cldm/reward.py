"""Reward fine-tuning as ControlNet++ trains it (Li et al., ECCV 2024, "ControlNet++: Improving Conditional Controls
with Efficient Consistency Feedback"): a term of the training loss that asks a detector to find the hint again in
the image the model would generate.

Each training step draws t over the whole schedule as usual; for the samples with t <= max_t (200 of 1000 in the
paper, where one step of denoising gives a faithful image) the model's output is turned into the one-step estimate
of the clean latents (x0 from eps or v), decoded by the VAE to an image in [0, 1], and a frozen, differentiable
detector (the reward model) is run on it. Its output is compared with the label of the sample: the per-condition
consistency loss, averaged over the rewarded samples, times the reward's weight, is added to the diffusion loss.
The gradient flows through the detector and the VAE decoder (both frozen, in eval mode, never updated) into
whatever the mode trains.

Per condition (weights in annotator/ckpts/ or $CONTROLNET_ANNOTATOR_CKPTS; weight = the default loss weight):

  canny    kornia's Canny at ControlNet++'s thresholds 0.1 / 0.2: the gradient magnitude after non-maximum
           suppression. Label: the same of the training image. MSE, weight 1.
  hed      HED soft edges (ControlNetHED.pth). Label: the same of the training image. MSE, weight 1.
  lineart  the line-art generator (sk_model.pth), dark lines on white. Label: the same of the training image.
           MSE, weight 0.5.
  depth    MiDaS DPT-Hybrid (dpt_hybrid-midas-501f0c75.pt) at 384 x 384, each map divided by its maximum. Label:
           the hint's mean over channels, divided by its maximum. MSE, weight 1.
  seg      UperNet-UniFormer (upernet_global_small.pth): ADE20K logits at stride 4. Label: the hint's classes (each
           pixel's nearest palette colour, black ignored), resized to the logits nearest-neighbour. Cross-entropy
           over the labelled pixels, weight 0.5.
  fill     ours, for Fill50K's circles: the soft fill region, the sigmoid of where each pixel lies between the
           circle's colour and the background's (read off the training image). Label: the training image's disc
           (the fill IoU metric's region). 1 - soft IoU, weight 1.

Detector inputs follow the paper: canny, hed and lineart take the image in [0, 1] (hed scales it to 0..255 as its
network expects), depth takes it resized to 384 x 384 and normalised to [-1, 1], seg takes it normalised with the
ImageNet mean and std. The weights are ControlNet++'s `grad_scale` for each condition. The demo's circles have no
published detector; the fill reward's loss is the differentiable counterpart of the fill IoU metric.

Differences from ControlNet++'s code, each deliberate: the rewarded samples are selected before decoding (their
code decodes the whole batch and masks the loss), which gives the same loss and gradient at a fifth of the decoder's
cost; the HED output stays soft (their `.to(torch.uint8)` cuts the gradient); a depth map's maximum is clamped at
1e-6 before dividing (a flat prediction would give NaN).
"""

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from annotator.util import MissingWeightsError
from cldm.fidelity import reference_fill
from ldm.checkpoint import UserError

log = logging.getLogger(__name__)

# ControlNet++ rewards the samples whose timestep is at most this (of 1000): one step of denoising from there gives
# an image the detectors can read.
PAPER_MAX_T = 200


class RewardModel(ABC):
    """A frozen, differentiable detector and the consistency loss between its output on a generated image and a
    sample's label. `labels` runs without gradient; `losses` is differentiable in the image."""

    name: ClassVar[str]
    weight: ClassVar[float]  # the loss weight when none is given: ControlNet++'s grad_scale for the condition
    uses_target: ClassVar[bool] = False  # whether the label comes from the training image (else from the hint)

    def __init__(self, networks: list[nn.Module]) -> None:
        self.networks = networks
        for network in networks:
            network.eval().requires_grad_(False)

    def to(self, device: torch.device) -> "RewardModel":
        """The detector's networks on `device` (float32; autocast computes them in the training's precision)."""
        for network in self.networks:
            network.to(device)
        return self

    @abstractmethod
    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> Any:
        """What the detector's output is compared with, for hints (Bx3xHxW in [0, 1]) and the training images
        (Bx3xHxW in [0, 1], or None where the reward does not use them)."""

    @abstractmethod
    def losses(self, image: torch.Tensor, labels: Any) -> torch.Tensor:
        """Each sample's consistency loss (B,) between the detector's output on `image` (Bx3xHxW in [0, 1]) and
        its labels."""


def widened(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or wider (float64 stays): losses and thresholds are not computed in bf16 / fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared difference."""
    return ((widened(a) - widened(b)) ** 2).flatten(1).mean(1)


class CannyReward(RewardModel):
    """kornia's Canny (blur 5x5, sigma 1, Sobel, non-maximum suppression) at ControlNet++'s thresholds 0.1 and 0.2:
    the gradient magnitude at the thinned edges, a map that is differentiable in the image almost everywhere."""

    name, weight, uses_target = "canny", 1.0, True
    LOW, HIGH = 0.1, 0.2

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        super().__init__([])

    @classmethod
    def magnitude(cls, image: torch.Tensor) -> torch.Tensor:
        from kornia.filters import canny
        with torch.autocast(image.device.type, enabled=False):  # atan2 and the thresholds want float32
            return canny(widened(image), cls.LOW, cls.HIGH, hysteresis=False)[0]

    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return self.magnitude(target)

    def losses(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mean_squared(self.magnitude(image), labels)


class HEDReward(RewardModel):
    """HED soft edges (the annotator's network, ControlNet 1.1's ControlNetHED.pth) of the image in 0..255."""

    name, weight, uses_target = "hed", 1.0, True

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        from annotator.hed import HEDdetector
        super().__init__([HEDdetector(device, random_init=random_init).model])

    def edges(self, image: torch.Tensor) -> torch.Tensor:
        from annotator.hed import side_output_mean
        return torch.sigmoid(widened(side_output_mean(self.networks[0], image * 255.0)))

    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return self.edges(target)

    def losses(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mean_squared(self.edges(image), labels)


class LineartReward(RewardModel):
    """Line art (the annotator's generator, ControlNet 1.1's sk_model.pth) of the image in [0, 1]: dark lines on
    white, compared with the same of the training image (the hint is its inverse)."""

    name, weight, uses_target = "lineart", 0.5, True

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        from annotator.lineart import LineartDetector
        super().__init__([LineartDetector(device, random_init=random_init).model])

    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return self.networks[0](target)

    def losses(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mean_squared(self.networks[0](image), labels)


def max_normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map (BxHxW) divided by its maximum, as ControlNet++ brings depth and its label to (0, 1]."""
    return maps / maps.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1)


class DepthReward(RewardModel):
    """MiDaS DPT-Hybrid relative inverse depth of the image resized to `size` x `size` (384, the paper's) and
    normalised to [-1, 1], brought back to the image's size; each map and each label divided by its maximum."""

    name, weight = "depth", 1.0

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False, size: int = 384) -> None:
        from annotator.midas import MULTIPLE, MidasDetector
        if size % MULTIPLE:
            raise ValueError(f"the depth reward's input size must be a multiple of {MULTIPLE}, got {size}")
        super().__init__([MidasDetector(device, random_init=random_init).model])
        self.size = size

    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return max_normalised(widened(hint).mean(1))

    def losses(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)
        depth = widened(self.networks[0](x * 2.0 - 1.0))
        depth = F.interpolate(depth[:, None], size=labels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return mean_squared(max_normalised(depth), labels)


class SegReward(RewardModel):
    """UperNet-UniFormer ADE20K logits (stride 4) of the ImageNet-normalised image, against the hint's classes
    (each pixel's nearest palette colour, the hint resized to the logits nearest-neighbour): cross-entropy, averaged
    over the pixels of a class; black pixels (ADE20K's "other") are ignored, as ControlNet++ ignores class 0."""

    name, weight = "seg", 0.5

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        from annotator.uniformer import MEAN, STD, UniformerDetector
        super().__init__([UniformerDetector(device, random_init=random_init).model])
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) / 255.0 for v in (MEAN, STD))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return widened(self.networks[0]((image - self.mean.to(image)) / self.std.to(image)))

    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        from annotator.uniformer import classes_of
        # the logits' size follows from the input's: stride 4
        size = (math.ceil(hint.shape[-2] / 4), math.ceil(hint.shape[-1] / 4))
        colours = F.interpolate(widened(hint), size=size, mode="nearest") * 255.0
        return torch.from_numpy(classes_of(colours.permute(0, 2, 3, 1).cpu().numpy())).to(hint.device)

    def losses(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from annotator.uniformer import NO_CLASS
        logits = self.logits(image)
        if logits.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"the segmentation logits are {tuple(logits.shape[-2:])} for an image of "
                             f"{tuple(image.shape[-2:])}, the labels {tuple(labels.shape[-2:])}")
        pixel_losses = F.cross_entropy(logits, labels, ignore_index=NO_CLASS, reduction="none").flatten(1)
        labelled = (labels != NO_CLASS).flatten(1).sum(1)
        return pixel_losses.sum(1) / labelled.clamp_min(1)  # 0 for a hint of no class, as ControlNet++'s


@dataclass(frozen=True)
class FillLabels:
    """Each Fill50K target's disc (Bx1xHxW, 0/1) and its circle's and background's colours (Bx3, in [0, 1])."""

    disc: torch.Tensor
    color: torch.Tensor
    background: torch.Tensor


class FillReward(RewardModel):
    """The soft fill region of the image: sigmoid((|x - B|^2 - |x - C|^2) / |C - B|^2 / temperature) for the
    circle's colour C and the background's B of each sample (1 at C, 0 at B, 1/2 half way: the fill IoU metric's
    region, smoothed), against the target's disc: 1 - soft IoU."""

    name, weight, uses_target = "fill", 1.0, True
    TEMPERATURE = 0.1

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        super().__init__([])

    def labels(self, hint: torch.Tensor, target: torch.Tensor | None) -> FillLabels:
        discs, colors, backgrounds = [], [], []
        for image in (target.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).byte().cpu().numpy():
            try:
                disc, color, background = reference_fill(image)
            except ValueError as err:
                raise UserError(f"the fill reward needs Fill50K-type training images (one circle on a background): "
                                f"{err}", "use another --reward for this data") from err
            discs.append(disc)
            colors.append(color)
            backgrounds.append(background)
        as_tensor = lambda a: torch.from_numpy(np.stack(a)).to(widened(target))  # noqa: E731
        return FillLabels(as_tensor(discs)[:, None], as_tensor(colors) / 255.0, as_tensor(backgrounds) / 255.0)

    def region(self, image: torch.Tensor, labels: FillLabels) -> torch.Tensor:
        color, background = (c.view(-1, 3, 1, 1) for c in (labels.color, labels.background))
        contrast = ((color - background) ** 2).sum(1, keepdim=True)
        image = widened(image)
        nearer = (((image - background) ** 2).sum(1, keepdim=True) - ((image - color) ** 2).sum(1, keepdim=True)) \
            / contrast
        return torch.sigmoid(nearer / self.TEMPERATURE)

    def losses(self, image: torch.Tensor, labels: FillLabels) -> torch.Tensor:
        region = self.region(image, labels)
        overlap = (region * labels.disc).flatten(1).sum(1)
        union = (region + labels.disc - region * labels.disc).flatten(1).sum(1)
        return 1.0 - overlap / union.clamp_min(1e-6)


REWARD_MODELS: dict[str, type[RewardModel]] = {cls.name: cls for cls in (CannyReward, HEDReward, LineartReward,
                                                                          DepthReward, SegReward, FillReward)}
REWARDS = tuple(REWARD_MODELS)


def load_reward_model(name: str, device: str | torch.device = "cpu", random_init: bool = False) -> RewardModel:
    """The reward model of `name` with its detector's weights from annotator/ckpts/ (or $CONTROLNET_ANNOTATOR_CKPTS);
    a missing file is a UserError naming it and where it goes. `random_init`: random weights (tests)."""
    if name not in REWARD_MODELS:
        raise UserError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    try:
        return REWARD_MODELS[name](device, random_init=random_init)
    except MissingWeightsError as err:
        what, where = str(err).splitlines()[:2]
        raise UserError(f"--reward {name} needs its detector's weights. {what}", where) from err


def images_needed(name: str, source: str) -> UserError:
    """The error for a reward that compares with the training images where `source` holds none."""
    return UserError(f"--reward {name} compares with the training images, which {source} does not hold",
                     "train from the images (drop --cached_latents), or use --reward depth or seg, whose labels are "
                     "the hints")


@dataclass(frozen=True)
class Reward:
    """The reward term of the training loss: the reward model, its weight, the largest rewarded timestep, and
    whether the decoder and detector recompute their activations in backward instead of keeping them."""

    model: RewardModel
    weight: float
    max_t: int = PAPER_MAX_T
    checkpointing: bool = True

    def step(self, decode: Callable[[torch.Tensor], torch.Tensor], hint: torch.Tensor,
             target: torch.Tensor | None) -> "RewardStep":
        """The term for one batch: `decode` (latents -> images in [-1, 1], differentiable), the batch's hints
        (Bx3xHxW in [0, 1]) and training images (Bx3xHxW in [-1, 1], or None)."""
        if self.model.uses_target and target is None:
            raise images_needed(self.model.name, "a latent cache")
        return RewardStep(self, decode, hint, None if target is None else (widened(target) + 1.0) / 2.0)


@dataclass(frozen=True)
class RewardStep:
    """One batch's reward term, a DenoisedLoss (ldm/models/diffusion/objective.py) that p_losses calls."""

    reward: Reward
    decode: Callable[[torch.Tensor], torch.Tensor]
    hint: torch.Tensor
    target: torch.Tensor | None  # in [0, 1]

    def __call__(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewarded = (t <= self.reward.max_t).nonzero().flatten()
        if len(rewarded) == 0:  # nothing to reward: the loss is the diffusion loss alone
            return x0.new_zeros(()), {}
        model = self.reward.model.to(x0.device)
        with torch.no_grad():
            labels = model.labels(self.hint[rewarded], None if self.target is None else self.target[rewarded])

        def consistency(latents: torch.Tensor) -> torch.Tensor:
            image = (widened(self.decode(latents)) / 2.0 + 0.5).clamp(0.0, 1.0)
            return model.losses(image, labels)

        latents = x0[rewarded]
        if self.reward.checkpointing and torch.is_grad_enabled():
            losses = checkpoint(consistency, latents, use_reentrant=False)
        else:
            losses = consistency(latents)
        loss = losses.mean()  # over the rewarded samples, as ControlNet++ normalises it
        return self.reward.weight * loss, {"loss_reward": loss.detach()}

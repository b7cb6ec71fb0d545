"""kohya's image augmentations (sd-scripts' `flip_aug` and `color_aug`), per sample and step.

flip_aug: with probability 1/2 the image and its hint are mirrored left to right together (the SDXL crop
coordinate is mirrored with them, as kohya records it). color_aug: the image only, never the hint: with
probability 0.33 either its hue is turned by up to 8 of OpenCV's 180 hue steps or a gamma in [0.95, 1.05] is
applied, each half of the time. kohya's current code raises the 0..255 values themselves to the gamma (which
sends most of an image to white at gamma > 1); the gamma here is on [0, 1], as the albumentations RandomGamma it
replaced.
"""
from dataclasses import dataclass

import cv2
import numpy as np

FLIP_PROBABILITY = 0.5
COLOR_PROBABILITY = 0.33
HUE_SHIFT = 8.0  # OpenCV hue steps (180 make the circle)
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class ImageAugmentation:
    """Which of kohya's image augmentations a sample gets."""

    flip_aug: bool = False
    color_aug: bool = False

    def flips(self, rng: np.random.Generator) -> bool:
        """Whether this step mirrors the sample (drawn only when flip_aug is on)."""
        return self.flip_aug and rng.random() < FLIP_PROBABILITY


def color_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """kohya's weak colour augmentation of a uint8 RGB image (see the module's docstring)."""
    if rng.random() > COLOR_PROBABILITY:
        return image
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-HUE_SHIFT, HUE_SHIFT) % 180.0
        hsv[:, :, 0] = np.floor((hsv[:, :, 0] + shift) % 180.0).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(*GAMMA_RANGE)
    return np.round(255.0 * (image / 255.0) ** gamma).clip(0, 255).astype(np.uint8)

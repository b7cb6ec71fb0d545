"""The detectors by name, as hint makers for building training sets: each turns an RGB image into the hint the
matching ControlNet 1.0 model was trained on, with the detector's options and their defaults.

    hint = HINTS["canny"].make(detector, image, low_threshold=100, high_threshold=200)

Detection runs at `detect_resolution` (short side, as the apps do) and the hint is brought back to the image's
own size, so image and hint stay pixel-aligned for the training readers.
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from annotator.canny import CannyDetector
from annotator.hed import HEDdetector, nms
from annotator.lineart import LineartDetector
from annotator.midas import MidasDetector
from annotator.mlsd import MLSDdetector
from annotator.openpose import OpenposeDetector
from annotator.uniformer import UniformerDetector
from annotator.util import HWC3, resize_image


def fake_scribble(edges: np.ndarray) -> np.ndarray:
    """HED edges -> scribble: thin to 1 px (NMS), blur, and keep everything the blur reached."""
    lines = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    return np.where(lines > 4, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class HintMaker:
    """One detector as a hint maker: its class, how to call it, its options (name -> default), and how the
    hint is resized back (nearest for maps of labels, lines or keypoints)."""

    detector: Callable[..., Any]
    detect: Callable[..., np.ndarray]  # (detector, HWC uint8 RGB at detect resolution, **options) -> map
    options: dict[str, Any] = field(default_factory=dict)
    interpolation: int = cv2.INTER_LINEAR

    def make(self, detector: Any, image: np.ndarray, detect_resolution: int = 512, **options: Any) -> np.ndarray:
        """HxWx3 uint8 hint of the HxWx3 uint8 RGB `image`, at the image's size."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; this detector takes "
                            f"{', '.join(self.options) or 'none'}")
        h, w = image.shape[:2]
        small = resize_image(image, detect_resolution)
        hint = HWC3(self.detect(detector, small, **{**self.options, **options}))
        return cv2.resize(hint, (w, h), interpolation=self.interpolation)


HINTS: dict[str, HintMaker] = {
    "canny": HintMaker(CannyDetector, lambda d, im, low_threshold, high_threshold: d(im, low_threshold,
                                                                                      high_threshold),
                       {"low_threshold": 100, "high_threshold": 200}, cv2.INTER_NEAREST),
    "hed": HintMaker(HEDdetector, lambda d, im: d(im)),
    "scribble": HintMaker(HEDdetector, lambda d, im: fake_scribble(d(im)), interpolation=cv2.INTER_NEAREST),
    "lineart": HintMaker(LineartDetector, lambda d, im: d(im)),
    "mlsd": HintMaker(MLSDdetector, lambda d, im, value_threshold, distance_threshold: d(im, value_threshold,
                                                                                          distance_threshold),
                      {"value_threshold": 0.1, "distance_threshold": 0.1}, cv2.INTER_NEAREST),
    "openpose": HintMaker(OpenposeDetector, lambda d, im, hand: d(im, hand=hand)[0], {"hand": False},
                          cv2.INTER_NEAREST),
    "midas": HintMaker(MidasDetector, lambda d, im: d(im)[0]),
    # the 1.0 normal model was fed (z, y, x) in RGB order, as the normal app feeds it
    "normal": HintMaker(MidasDetector, lambda d, im, bg_threshold: np.ascontiguousarray(d(im, bg_th=bg_threshold)[1]
                                                                                         [:, :, ::-1]),
                        {"bg_threshold": 0.4}),
    "seg": HintMaker(UniformerDetector, lambda d, im: d(im), interpolation=cv2.INTER_NEAREST),
}

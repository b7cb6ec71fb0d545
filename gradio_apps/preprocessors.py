"""The preprocessors the apps offer, by name: how each turns a picture into the map a ControlNet reads, with the
settings it shows. Every control unit of every app chooses one; an app file only names its unit 1 default.

Each follows the original's gradio_*2image.py: detect at the detect resolution (or on the image already at
the image resolution), resize the map to the image size with the detector's interpolation, refine it into the
hint, and show a preview (line maps dark on white, as the original apps show them).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import gradio as gr
import numpy as np

from annotator.canny import CannyDetector
from annotator.hed import HEDdetector
from annotator.hints import fake_scribble
from annotator.midas import MidasDetector
from annotator.mlsd import MLSDdetector
from annotator.openpose import OpenposeDetector
from annotator.uniformer import UniformerDetector
from gradio_apps.messages import INVALID, check_number, user_error


@dataclass(frozen=True)
class Slider:
    """A numeric setting shown in the UI and passed on as the keyword `name`; a request's value is checked
    against the same bounds (check)."""

    name: str
    label: str
    minimum: float
    maximum: float
    value: float
    step: float

    @property
    def whole(self) -> bool:
        """Whole-number steps: the value is an int, which OpenCV and the detectors expect."""
        return float(self.step).is_integer()

    def make(self, **kwargs: Any) -> gr.Slider:
        """The slider; `kwargs` add to or override its settings (e.g. another starting value)."""
        return gr.Slider(**{"label": self.label, "minimum": self.minimum, "maximum": self.maximum, "value": self.value,
                            "step": self.step, "precision": 0 if self.whole else None, **kwargs})

    def check(self, value: Any, where: str = "") -> float | int:
        """`value` within the bounds (an int for whole-number steps); refused by `where` and the label."""
        number = check_number(f"{where}{self.label}", value, self.minimum, self.maximum)
        return round(number) if self.whole else number


@dataclass(frozen=True)
class Checkbox:
    """A yes/no setting shown in the UI and passed on as the keyword `name`."""

    name: str
    label: str
    value: bool = False

    def make(self, **kwargs: Any) -> gr.Checkbox:
        return gr.Checkbox(**{"label": self.label, "value": self.value, **kwargs})

    def check(self, value: Any, where: str = "") -> bool:
        if not isinstance(value, bool):
            raise user_error(f"{where}{self.label} must be true or false, got {value!r}.", INVALID)
        return value


Option = Slider | Checkbox


def identity(x: np.ndarray) -> np.ndarray:
    return x


def invert(x: np.ndarray) -> np.ndarray:
    """Line maps are shown as dark lines on white, as the original apps show them."""
    return 255 - x


def dark_strokes(_: Any, image: np.ndarray) -> np.ndarray:
    """Scribble hint: 255 where the picture is dark (pen on paper), 0 elsewhere."""
    return np.where(image.min(axis=2) < 127, 255, 0).astype(np.uint8)


def thick_inverted(lines: np.ndarray) -> np.ndarray:
    """Shown 3 px wide, dark on white, so 1 px lines stay visible."""
    return 255 - cv2.dilate(lines, np.ones((3, 3), dtype=np.uint8), iterations=1)


def reverse_channels(normal: np.ndarray) -> np.ndarray:
    """The 1.0 normal model was fed (z, y, x) in RGB order; the map is shown as (x, y, z)."""
    return np.ascontiguousarray(normal[:, :, ::-1])


@dataclass(frozen=True)
class Preprocessor:
    """One way from a picture to a control map."""

    name: str
    label: str
    detect: Callable[..., np.ndarray]  # (detector or None, HWC uint8 RGB, **options) -> uint8 map
    detector: Callable[..., Any] | None = None  # detector class, built on first use
    detect_resolution: Slider | None = None  # None: detect on the image already at the image resolution
    options: tuple[Option, ...] = ()
    interpolation: int = cv2.INTER_LINEAR  # how the detected map is resized to the image size
    refine: Callable[[np.ndarray], np.ndarray] = identity  # resized map -> the hint the ControlNet sees
    preview: Callable[[np.ndarray], np.ndarray] = identity  # hint -> the map shown before the samples
    a1111_module: str = "none"  # the A1111 ControlNet extension's name for it, written into the images' parameters
    control_type: str | None = None  # what its map shows, as a ControlNet-Union names it (None: nothing known)

    @property
    def settings(self) -> tuple[Option, ...]:
        """Everything it shows: the detect resolution (when it has one), then its options."""
        return (self.detect_resolution, *self.options) if self.detect_resolution else self.options


def resolution(label: str, value: int) -> Slider:
    return Slider("detect_resolution", label, 128, 1024, value, 1)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "none (the picture is the control map)", lambda _, image: image),
    Preprocessor(
        "canny", "Canny edges", lambda canny, image, low_threshold, high_threshold: canny(
            image, low_threshold, high_threshold),
        CannyDetector, control_type="canny", options=(Slider("low_threshold", "Canny low threshold", 1, 255, 100, 1),
                                Slider("high_threshold", "Canny high threshold", 1, 255, 200, 1)),
        preview=invert, a1111_module="canny"),
    Preprocessor(
        "mlsd", "M-LSD straight lines (Hough)", lambda mlsd, image, value_threshold, distance_threshold: mlsd(
            image, value_threshold, distance_threshold),
        MLSDdetector, resolution("Hough Resolution", 512),
        (Slider("value_threshold", "Hough value threshold (MLSD)", 0.01, 2.0, 0.1, 0.01),
         Slider("distance_threshold", "Hough distance threshold (MLSD)", 0.01, 20.0, 0.1, 0.01)),
        interpolation=cv2.INTER_NEAREST, preview=thick_inverted, a1111_module="mlsd", control_type="mlsd"),
    Preprocessor("hed", "HED soft edges", lambda hed, image: hed(image), HEDdetector,
                 resolution("HED Resolution", 512), a1111_module="softedge_hed", control_type="hed"),
    Preprocessor("scribble", "scribble (dark lines on light paper)", dark_strokes, preview=invert,
                 a1111_module="invert", control_type="scribble"),
    Preprocessor("fake_scribble", "fake scribble (from HED edges)", lambda hed, image: hed(image), HEDdetector,
                 resolution("HED Resolution", 512), refine=fake_scribble, preview=invert,
                 a1111_module="scribble_hed", control_type="scribble"),
    Preprocessor("openpose", "OpenPose human pose", lambda openpose, image: openpose(image)[0], OpenposeDetector,
                 resolution("OpenPose Resolution", 512), interpolation=cv2.INTER_NEAREST,
                 a1111_module="openpose", control_type="openpose"),
    Preprocessor("seg", "UniFormer ADE20K segmentation", lambda uniformer, image: uniformer(image),
                 UniformerDetector, resolution("Segmentation Resolution", 512), interpolation=cv2.INTER_NEAREST,
                 a1111_module="seg_ufade20k", control_type="segment"),
    Preprocessor("depth", "MiDaS depth", lambda midas, image: midas(image)[0], MidasDetector,
                 resolution("Depth Resolution", 384), a1111_module="depth_midas", control_type="depth"),
    Preprocessor("normal", "normal map (from MiDaS)", lambda midas, image, bg_threshold: midas(
        image, bg_th=bg_threshold)[1], MidasDetector, resolution("Normal Resolution", 384),
        (Slider("bg_threshold", "Normal background threshold", 0.0, 1.0, 0.4, 0.01),),
        refine=reverse_channels, preview=reverse_channels, a1111_module="normal_midas", control_type="normal"),
)}

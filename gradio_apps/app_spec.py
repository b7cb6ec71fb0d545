"""What one app declares: a diffusion app's title, default checkpoint and unit 1 preprocessor, or the detector
tabs of the annotator app. The app files hold nothing else."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradio_apps.preprocessors import PREPROCESSORS, Option, Slider


@dataclass(frozen=True)
class ControlApp:
    """What one diffusion app adds to the shared pipeline and page."""

    title: str
    checkpoint: str  # default --ckpt, in models/
    preprocessor: str  # unit 1's default, a name of PREPROCESSORS
    sketch: bool = False  # draw on a canvas instead of uploading a picture

    def __post_init__(self) -> None:
        if self.preprocessor not in PREPROCESSORS:
            raise ValueError(f"unknown preprocessor {self.preprocessor!r}; choose one of {', '.join(PREPROCESSORS)}")


@dataclass(frozen=True)
class AnnotatorTab:
    """One detector tab of the annotator app; its endpoint is /<name>."""

    name: str
    title: str
    detector: Callable[..., Any]
    detect: Callable[..., list[np.ndarray]]  # (detector, HWC uint8 RGB, **options) -> maps to show
    options: tuple[Option, ...] = ()
    resolution: int = 512  # the resolution slider's default

    @property
    def resolution_slider(self) -> Slider:
        return Slider("resolution", "resolution", 256, 1024, self.resolution, 64)

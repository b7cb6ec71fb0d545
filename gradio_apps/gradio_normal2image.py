"""Control Stable Diffusion with normal maps derived from MiDaS depth (models/control_sd15_normal.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import numpy as np  # noqa: E402

from annotator.midas import MidasDetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, main  # noqa: E402


def reverse_channels(normal: np.ndarray) -> np.ndarray:
    """The 1.0 normal model was fed (z, y, x) in RGB order; the map is shown as (x, y, z)."""
    return np.ascontiguousarray(normal[:, :, ::-1])


APP = ControlApp(
    title="Control Stable Diffusion with Normal Maps",
    checkpoint="control_sd15_normal.pth",
    detector=MidasDetector,
    detect=lambda midas, image, bg_threshold: midas(image, bg_th=bg_threshold)[1],
    detect_resolution=Slider("detect_resolution", "Normal Resolution", 128, 1024, 384, 1),
    options=(Slider("bg_threshold", "Normal background threshold", 0.0, 1.0, 0.4, 0.01),),
    refine=reverse_channels,
    preview=reverse_channels,
)

if __name__ == "__main__":
    main(APP)

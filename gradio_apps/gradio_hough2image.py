"""Control Stable Diffusion with straight-line (M-LSD) maps (models/control_sd15_mlsd.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from annotator.mlsd import MLSDdetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, main  # noqa: E402


def thick_inverted(lines: np.ndarray) -> np.ndarray:
    """Shown 3 px wide, dark on white, so 1 px lines stay visible."""
    return 255 - cv2.dilate(lines, np.ones((3, 3), dtype=np.uint8), iterations=1)


APP = ControlApp(
    title="Control Stable Diffusion with Hough Line Maps",
    checkpoint="control_sd15_mlsd.pth",
    detector=MLSDdetector,
    detect=lambda mlsd, image, value_threshold, distance_threshold: mlsd(
        image, value_threshold, distance_threshold
    ),
    detect_resolution=Slider("detect_resolution", "Hough Resolution", 128, 1024, 512, 1),
    options=(
        Slider("value_threshold", "Hough value threshold (MLSD)", 0.01, 2.0, 0.1, 0.01),
        Slider("distance_threshold", "Hough distance threshold (MLSD)", 0.01, 20.0, 0.1, 0.01),
    ),
    interpolation=cv2.INTER_NEAREST,
    preview=thick_inverted,
)

if __name__ == "__main__":
    main(APP)

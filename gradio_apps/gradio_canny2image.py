"""Control Stable Diffusion with Canny edge maps (models/control_sd15_canny.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from annotator.canny import CannyDetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, invert, main  # noqa: E402

APP = ControlApp(
    title="Control Stable Diffusion with Canny Edge Maps",
    checkpoint="control_sd15_canny.pth",
    detector=CannyDetector,
    detect=lambda canny, image, low_threshold, high_threshold: canny(image, low_threshold, high_threshold),
    options=(
        Slider("low_threshold", "Canny low threshold", 1, 255, 100, 1),
        Slider("high_threshold", "Canny high threshold", 1, 255, 200, 1),
    ),
    preview=invert,
)

if __name__ == "__main__":
    main(APP)

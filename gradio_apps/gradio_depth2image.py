"""Control Stable Diffusion with MiDaS depth maps (models/control_sd15_depth.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from annotator.midas import MidasDetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, main  # noqa: E402

APP = ControlApp(
    title="Control Stable Diffusion with Depth Maps",
    checkpoint="control_sd15_depth.pth",
    detector=MidasDetector,
    detect=lambda midas, image: midas(image)[0],
    detect_resolution=Slider("detect_resolution", "Depth Resolution", 128, 1024, 384, 1),
)

if __name__ == "__main__":
    main(APP)

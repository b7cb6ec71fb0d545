"""Control Stable Diffusion with HED soft-edge maps (models/control_sd15_hed.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from annotator.hed import HEDdetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, main  # noqa: E402

APP = ControlApp(
    title="Control Stable Diffusion with HED Maps",
    checkpoint="control_sd15_hed.pth",
    detector=HEDdetector,
    detect=lambda hed, image: hed(image),
    detect_resolution=Slider("detect_resolution", "HED Resolution", 128, 1024, 512, 1),
)

if __name__ == "__main__":
    main(APP)

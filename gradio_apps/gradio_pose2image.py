"""Control Stable Diffusion with human pose (OpenPose) maps (models/control_sd15_openpose.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import cv2  # noqa: E402

from annotator.openpose import OpenposeDetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, main  # noqa: E402

APP = ControlApp(
    title="Control Stable Diffusion with Human Pose",
    checkpoint="control_sd15_openpose.pth",
    detector=OpenposeDetector,
    detect=lambda openpose, image: openpose(image)[0],
    detect_resolution=Slider("detect_resolution", "OpenPose Resolution", 128, 1024, 512, 1),
    interpolation=cv2.INTER_NEAREST,
)

if __name__ == "__main__":
    main(APP)

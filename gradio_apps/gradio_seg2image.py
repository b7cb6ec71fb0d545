"""Control Stable Diffusion with ADE20K segmentation maps (UniFormer) (models/control_sd15_seg.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import cv2  # noqa: E402

from annotator.uniformer import UniformerDetector  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, main  # noqa: E402

APP = ControlApp(
    title="Control Stable Diffusion with Segmentation Maps",
    checkpoint="control_sd15_seg.pth",
    detector=UniformerDetector,
    detect=lambda uniformer, image: uniformer(image),
    detect_resolution=Slider("detect_resolution", "Segmentation Resolution", 128, 1024, 512, 1),
    interpolation=cv2.INTER_NEAREST,
)

if __name__ == "__main__":
    main(APP)

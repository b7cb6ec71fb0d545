"""Control Stable Diffusion with fake scribbles made from HED edges (models/control_sd15_scribble.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from annotator.hed import HEDdetector, nms  # noqa: E402
from gradio_apps.app_builder import ControlApp, Slider, invert, main  # noqa: E402


def scribble_from_edges(edges: np.ndarray) -> np.ndarray:
    """HED edges -> scribble: thin to 1 px (NMS), blur, and keep everything the blur reached."""
    lines = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    return np.where(lines > 4, 255, 0).astype(np.uint8)


APP = ControlApp(
    title="Control Stable Diffusion with Fake Scribble Maps",
    checkpoint="control_sd15_scribble.pth",
    detector=HEDdetector,
    detect=lambda hed, image: hed(image),
    detect_resolution=Slider("detect_resolution", "HED Resolution", 128, 1024, 512, 1),
    refine=scribble_from_edges,
    preview=invert,
)

if __name__ == "__main__":
    main(APP)

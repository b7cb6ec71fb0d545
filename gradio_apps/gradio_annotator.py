"""The detectors alone, one tab each, as the original gradio_annotator.py; no diffusion model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from annotator.canny import CannyDetector  # noqa: E402
from annotator.hed import HEDdetector  # noqa: E402
from annotator.midas import MidasDetector  # noqa: E402
from annotator.mlsd import MLSDdetector  # noqa: E402
from annotator.openpose import OpenposeDetector  # noqa: E402
from annotator.uniformer import UniformerDetector  # noqa: E402
from gradio_apps.app_spec import AnnotatorTab  # noqa: E402
from gradio_apps.preprocessors import Checkbox, Slider  # noqa: E402
from gradio_apps.serving import annotator_main  # noqa: E402

TABS = (
    AnnotatorTab(
        "canny", "Canny Edge", CannyDetector,
        lambda canny, image, low_threshold, high_threshold: [canny(image, low_threshold, high_threshold)],
        (Slider("low_threshold", "low_threshold", 1, 255, 100, 1),
         Slider("high_threshold", "high_threshold", 1, 255, 200, 1)),
    ),
    AnnotatorTab("hed", "HED Edge", HEDdetector, lambda hed, image: [hed(image)]),
    AnnotatorTab(
        "mlsd", "MLSD Edge", MLSDdetector,
        lambda mlsd, image, value_threshold, distance_threshold: [
            mlsd(image, value_threshold, distance_threshold)
        ],
        (Slider("value_threshold", "value_threshold", 0.01, 2.0, 0.1, 0.01),
         Slider("distance_threshold", "distance_threshold", 0.01, 20.0, 0.1, 0.01)),
        resolution=384,
    ),
    AnnotatorTab(
        "midas", "MIDAS Depth and Normal", MidasDetector,
        lambda midas, image, alpha: list(midas(image, alpha)),
        (Slider("alpha", "alpha", 0.1, 20.0, 6.2, 0.01),),
        resolution=384,
    ),
    AnnotatorTab(
        "openpose", "Openpose", OpenposeDetector,
        lambda openpose, image, hand: [openpose(image, hand)[0]],
        (Checkbox("hand", "detect hand"),),
    ),
    AnnotatorTab(
        "uniformer", "Uniformer Segmentation", UniformerDetector, lambda uniformer, image: [uniformer(image)]
    ),
)

if __name__ == "__main__":
    sys.exit(annotator_main(TABS))

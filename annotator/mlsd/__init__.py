"""M-LSD straight-line detector (mlsd_large_512_fp32.pth), as used by the hough2image app."""


import cv2
import numpy as np
import torch

from annotator.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
from annotator.mlsd.utils import pred_lines
from annotator.util import NetworkDetector, check_rgb

WEIGHTS_FILE = "mlsd_large_512_fp32.pth"
WEIGHTS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/mlsd_large_512_fp32.pth"


class MLSDdetector(NetworkDetector):
    """HWC uint8 RGB -> HxW uint8 map with the detected lines drawn 1 px wide in 255."""

    network, weights_file, weights_url = MobileV2_MLSD_Large, WEIGHTS_FILE, WEIGHTS_URL

    @torch.no_grad()
    def __call__(self, image: np.ndarray, thr_v: float, thr_d: float) -> np.ndarray:
        check_rgb(image)
        H, W, _ = image.shape
        # like the 1.0 app, run at the image's own size (apps pass multiples of 64); the network needs 16
        input_shape = (max(16, round(H / 16) * 16), max(16, round(W / 16) * 16))
        out = np.zeros((H, W), dtype=np.uint8)
        for x0, y0, x1, y1 in pred_lines(image, self.model, input_shape, thr_v, thr_d):
            cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
        return out

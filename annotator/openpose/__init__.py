"""OpenPose as in ControlNet 1.0: CMU's OpenPose, by way of Hzzone/pytorch-openpose.

Weights: body_pose_model.pth and hand_pose_model.pth from
https://huggingface.co/lllyasviel/Annotators/resolve/main/ in annotator/ckpts/.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch

from .body import Body
from .hand import Hand
from .util import draw_bodypose, draw_handpose, handDetect


class OpenposeDetector:
    """RGB image -> black canvas with the body skeleton (and optionally hand keypoints), plus the pose."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        body_weights: str | os.PathLike | None = None,
        hand_weights: str | os.PathLike | None = None,
        random_init: bool = False,
    ):
        self.device = torch.device(device)
        self.body_estimation = Body(self.device, body_weights, random_init)
        self.hand_estimation = Hand(self.device, hand_weights, random_init)

    def __call__(
        self,
        oriImg: np.ndarray,
        hand: bool = False,
        body_scales: Sequence[float] = (0.5,),
        hand_scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    ) -> tuple[np.ndarray, dict[str, list]]:
        """HWC uint8 RGB -> (HWC uint8 canvas, dict(candidate=[[x, y, score, id]], subset=[[18 ids, score, n]]))."""
        image = np.ascontiguousarray(oriImg[:, :, ::-1])  # the networks were trained on BGR
        candidate, subset = self.body_estimation(image, body_scales)
        canvas = draw_bodypose(np.zeros_like(image), candidate, subset)
        if hand:
            all_hand_peaks = []
            for x, y, w, _ in handDetect(candidate, subset, image):
                peaks = self.hand_estimation(image[y : y + w, x : x + w], hand_scales)
                # Shift found keypoints into image coordinates; (0, 0) keeps meaning "missing".
                all_hand_peaks.append(np.where(peaks != 0, peaks + [x, y], 0))
            canvas = draw_handpose(canvas, all_hand_peaks)
        return canvas, {"candidate": candidate.tolist(), "subset": subset.tolist()}

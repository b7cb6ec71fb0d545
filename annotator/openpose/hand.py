"""Single-hand keypoints: 21 heatmaps, one peak each inside the strongest blob."""

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from annotator.util import NetworkDetector

from .body import infer_maps
from .model import WEIGHTS_SOURCE, handpose_model, remap_flat_keys
from .util import npmax


def find_hand_peaks(heatmap: np.ndarray, thre: float = 0.05) -> np.ndarray:
    """(21, 2) integer (x, y) per keypoint; (0, 0) where the smoothed map never passes `thre`.

    The peak is the maximum of the raw map inside the 8-connected blob of the smoothed map, above the
    threshold, that holds the most raw heat.
    """
    peaks = np.zeros((21, 2), dtype=int)
    for part in range(21):
        raw = heatmap[:, :, part]
        smooth = ndimage.gaussian_filter(raw, sigma=3)
        labels, count = ndimage.label(smooth > thre, structure=np.ones((3, 3)))
        if count == 0:
            continue
        best = 1 + int(np.argmax(ndimage.sum_labels(raw, labels, index=np.arange(1, count + 1))))
        y, x = npmax(np.where(labels == best, raw, 0))
        peaks[part] = x, y
    return peaks


class Hand(NetworkDetector):
    """The OpenPose hand estimator: `hand_pose_model.pth` from lllyasviel/Annotators."""

    network, weights_file, weights_url = handpose_model, "hand_pose_model.pth", WEIGHTS_SOURCE + "hand_pose_model.pth"
    rename = remap_flat_keys  # the published files name layers without their block prefix

    @torch.no_grad()
    def __call__(self, oriImg: np.ndarray, scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0)) -> np.ndarray:
        """BGR uint8 crop around one hand -> (21, 2) keypoints (x, y) in the crop, (0, 0) if missing."""
        (heatmap,) = infer_maps(self.model, oriImg, scales)
        return find_hand_peaks(heatmap)

"""Canny edges (OpenCV), as in the original canny2image app."""

import cv2
import numpy as np


class CannyDetector:
    """cv2.Canny on an HWC uint8 RGB image; returns an HxW uint8 edge map (0 or 255)."""

    def __init__(self, **_: object) -> None:
        """Takes the network detectors' device / weights / random_init, so apps build every detector alike;
        Canny has no weights and runs in OpenCV on the CPU."""

    def __call__(self, image: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
        return cv2.Canny(image, low_threshold, high_threshold)

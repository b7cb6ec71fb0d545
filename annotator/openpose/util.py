"""Padding, skeleton drawing and hand boxes for the OpenPose detector."""

import colorsys
import math

import cv2
import numpy as np

# COCO-18 limbs as 1-based keypoint pairs: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm,
# 8-10 right leg, 11-13 left leg, 14/15 eyes, 16/17 ears.
LIMB_SEQ = [
    [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
    [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18],
]  # fmt: skip

BODY_COLORS = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]  # fmt: skip

HAND_EDGES = [
    [0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10],
    [10, 11], [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20],
]  # fmt: skip


def padRightDownCorner(img: np.ndarray, stride: int, padValue: int) -> tuple[np.ndarray, list[int]]:
    """Pad bottom and right with `padValue` up to a multiple of `stride`; pad is [up, left, down, right]."""
    h, w = img.shape[:2]
    pad = [0, 0, -h % stride, -w % stride]
    widths = [(0, pad[2]), (0, pad[3])] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, widths, mode="constant", constant_values=padValue), pad


def draw_bodypose(canvas: np.ndarray, candidate: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Draw keypoints as dots and the first 17 limbs as translucent ellipses, one color per index."""
    stickwidth = 4
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1, 4)
    subset = np.asarray(subset, dtype=np.float64).reshape(-1, 20)
    for i in range(18):
        for person in subset:
            index = int(person[i])
            if index == -1:
                continue
            x, y = candidate[index][0:2]
            cv2.circle(canvas, (int(x), int(y)), 4, BODY_COLORS[i], thickness=-1)
    # The ear-shoulder limbs (the last two) are not drawn, as in the original.
    for i in range(17):
        for person in subset:
            index = person[np.array(LIMB_SEQ[i]) - 1].astype(int)
            if -1 in index:
                continue
            x, y = candidate[index, 0], candidate[index, 1]
            length = math.hypot(x[0] - x[1], y[0] - y[1])
            angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
            center = (int(np.mean(x)), int(np.mean(y)))
            polygon = cv2.ellipse2Poly(center, (int(length / 2), stickwidth), int(angle), 0, 360, 1)
            limb = canvas.copy()
            cv2.fillConvexPoly(limb, polygon, BODY_COLORS[i])
            canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    return canvas


def draw_handpose(canvas: np.ndarray, all_hand_peaks: list[np.ndarray]) -> np.ndarray:
    """Draw each hand's bones in rainbow colors and its keypoints as dots; (0, 0) marks a missing point."""
    for peaks in all_hand_peaks:
        found = np.all(peaks != 0, axis=1)
        for ie, (a, b) in enumerate(HAND_EDGES):
            if found[a] and found[b]:
                color = [255 * c for c in colorsys.hsv_to_rgb(ie / len(HAND_EDGES), 1.0, 1.0)]
                p1, p2 = (int(v) for v in peaks[a]), (int(v) for v in peaks[b])
                cv2.line(canvas, tuple(p1), tuple(p2), color, thickness=2)
        # The original also drew missing points at the corner (0, 0); they are skipped here.
        for x, y in peaks[found]:
            cv2.circle(canvas, (int(x), int(y)), 4, (0, 0, 255), thickness=-1)
    return canvas


def handDetect(candidate: np.ndarray, subset: np.ndarray, oriImg: np.ndarray) -> list[list]:
    """Square hand boxes [x, y, width, is_left] from each person's shoulder, elbow and wrist.

    As in OpenPose's handDetector.cpp: the box is centred a third of the forearm beyond the wrist and
    is 1.5 x max(forearm, 0.9 x upper arm) wide, clipped to the image; boxes under 20 pixels are dropped.
    """
    ratio_wrist_elbow = 0.33
    image_height, image_width = oriImg.shape[0:2]
    boxes = []
    for person in np.asarray(subset).astype(int):
        arms = []
        # Left arm is keypoints 5, 6, 7 (shoulder, elbow, wrist); right arm is 2, 3, 4.
        for joints, is_left in (([5, 6, 7], True), ([2, 3, 4], False)):
            if np.all(person[joints] != -1):
                arms.append((candidate[person[joints]][:, :2], is_left))
        for (shoulder, elbow, wrist), is_left in arms:
            x, y = wrist + ratio_wrist_elbow * (wrist - elbow)
            width = 1.5 * max(np.linalg.norm(wrist - elbow), 0.9 * np.linalg.norm(elbow - shoulder))
            x, y = max(x - width / 2, 0), max(y - width / 2, 0)
            width = min(width, image_width - x, image_height - y)
            if width >= 20:
                boxes.append([int(x), int(y), int(width), is_left])
    return boxes


def npmax(array: np.ndarray) -> tuple[int, int]:
    """(row, column) of the maximum of a 2-D array."""
    i, j = np.unravel_index(np.argmax(array), array.shape)
    return int(i), int(j)

"""M-LSD line decoding: from the network's TP map to line segments (the original's `pred_lines`)."""

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def decode_output_score_and_ptss(
    tp_map: torch.Tensor, topk_n: int = 200, ksize: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Line centers of a (1, C, H, W) TP map: (points (N, 2) as (y, x), scores (N,), displacement (H, W, 4)).

    Centers are the `topk_n` strongest local maxima (over a `ksize` window) of sigmoid(channel 0); the
    tensors stay on the map's device.
    """
    if tp_map.shape[0] != 1:
        raise ValueError(f"expected a batch of one TP map, got shape {tuple(tp_map.shape)}")
    w = tp_map.shape[3]
    heat = torch.sigmoid(tp_map[:, 0])
    hmax = F.max_pool2d(heat, ksize, stride=1, padding=(ksize - 1) // 2)
    heat = (heat * (hmax == heat)).flatten()
    scores, indices = torch.topk(heat, min(topk_n, heat.numel()))
    points = torch.stack((indices // w, indices % w), dim=-1)
    displacement = rearrange(tp_map[0, 1:5], "c h w -> h w c")
    return points, scores, displacement


def lines_from_tp_map(tp_map: torch.Tensor, score_thr: float, dist_thr: float) -> np.ndarray:
    """Segments (N, 4) as (x_start, y_start, x_end, y_end) in network-input pixels, strongest first.

    A center is kept when its score exceeds `score_thr` and its segment, measured on the TP map, is
    longer than `dist_thr`.
    """
    points, scores, displacement = decode_output_score_and_ptss(tp_map, 200, 3)
    disp = displacement[points[:, 0], points[:, 1]]
    length = torch.linalg.vector_norm(disp[:, :2] - disp[:, 2:], dim=-1)
    keep = (scores > score_thr) & (length > dist_thr)
    centers = points[keep].flip(-1).to(disp.dtype)
    segments = centers.repeat(1, 2) + disp[keep]
    # the TP map has half the input's resolution
    return 2.0 * segments.cpu().numpy()


def pred_lines(
    image: np.ndarray,
    model: nn.Module,
    input_shape: tuple[int, int] = (512, 512),
    score_thr: float = 0.10,
    dist_thr: float = 20.0,
) -> np.ndarray:
    """Line segments (N, 4) as (x_start, y_start, x_end, y_end) in pixels of the HWC uint8 RGB `image`.

    The image is resized to `input_shape` (height, width; multiples of 16), given a fourth all-ones
    channel, scaled to [-1, 1] and run through `model` on its device; the segments are scaled back.
    """
    h, w = image.shape[:2]
    in_h, in_w = input_shape
    resized = cv2.resize(np.ascontiguousarray(image), (in_w, in_h), interpolation=cv2.INTER_AREA)
    # the network was trained with a constant fourth channel, normalized like the colors
    batch = np.concatenate([resized, np.ones((in_h, in_w, 1))], axis=-1).astype(np.float32) / 127.5 - 1.0
    device = next(model.parameters()).device
    x = rearrange(torch.from_numpy(batch), "h w c -> 1 c h w").to(device)
    lines = lines_from_tp_map(model(x), score_thr, dist_thr)
    return lines * np.array([w / in_w, h / in_h, w / in_w, h / in_h])

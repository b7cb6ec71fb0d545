"""MiDaS depth (DPT-Hybrid) and the normal map derived from it, as ControlNet 1.0's depth and normal apps
use them."""


import cv2
import numpy as np
import torch
from einops import rearrange

from annotator.midas.dpt_depth import DPTDepthModel
from annotator.util import NetworkDetector, check_rgb

WEIGHTS_FILE = "dpt_hybrid-midas-501f0c75.pt"
WEIGHTS_URL = f"https://huggingface.co/lllyasviel/ControlNet/resolve/main/annotator/ckpts/{WEIGHTS_FILE}"
MULTIPLE = 32  # the encoder's deepest map is at stride 32


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """Shift to 0 and scale so the maximum is 1; a flat prediction maps to 0 rather than NaN."""
    depth = depth - depth.min()
    return depth / max(float(depth.max()), 1e-8)


def normal_from_depth(depth: np.ndarray, a: float = np.pi * 2.0, bg_th: float = 0.1) -> np.ndarray:
    """HxW inverse depth -> HxWx3 uint8 normal map (x, y, z as RGB), ControlNet 1.0's recipe.

    x and y are the Sobel gradients of the raw depth, z is the constant `a` (larger = flatter normals);
    where the normalized depth is below `bg_th` (far background) the normal points straight at the viewer.
    """
    depth = depth.astype(np.float32)
    background = normalize_depth(depth) < bg_th
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    x[background] = 0
    y[background] = 0
    normal = np.stack([x, y, np.full_like(x, a)], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


class MidasDetector(NetworkDetector):
    """HWC uint8 RGB -> (HxW uint8 depth, 255 = near; HxWx3 uint8 normal map)."""

    network, weights_file, weights_url = DPTDepthModel, WEIGHTS_FILE, WEIGHTS_URL

    @torch.no_grad()
    def depth(self, image: np.ndarray) -> np.ndarray:
        """HxW float32 relative inverse depth, computed at the image's size rounded to a multiple of 32."""
        check_rgb(image)
        H, W, _ = image.shape
        # like the 1.0 annotator, no resize to 384: apps pass multiples of 64, which go in unchanged
        h, w = (max(MULTIPLE, round(s / MULTIPLE) * MULTIPLE) for s in (H, W))
        if (h, w) != (H, W):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
        x = rearrange(torch.from_numpy(image), "h w c -> 1 c h w").to(self.device, torch.float32)
        depth = self.model(x / 127.5 - 1.0)[0].cpu().numpy()
        if (h, w) != (H, W):
            depth = cv2.resize(depth, (W, H), interpolation=cv2.INTER_LINEAR)
        return depth

    def __call__(
        self, input_image: np.ndarray, a: float = np.pi * 2.0, bg_th: float = 0.1
    ) -> tuple[np.ndarray, np.ndarray]:
        depth = self.depth(input_image)
        depth_image = (normalize_depth(depth) * 255.0).clip(0, 255).astype(np.uint8)
        return depth_image, normal_from_depth(depth, a, bg_th)

"""HED soft edges with ControlNet 1.1's Apache-2.0 network (ControlNetHED.pth), and fake-scribble helpers.

The network takes RGB in 0..255; each of its five VGG stages emits a one-channel side output
("projection"). The edge map is the sigmoid of their mean after upsampling to the input size.
"""

import itertools

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from annotator.util import NetworkDetector, check_rgb

WEIGHTS_FILE = "ControlNetHED.pth"
WEIGHTS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth"


class DoubleConvBlock(nn.Module):
    """A VGG stage: optional 2x max-pool, `layers` 3x3 conv+ReLU, and a 1x1 side-output projection."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        pairs = itertools.pairwise([in_channels] + [out_channels] * layers)
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in pairs)
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED_Apache2(nn.Module):
    """VGG16-style trunk with a learned input offset `norm`; returns the five side outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = DoubleConvBlock(3, 64, 2)
        self.block2 = DoubleConvBlock(64, 128, 2)
        self.block3 = DoubleConvBlock(128, 256, 3)
        self.block4 = DoubleConvBlock(256, 512, 3)
        self.block5 = DoubleConvBlock(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        projections = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, projection = block(h, down_sampling=i > 0)
            projections.append(projection)
        return projections


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Quantize a [0, 1] map to `step` levels (the 1.1 "safe" mode that hides faint texture)."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def nms(x: np.ndarray, t: float, s: float) -> np.ndarray:
    """Thin a soft edge map: blur by sigma `s`, keep pixels that are a maximum along any of the four
    directions (horizontal, vertical, both diagonals), then threshold at `t`; returns 0/255 uint8."""
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), s)
    directions = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    y = np.zeros_like(x)
    for kernel in directions:
        # dilation with a line kernel is the max over that direction; equal means a local maximum
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > t] = 255
    return z


def side_output_mean(network: ControlNetHED_Apache2, x: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW RGB in 0..255 -> BxHxW mean of the five side outputs, each upsampled to HxW (bilinear with half-pixel
    centers, as the original's cv2.resize(INTER_LINEAR)); its sigmoid is the soft edge map. Differentiable in x."""
    H, W = x.shape[-2:]
    sides = [F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False) for p in network(x)]
    return torch.cat(sides, dim=1).mean(dim=1)


class HEDdetector(NetworkDetector):
    """HWC uint8 RGB -> HxW uint8 soft edge map (255 = edge)."""

    network, weights_file, weights_url = ControlNetHED_Apache2, WEIGHTS_FILE, WEIGHTS_URL

    @torch.no_grad()
    def __call__(self, image: np.ndarray, safe: bool = False) -> np.ndarray:
        check_rgb(image)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, torch.float32)
        mean = side_output_mean(self.model, rearrange(x, "h w c -> 1 c h w"))[0].cpu()
        # float64 sigmoid as the original: saturated edges come out 254, not 255
        edge = torch.sigmoid(mean.double()).numpy()
        if safe:
            edge = safe_step(edge)
        return (edge * 255.0).clip(0, 255).astype(np.uint8)

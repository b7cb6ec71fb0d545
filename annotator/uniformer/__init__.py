"""ADE20K semantic segmentation with UperNet + UniFormer-S (upernet_global_small.pth), as in ControlNet 1.0.

Why plain torch: the original builds this network through a vendored copy of mmcv 1.x and mmseg 0.x
(registries, config files, a runner, data pipelines), a large body of torch-1.x-era code kept only to
run one forward pass, and one we would have to maintain against today's torch. The network itself is a
backbone, a UperNet head and a few conv/BatchNorm/ReLU blocks, so it is written here in about two
hundred lines of torch with mmseg's module names: `upernet_global_small.pth` loads with `strict=True`,
and attention runs on F.scaled_dot_product_attention.

Key list: tests/reference/annotators/ann_uniformer.keys.tsv was written by hand-enumerating the modules
that upstream code creates, without running it: exp/upernet_global_small/config.py and its base
configs/_base_/models/upernet_uniformer.py (EncoderDecoder; UniFormer layers [3, 4, 8, 3], dims
[64, 128, 320, 512], head_dim 64, qkv_bias, windows=False, hybrid=False; UPerHead channels 512, pool
scales (1, 2, 3, 6); FCNHead on stage 3, channels 256, num_convs 1, concat_input False; 150 classes;
BN), mmseg/models/backbones/uniformer.py (PatchEmbed norm/proj, CBlock, SABlock, Attention, stage norms),
decode_heads/decode_head.py (conv_seg created first), uper_head.py, psp_head.py (PPM: Sequential of
pool and ConvModule, hence `.1.`), fcn_head.py, and mmcv's ConvModule (children `conv`, bias-free under
a norm, and `bn`; BatchNorm buffers including num_batches_tracked).

Preprocessing is mmseg's test pipeline for that config: keep-ratio bilinear resize to scale
(2048, 512) (short side 512, long side at most 2048; `short_side` scales both), normalization with the
ImageNet mean/std on RGB, whole-image inference, bilinear resize of the logits to the network input
and then to the image, argmax, and the ADE20K palette. One deliberate difference: ControlNet 1.0 handed
its RGB image to a pipeline that expects BGR (Normalize with to_rgb=True), so its network saw swapped
channels; here the network gets RGB, the order it was trained on.
"""

import os

import cv2
import numpy as np
import torch
from einops import rearrange

from annotator.uniformer.palette import ADE20K_PALETTE, NO_CLASS, classes_of, colorize
from annotator.uniformer.upernet import UperNetUniFormer, resize
from annotator.util import NetworkDetector, check_rgb

__all__ = ["ADE20K_PALETTE", "NO_CLASS", "UniformerDetector", "classes_of", "colorize", "logits_to_classes",
           "rescale_size"]

WEIGHTS_FILE = "upernet_global_small.pth"
WEIGHTS_URL = (
    "https://huggingface.co/lllyasviel/ControlNet/resolve/main/annotator/ckpts/upernet_global_small.pth"
)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def rescale_size(height: int, width: int, short_side: int = 512, long_side: int = 2048) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with short side <= short_side, long side <= long_side."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def logits_to_classes(
    logits: torch.Tensor, input_size: tuple[int, int], output_size: tuple[int, int]
) -> np.ndarray:
    """1xKxhxw logits -> HxW class ids, resized as mmseg's whole-image inference does."""
    # two bilinear steps (to the network input, then to the image), as EncoderDecoder does
    logits = resize(resize(logits, input_size), output_size)
    return logits.argmax(dim=1)[0].cpu().numpy()


class UniformerDetector(NetworkDetector):
    """HWC uint8 RGB -> HxWx3 uint8 map of ADE20K classes in their palette colours."""

    network, weights_file, weights_url = UperNetUniFormer, WEIGHTS_FILE, WEIGHTS_URL

    def __init__(
        self,
        device: str | torch.device = "cpu",
        weights: str | os.PathLike | None = None,
        random_init: bool = False,
        short_side: int = 512,
    ) -> None:
        super().__init__(device, weights, random_init)
        self.short_side = short_side
        self.mean = torch.tensor(MEAN, device=self.device)
        self.std = torch.tensor(STD, device=self.device)

    @torch.no_grad()
    def segment(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> HxW int64 ADE20K class ids."""
        check_rgb(image)
        H, W, _ = image.shape
        h, w = rescale_size(H, W, self.short_side, 4 * self.short_side)
        x = torch.from_numpy(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
        x = (x.to(self.device, torch.float32) - self.mean) / self.std
        logits = self.model(rearrange(x, "h w c -> 1 c h w"))
        return logits_to_classes(logits, (h, w), (H, W))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return colorize(self.segment(image))

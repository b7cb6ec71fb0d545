"""UperNet (Xiao et al. 2018) decode head and the FCN auxiliary head, named as mmseg names them.

`ConvModule` is mmcv's conv -> BatchNorm -> ReLU block (bias-free conv, children `conv` and `bn`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from annotator.uniformer.uniformer import UniFormer


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with align_corners=False, as every resize in this model."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """Conv2d (no bias, a BatchNorm follows) -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class PPM(nn.ModuleList):
    """Pyramid pooling: average-pool to each scale, 1x1 ConvModule, upsample back."""

    def __init__(self, pool_scales: tuple[int, ...], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(branch(x), x.shape[-2:]) for branch in self]


class UPerHead(nn.Module):
    """PPM on the deepest map, an FPN top-down path over all four, fused and classified at stride 4."""

    def __init__(
        self,
        in_channels: tuple[int, ...] = (64, 128, 320, 512),
        channels: int = 512,
        num_classes: int = 150,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        # mmseg's BaseDecodeHead creates the classifier first
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0], *(resize(x, size) for x in outs[1:])], dim=1)
        return self.conv_seg(self.fpn_bottleneck(fused))


class FCNHead(nn.Module):
    """Auxiliary training head on stage 3 (one 3x3 ConvModule, no input concat); kept for its weights."""

    def __init__(
        self, in_channels: int = 320, channels: int = 256, num_classes: int = 150, in_index: int = 2
    ) -> None:
        super().__init__()
        self.in_index = in_index
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.convs(features[self.in_index]))


class UperNetUniFormer(nn.Module):
    """mmseg's EncoderDecoder for upernet_global_small: returns class logits at stride 4."""

    def __init__(self, embed_dim: tuple[int, ...] = (64, 128, 320, 512), num_classes: int = 150) -> None:
        super().__init__()
        self.backbone = UniFormer(embed_dim=embed_dim)
        self.decode_head = UPerHead(embed_dim, num_classes=num_classes)
        self.auxiliary_head = FCNHead(embed_dim[2], num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))

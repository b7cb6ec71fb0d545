"""M-LSD large: a truncated MobileNetV2 (4-channel input) with an FPN-like decoder (block15..block23).

Module names follow the published mlsd_large_512_fp32.pth so it loads strictly.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6; stride 2 pads only right and bottom, as the TFLite original."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_c, out_c, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.ReLU6(inplace=True),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, in_c: int, out_c: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_c * expand_ratio
        self.use_residual = stride == 1 and in_c == out_c
        layers: list[nn.Module] = [ConvBNReLU(in_c, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_c, 1, bias=False),
            nn.BatchNorm2d(out_c),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 up to the 96-channel stage; returns the five feature maps the decoder uses."""

    # (expand ratio, channels, repeats, first stride), the standard table cut after the 96-channel stage
    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    fpn_selected = (1, 3, 6, 10, 13)

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(in_channels, 32, stride=2)]
        c_in = 32
        for t, c, n, s in self.settings:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.features = nn.Sequential(*features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.fpn_selected:
                outs.append(x)
        return outs


class BlockTypeA(nn.Module):
    """Fuse a skip feature `a` with the deeper feature `b` (1x1 convs, `b` upsampled 2x), concatenated."""

    def __init__(self, in_c1: int, in_c2: int, out_c1: int, out_c2: int, upscale: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_c2, out_c2, 1), nn.BatchNorm2d(out_c2), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(in_c1, out_c1, 1), nn.BatchNorm2d(out_c1), nn.ReLU(inplace=True))
        self.upscale = upscale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = self.conv1(b)
        a = self.conv2(a)
        if self.upscale:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((a, b), dim=1)


class BlockTypeB(nn.Module):
    """Residual 3x3 conv, then a 3x3 conv to `out_c`."""

    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_c, in_c, 3, padding=1), nn.BatchNorm2d(in_c), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(in_c, out_c, 3, padding=1), nn.BatchNorm2d(out_c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockTypeC(nn.Module):
    """Output head: dilated 3x3 conv (dilation 5), 3x3 conv, 1x1 conv to `out_c` maps."""

    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        dilated = nn.Conv2d(in_c, in_c, 3, padding=5, dilation=5)
        self.conv1 = nn.Sequential(dilated, nn.BatchNorm2d(in_c), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(in_c, in_c, 3, padding=1), nn.BatchNorm2d(in_c), nn.ReLU())
        self.conv3 = nn.Conv2d(in_c, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MobileV2_MLSD_Large(nn.Module):
    """(1, 4, H, W) with H, W multiples of 16 -> (1, 9, H/2, W/2) TP map.

    Channel 0 is the line-center logit, channels 1..4 the displacements (x_start, y_start, x_end, y_end)
    from each center to the segment's ends, in output pixels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV2()
        self.block15 = BlockTypeA(in_c1=64, in_c2=96, out_c1=64, out_c2=64, upscale=False)
        self.block16 = BlockTypeB(128, 64)
        self.block17 = BlockTypeA(in_c1=32, in_c2=64, out_c1=64, out_c2=64)
        self.block18 = BlockTypeB(128, 64)
        self.block19 = BlockTypeA(in_c1=24, in_c2=64, out_c1=64, out_c2=64)
        self.block20 = BlockTypeB(128, 64)
        self.block21 = BlockTypeA(in_c1=16, in_c2=64, out_c1=64, out_c2=64)
        self.block22 = BlockTypeB(128, 64)
        self.block23 = BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block23(self.block22(self.block21(c1, x)))
        # inference reads only the last 9 of the 16 maps, as the original does
        return x[:, 7:]

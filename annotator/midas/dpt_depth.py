"""MiDaS v3 DPT-Hybrid (dpt_hybrid-midas-501f0c75.pt): a timm ViT-B/16 + ResNet-50 encoder, DPT reassembly
and the RefineNet-style fusion decoder ("scratch") that turns four feature maps into inverse depth.

Module names follow the published file, so it loads strictly: `pretrained.model.*` is timm's
`vit_base_resnet50_384` (timm 1.0 builds it with the same names timm 0.6 saved),
`pretrained.act_postprocess3/4` reassemble ViT tokens into maps, `scratch.*` is the decoder.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from timm import create_model
from timm.layers import resample_abs_pos_embed
from torch import nn

PATCH = 16
HOOKS = (8, 11)  # ViT blocks whose tokens feed the two deepest maps; the ResNet stages give the others


class ProjectReadout(nn.Module):
    """Readout "project": concatenate the class token to every patch token and project back to `dim`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat([patches, readout], dim=-1))


def reassemble(dim: int, out_dim: int, downsample: bool) -> nn.Sequential:
    """Readout, then (after the tokens become a grid) a 1x1 conv and optionally a stride-2 3x3 conv.

    MiDaS kept Transpose/Unflatten at indices 1 and 2; Identity holds their places so the weights keep
    their published indices (0 and 3, 4)."""
    layers = [ProjectReadout(dim), nn.Identity(), nn.Identity(), nn.Conv2d(dim, out_dim, 1)]
    if downsample:
        layers.append(nn.Conv2d(out_dim, out_dim, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class ViTHybridEncoder(nn.Module):
    """Four feature maps at strides 4, 8, 16, 32 with 256, 512, 768, 768 channels."""

    def __init__(self) -> None:
        super().__init__()
        # timm's current name for vit_base_resnet50_384; pretrained=False never touches the network
        self.model = create_model("vit_base_r50_s16_384", pretrained=False)
        dim = self.model.embed_dim
        self.act_postprocess3 = reassemble(dim, dim, downsample=False)
        self.act_postprocess4 = reassemble(dim, dim, downsample=True)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ResNet stage 1 and 2 maps and the tokens after ViT blocks 8 and 11 (class token first)."""
        vit = self.model
        resnet = vit.patch_embed.backbone
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        layer_1 = resnet.stages[0](resnet.stem(x))
        layer_2 = resnet.stages[1](layer_1)
        h = vit.patch_embed.proj(resnet.norm(resnet.stages[2](layer_2)))
        patches = rearrange(h, "b c h w -> b (h w) c")
        tokens = torch.cat([vit.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        # MiDaS resizes the 24x24 position grid bilinearly (no antialias) to the input's grid
        pos_embed = resample_abs_pos_embed(
            vit.pos_embed, new_size=grid, num_prefix_tokens=1, interpolation="bilinear", antialias=False
        )
        tokens = tokens + pos_embed
        hooked = []
        for i, block in enumerate(vit.blocks[: HOOKS[-1] + 1]):
            tokens = block(tokens)
            if i in HOOKS:
                hooked.append(tokens)
        return layer_1, layer_2, *hooked

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layer_1, layer_2, tokens_3, tokens_4 = self.forward_features(x)
        grid_h = x.shape[-2] // PATCH
        maps = []
        for tokens, post in ((tokens_3, self.act_postprocess3), (tokens_4, self.act_postprocess4)):
            patches = rearrange(post[0](tokens), "b (h w) c -> b c h w", h=grid_h)
            maps.append(post[3:](patches))
        return layer_1, layer_2, *maps


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))) with 3x3 convs."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Add the refined skip map to the deeper path, refine, upsample x2 (align_corners) and project 1x1."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Interpolate(nn.Module):
    """Bilinear x2 upsampling as a layer of the output head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class FusionDecoder(nn.Module):
    """The "scratch" decoder: 3x3 convs to a common width, fusion deepest first, then the depth head."""

    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 768, 768), features: int = 256) -> None:
        super().__init__()
        for i, channels in enumerate(in_channels, start=1):
            self.add_module(f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        for i in range(1, len(in_channels) + 1):
            self.add_module(f"refinenet{i}", FeatureFusionBlock(features))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            Interpolate(),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),  # MiDaS's non_negative=True: inverse depth is never below zero
        )

    def forward(self, *layers: torch.Tensor) -> torch.Tensor:
        l1, l2, l3, l4 = (getattr(self, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1))
        path = self.refinenet4(l4)
        path = self.refinenet3(path, l3)
        path = self.refinenet2(path, l2)
        path = self.refinenet1(path, l1)
        return self.output_conv(path)


class DPTDepthModel(nn.Module):
    """Bx3xHxW in [-1, 1] (H, W multiples of 32) -> BxHxW relative inverse depth."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = ViTHybridEncoder()
        self.scratch = FusionDecoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch(*self.pretrained(x)).squeeze(1)

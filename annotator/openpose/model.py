"""OpenPose body (COCO-18, PAFs) and hand networks with pytorch-openpose's layer names."""

from collections import OrderedDict

import torch
from torch import nn

WEIGHTS_SOURCE = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"

# A spec row is (name, in, out, kernel) for a convolution or a bare name for a 2x2 max-pool.
VGG_TRUNK = [
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool1_stage1",
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), "pool2_stage1",
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
    "pool3_stage1",
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
]  # fmt: skip
BODY_TRUNK = VGG_TRUNK + [("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]
HAND_TRUNK = VGG_TRUNK + [
    ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3),
    ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3),
]  # fmt: skip


def body_stage1(branch: int, out: int) -> list:
    return [(f"conv5_{i}_CPM_L{branch}", 128, 128, 3) for i in (1, 2, 3)] + [
        (f"conv5_4_CPM_L{branch}", 128, 512, 1),
        (f"conv5_5_CPM_L{branch}", 512, out, 1),
    ]


def refinement_stage(tag: str, cin: int, out: int) -> list:
    """Stages 2-6: five 7x7 convolutions, then two 1x1 ones."""
    rows = [(f"Mconv{i}_{tag}", cin if i == 1 else 128, 128, 7) for i in range(1, 6)]
    return rows + [(f"Mconv6_{tag}", 128, 128, 1), (f"Mconv7_{tag}", 128, out, 1)]


def make_layers(spec: list, relu_last: bool = False) -> nn.Sequential:
    """Convolutions with 'same' padding, each followed by ReLU except (unless relu_last) the last."""
    layers = []
    for n, row in enumerate(spec):
        if isinstance(row, str):
            layers.append((row, nn.MaxPool2d(kernel_size=2, stride=2)))
            continue
        name, cin, cout, k = row
        layers.append((name, nn.Conv2d(cin, cout, k, padding=k // 2)))
        if relu_last or n < len(spec) - 1:
            layers.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class bodypose_model(nn.Module):
    """VGG trunk, then 6 stages of two branches: PAFs (L1, 38 = 19 limbs x 2) and heatmaps (L2, 18 + bg)."""

    def __init__(self):
        super().__init__()
        self.model0 = make_layers(BODY_TRUNK, relu_last=True)
        for branch, out in ((1, 38), (2, 19)):
            self.add_module(f"model1_{branch}", make_layers(body_stage1(branch, out)))
            for s in range(2, 7):
                # The original's no-ReLU list names Mconv7_stage6_L1 twice and misses _L2, so the final
                # heatmaps pass through a ReLU; kept so the published weights give the same maps.
                relu_last = s == 6 and branch == 2
                stage = make_layers(refinement_stage(f"stage{s}_L{branch}", 185, out), relu_last)
                self.add_module(f"model{s}_{branch}", stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) -> PAFs (B, 38, H/8, W/8), heatmaps (B, 19, H/8, W/8)."""
        features = self.model0(x)
        stage_input = features
        for s in range(1, 7):
            paf = getattr(self, f"model{s}_1")(stage_input)
            heat = getattr(self, f"model{s}_2")(stage_input)
            stage_input = torch.cat([paf, heat, features], 1)
        return paf, heat


class handpose_model(nn.Module):
    """Deeper VGG trunk, then 6 single-branch stages of 22 heatmaps (21 keypoints + background)."""

    def __init__(self):
        super().__init__()
        self.model1_0 = make_layers(HAND_TRUNK, relu_last=True)
        self.model1_1 = make_layers([("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, 22, 1)])
        for s in range(2, 7):
            self.add_module(f"model{s}", make_layers(refinement_stage(f"stage{s}", 150, 22)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> heatmaps (B, 22, H/8, W/8)."""
        features = self.model1_0(x)
        heat = self.model1_1(features)
        for s in range(2, 7):
            heat = getattr(self, f"model{s}")(torch.cat([heat, features], 1))
        return heat


def remap_flat_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published files name layers without their block prefix ('conv1_1.weight'); add it back.

    Layer names are unique across blocks, so the mapping is one to one. Keys that match nothing are kept
    as they are, so a strict load still reports them by name.
    """
    full_names = {key.split(".", 1)[1]: key for key in model.state_dict()}
    return {full_names.get(key, key): value for key, value in state.items()}

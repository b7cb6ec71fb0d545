"""MiDaS DPT-Hybrid: the published key list, strict loading from a file, the timm encoder path, depth and
normal maps of a generated picture, and ControlNet 1.0's normal-from-depth. Random weights only."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from annotator.midas import WEIGHTS_FILE, MidasDetector, normal_from_depth
from annotator.midas.dpt_depth import DPTDepthModel
from annotator.util import CKPTS_ENV, MissingWeightsError

REFERENCE = Path(__file__).parent / "reference" / "annotators" / "ann_midas.keys.tsv"


def reference_shapes() -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in REFERENCE.read_text().splitlines())
    return {key: tuple(int(d) for d in shape.split("x")) for key, shape in rows}


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """Random weights under the reference names and shapes, in float16 to halve the file.

    Small values keep the un-normalized decoder finite; a positive last bias keeps the final ReLU open."""
    gen = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(s, generator=gen) * 0.02).half() for key, s in reference_shapes().items()}
    state["scratch.output_conv.4.bias"].fill_(1.0)
    return state


@pytest.fixture(scope="module")
def detector(random_state, tmp_path_factory) -> MidasDetector:
    path = tmp_path_factory.mktemp("ckpts") / WEIGHTS_FILE
    torch.save(random_state, path)
    return MidasDetector(weights=path)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A 256x256 RGB picture: gradient background, a few filled shapes, mild noise."""
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.stack([xx * 0.7, yy * 0.9, np.full_like(xx, 80.0)], axis=-1).astype(np.uint8)
    cv2.rectangle(img, (20, 30), (120, 140), (220, 40, 40), -1)
    cv2.circle(img, (180, 90), 50, (30, 200, 60), -1)
    cv2.fillPoly(img, [np.array([[60, 200], [150, 240], [20, 250]])], (250, 220, 0))
    noise = np.random.default_rng(0).integers(-8, 9, img.shape)
    return (img.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)


def test_state_dict_matches_published_keys():
    # timm 1.0 names vit_base_resnet50_384 exactly as the timm 0.6 file does: no rename is needed
    with torch.device("meta"):
        model = DPTDepthModel()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes()


def test_loads_reference_file_strictly(detector, random_state):
    model = detector.model
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value.float()) for key, value in random_state.items())


def test_encoder_tokens_match_timm(detector):
    # at 384x384 no position resize happens, so block 11 + final norm must equal timm's own forward
    encoder = detector.model.pretrained
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer_1, layer_2, _, tokens = encoder.forward_features(x)
        expected = encoder.model.forward_features(x)
    assert layer_1.shape == (1, 256, 96, 96) and layer_2.shape == (1, 512, 48, 48)
    torch.testing.assert_close(encoder.model.norm(tokens), expected)


def test_feature_pyramid_is_the_resnet_stages_and_the_reassembled_tokens(detector):
    """At 64x96 (not the 384 the position grid was trained at): the two shallow maps are timm's own ResNet
    stages 1 and 2, the two deep ones DPT's reassembly (readout "project", 1x1 conv, stride-2 conv for the last)
    of the tokens after ViT blocks 8 and 11, computed here by hand."""
    encoder = detector.model.pretrained
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps = encoder(x)
        stages = encoder.model.patch_embed.backbone.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        # MiDaS's hooks of DPT-Hybrid: the ResNet's stages, then ViT blocks 8 and 11 (position grid resized
        # bilinearly, without antialiasing, from 24x24 to the input's 4x6)
        vit = encoder.model
        patches = vit.patch_embed.proj(vit.patch_embed.backbone(x)).flatten(2).transpose(1, 2)
        pos = F.interpolate(vit.pos_embed[:, 1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2), size=(4, 6),
                            mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        t = torch.cat([vit.cls_token + vit.pos_embed[:, :1], patches + pos], dim=1)
        tokens = []
        for i, block in enumerate(vit.blocks[:12]):
            t = block(t)
            if i in (8, 11):
                tokens.append(t)
        deep = []
        for t, post in zip(tokens, (encoder.act_postprocess3, encoder.act_postprocess4)):
            linear = post[0].project[0]
            joined = torch.cat([t[:, 1:], t[:, :1].expand(-1, t.shape[1] - 1, -1)], dim=-1)
            grid = F.gelu(F.linear(joined, linear.weight, linear.bias)).transpose(1, 2).reshape(1, -1, 4, 6)
            grid = F.conv2d(grid, post[3].weight, post[3].bias)
            if len(post) > 4:
                grid = F.conv2d(grid, post[4].weight, post[4].bias, stride=2, padding=1)
            deep.append(grid)
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 768, 4, 6), (1, 768, 2, 3)]
    for ours, expected in zip(maps, [*stages, *deep]):
        torch.testing.assert_close(ours, expected)


def hand_depth(model, image: np.ndarray) -> np.ndarray:
    """The 1.0 annotator's recipe: RGB scaled to [-1, 1], channels first, the network's inverse depth."""
    x = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0)
    with torch.no_grad():
        return model(x)[0].numpy()


def hand_maps(depth: np.ndarray, a: float = np.pi * 2.0, bg_th: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Depth and normal images from raw inverse depth, as ControlNet 1.0's MidasDetector makes them."""
    scaled = (depth - depth.min()) / (depth.max() - depth.min())
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    x[scaled < bg_th], y[scaled < bg_th] = 0, 0
    normal = np.stack([x, y, np.ones_like(x) * a], axis=2)
    normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
    return ((scaled * 255.0).clip(0, 255).astype(np.uint8),
            (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8))


def assert_same_map(ours: np.ndarray, expected: np.ndarray) -> None:
    """Equal but for a few values one apart: float32 rounding just under an integer before the uint8 cut."""
    assert ours.shape == expected.shape
    difference = np.abs(ours.astype(int) - expected)
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999


def test_depth_and_normal_maps(detector, scene):
    depth, normal = detector(scene)
    expected_depth, expected_normal = hand_maps(hand_depth(detector.model, scene))
    assert depth.dtype == normal.dtype == np.uint8
    assert_same_map(depth, expected_depth)
    assert_same_map(normal, expected_normal)
    assert depth.min() == 0 and depth.max() == 255
    # z is the largest component everywhere, so blue never drops below the midpoint
    assert normal[..., 2].min() >= 127


def test_odd_sizes_come_back_at_input_size(detector, scene):
    """70x100 runs at 64x96 (multiples of the stride 32, bicubic) and the depth comes back bilinearly."""
    image = cv2.resize(scene, (100, 70))
    depth, normal = detector(image, bg_th=0.4)
    raw = hand_depth(detector.model, cv2.resize(image, (96, 64), interpolation=cv2.INTER_CUBIC))
    expected_depth, expected_normal = hand_maps(cv2.resize(raw, (100, 70), interpolation=cv2.INTER_LINEAR),
                                                bg_th=0.4)
    assert depth.shape == (70, 100)
    assert_same_map(depth, expected_depth)
    assert_same_map(normal, expected_normal)


def test_rejects_non_rgb(detector):
    with pytest.raises(ValueError, match="HxWx3"):
        detector(np.zeros((32, 32), dtype=np.uint8))


def test_normal_of_a_ramp():
    a = np.pi * 2.0
    # slope a/8 per pixel: the 3x3 Sobel sees 8x the slope, so x == z and the normal leans 45 degrees
    depth = np.tile(np.arange(64, dtype=np.float32) * (a / 8.0), (48, 1))
    normal = normal_from_depth(depth, a=a, bg_th=0.1)
    leaning = int(127.5 + 127.5 / np.sqrt(2.0))
    assert (normal[1:-1, 10:-1] == [leaning, 127, leaning]).all()
    # the far 10% of the ramp (first 7 columns) is background: straight at the viewer
    assert (normal[:, :7] == [127, 127, 255]).all()


def test_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError, match=WEIGHTS_FILE):
        MidasDetector()

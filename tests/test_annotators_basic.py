"""Canny, HED and M-LSD detectors: key lists of the published weights, strict loading, output maps,
fake-scribble NMS and M-LSD line decoding. Random weights and generated images only."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from annotator.canny import CannyDetector
from annotator.hed import HEDdetector, nms, safe_step
from annotator.mlsd import MLSDdetector
from annotator.mlsd.utils import lines_from_tp_map, pred_lines
from annotator.util import CKPTS_ENV, MissingWeightsError

REFERENCE = Path(__file__).parent / "reference" / "annotators"


def reference_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) pairs of tests/reference/annotators/ann_<name>.keys.tsv, in file order."""
    rows = []
    for line in (REFERENCE / f"ann_{name}.keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))))
    return rows


def random_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict with the reference keys and shapes; positive values keep BatchNorm variances valid."""
    gen = torch.Generator().manual_seed(0)
    return {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.rand(shape, generator=gen)
        for key, shape in reference_shapes(name)
    }


def model_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A 256x320 RGB test picture: gradient background, filled shapes, straight lines, mild noise."""
    yy, xx = np.mgrid[0:256, 0:320]
    img = np.stack([xx * 0.6, yy * 0.8, np.full_like(xx, 90.0)], axis=-1).astype(np.uint8)
    cv2.rectangle(img, (30, 40), (140, 150), (220, 40, 40), -1)
    cv2.circle(img, (230, 90), 50, (30, 200, 60), -1)
    cv2.line(img, (10, 230), (310, 170), (255, 255, 255), 4)
    cv2.line(img, (180, 10), (300, 250), (0, 0, 0), 3)
    cv2.fillPoly(img, [np.array([[60, 200], [120, 240], [20, 250]])], (250, 220, 0))
    noise = np.random.default_rng(0).integers(-8, 9, img.shape)
    return (img.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hed() -> HEDdetector:
    return HEDdetector(random_init=True)


@pytest.fixture(scope="module")
def mlsd() -> MLSDdetector:
    return MLSDdetector(random_init=True)


def test_canny_equals_opencv(scene: np.ndarray) -> None:
    edges = CannyDetector()(scene, 100, 200)
    assert np.array_equal(edges, cv2.Canny(scene, 100, 200))
    assert edges.shape == (256, 320) and edges.dtype == np.uint8 and edges.max() == 255


# HED


def test_hed_keys_match_published_weights(hed: HEDdetector) -> None:
    assert model_shapes(hed.model) == reference_shapes("hed")
    hed.model.load_state_dict(random_state("hed"), strict=True)


def test_hed_output_map_is_the_originals_recipe(scene: np.ndarray) -> None:
    """The 1.1 annotator's numpy recipe on the network's five side outputs: each resized with cv2 (bilinear),
    averaged, a float64 sigmoid, times 255."""
    torch.manual_seed(0)
    detector = HEDdetector(random_init=True)
    with torch.no_grad():
        sides = detector.model(torch.from_numpy(scene.astype(np.float32).transpose(2, 0, 1)[None].copy()))
    resized = [cv2.resize(side[0, 0].numpy(), (320, 256), interpolation=cv2.INTER_LINEAR) for side in sides]
    expected = 1 / (1 + np.exp(-np.mean(np.stack(resized, axis=2), axis=2).astype(np.float64)))
    edge = detector(scene)
    assert edge.shape == (256, 320) and edge.dtype == np.uint8
    difference = np.abs(edge.astype(int) - (expected * 255.0).clip(0, 255).astype(np.uint8))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999  # torch's and cv2's bilinear round apart
    assert len(np.unique(edge)) > 10  # a map, not a constant


def test_hed_averages_side_outputs_through_sigmoid(scene: np.ndarray) -> None:
    detector = HEDdetector(random_init=True)
    with torch.no_grad():
        for p in detector.model.parameters():
            p.zero_()
        for block, bias in zip(range(1, 6), [1.0, 2.0, 3.0, -1.0, 0.0]):
            getattr(detector.model, f"block{block}").projection.bias.fill_(bias)
    # every side output is its constant bias: the edge is sigmoid(mean) = sigmoid(1.0) everywhere
    assert np.all(detector(scene) == int(255 * (1 / (1 + np.exp(-1.0)))))
    assert np.all(detector(scene, safe=True) == 255)


def test_safe_step_quantizes() -> None:
    x = np.array([0.0, 0.3, 0.34, 0.5, 0.7, 1.0])
    assert safe_step(x).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.5]


def test_nms_thins_a_blurred_line() -> None:
    soft = np.zeros((128, 128), dtype=np.uint8)
    cv2.line(soft, (10, 40), (118, 90), 255, 9)
    soft = cv2.GaussianBlur(soft, (0, 0), 2.0)
    assert (soft[:, 20:108] > 127).sum(axis=0).min() >= 9
    thin = nms(soft, 127, 3.0)
    assert thin.dtype == np.uint8 and set(np.unique(thin)) == {0, 255}
    columns = (thin[:, 20:108] == 255).sum(axis=0)
    assert columns.min() >= 1 and columns.max() <= 2, "one ridge, one or two pixels wide"
    ys, xs = np.nonzero(thin[:, 20:108])
    xs = xs + 20
    # distance of every kept pixel (away from the round caps) to the drawn line's axis
    direction = np.array([108.0, 50.0]) / np.hypot(108.0, 50.0)
    offsets = np.stack([xs - 10.0, ys - 40.0], axis=-1)
    distance = np.abs(offsets[:, 0] * direction[1] - offsets[:, 1] * direction[0])
    assert distance.max() <= 1.0


# M-LSD


class FixedTPMap(nn.Module):
    """Stands in for the network: a TP map at half the input size with given centers and displacements."""

    def __init__(self, centers: list[tuple[int, int, float, tuple[float, float, float, float]]]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.centers = centers
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        tp = torch.zeros(1, 9, x.shape[2] // 2, x.shape[3] // 2)
        tp[:, 0] = -10.0
        for y, x_, logit, disp in self.centers:
            tp[0, 0, y, x_] = logit
            tp[0, 1:5, y, x_] = torch.tensor(disp)
        return tp


def test_mlsd_keys_match_published_weights(mlsd: MLSDdetector) -> None:
    assert model_shapes(mlsd.model) == reference_shapes("mlsd")
    assert mlsd.model.backbone.features[0][0].in_channels == 4
    mlsd.model.load_state_dict(random_state("mlsd"), strict=True)


def test_mlsd_output_map_is_the_networks_segments_drawn(scene: np.ndarray) -> None:
    """The real network at the image's size: RGB plus a fourth channel of ones, all scaled to [-1, 1]; the
    segments its map holds, drawn one pixel wide."""
    torch.manual_seed(0)
    detector = MLSDdetector(random_init=True)
    rgba = np.concatenate([scene, np.ones((256, 320, 1))], axis=-1).astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():
        segments = lines_from_tp_map(detector.model(torch.from_numpy(rgba.transpose(2, 0, 1)[None].copy())),
                                     0.1, 0.0)  # random weights: short segments
    assert len(segments) > 0
    expected = np.zeros((256, 320), dtype=np.uint8)
    for x0, y0, x1, y1 in segments:
        cv2.line(expected, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    np.testing.assert_array_equal(detector(scene, 0.1, 0.0), expected)


def test_mlsd_decodes_a_known_segment() -> None:
    tp_map = FixedTPMap(
        [
            (30, 40, 10.0, (-15.0, -5.0, 15.0, 5.0)),  # the segment (25, 25)-(55, 35) on the map
            (30, 41, 5.0, (-30.0, 0.0, 30.0, 0.0)),  # weaker neighbour: removed by the max-pool NMS
            (10, 10, 8.0, (-5.0, 0.0, 5.0, 0.0)),  # strong but 10 px long: under dist_thr
            (50, 70, -3.0, (-20.0, 0.0, 20.0, 0.0)),  # long but scored 0.047: under score_thr
        ]
    )(torch.zeros(1, 4, 128, 160))
    lines = lines_from_tp_map(tp_map, score_thr=0.1, dist_thr=20.0)
    # map pixels are two input pixels
    np.testing.assert_allclose(lines, [[50.0, 50.0, 110.0, 70.0]])
    assert lines_from_tp_map(tp_map, score_thr=0.1, dist_thr=40.0).shape == (0, 4)


def test_mlsd_pred_lines_resizes_and_scales_back(scene: np.ndarray) -> None:
    model = FixedTPMap([(100, 100, 10.0, (-50.0, 0.0, 50.0, 0.0))])
    lines = pred_lines(scene, model, (512, 512), 0.1, 20.0)
    x = model.inputs[0]
    assert x.shape == (1, 4, 512, 512) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, 3], torch.tensor(1 / 127.5 - 1))
    # (100, 200)-(300, 200) at 512x512, scaled to 320 wide and 256 high
    np.testing.assert_allclose(lines, [[62.5, 100.0, 187.5, 100.0]])


def test_mlsd_detector_draws_decoded_lines(scene: np.ndarray) -> None:
    detector = MLSDdetector(random_init=True)
    detector.model = FixedTPMap([(64, 80, 10.0, (-40.0, -20.0, 40.0, 20.0))])
    drawn = detector(scene, 0.1, 20.0)
    assert detector.model.inputs[0].shape == (1, 4, 256, 320)
    expected = np.zeros((256, 320), dtype=np.uint8)
    cv2.line(expected, (80, 88), (240, 168), 255, 1)
    assert np.array_equal(drawn, expected)


# weight files


@pytest.mark.parametrize(
    ("detector", "filename"), [(HEDdetector, "ControlNetHED.pth"), (MLSDdetector, "mlsd_large_512_fp32.pth")]
)
def test_missing_weights_name_the_file(detector, filename: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        detector()
    assert filename in str(err.value) and str(tmp_path) in str(err.value)
    assert f"https://huggingface.co/lllyasviel/Annotators/resolve/main/{filename}" in str(err.value)


def test_mlsd_loads_weights_from_ckpts_dir(tmp_path: Path, monkeypatch) -> None:
    state = random_state("mlsd")
    torch.save(state, tmp_path / "mlsd_large_512_fp32.pth")
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    detector = MLSDdetector()
    assert not detector.model.training
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())

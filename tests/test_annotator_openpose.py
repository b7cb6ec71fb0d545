"""OpenPose detector: reference key layout, strict loading, the full pipeline, decoding and drawing."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotator.openpose import OpenposeDetector
from annotator.openpose.body import MAP_IDX, Body, decode_body
from annotator.openpose.hand import Hand, find_hand_peaks
from annotator.openpose.model import bodypose_model, handpose_model, remap_flat_keys
from annotator.openpose.util import BODY_COLORS, LIMB_SEQ, draw_bodypose, handDetect, padRightDownCorner
from annotator.util import CKPTS_ENV, MissingWeightsError

REFERENCE = Path(__file__).parent / "reference" / "annotators"
MODELS = [(bodypose_model, "ann_body.keys.tsv"), (handpose_model, "ann_hand.keys.tsv")]


def reference_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in (REFERENCE / name).read_text().splitlines() if line.strip()]
    return [(key, tuple(int(d) for d in shape.split("x"))) for key, shape in rows]


@pytest.fixture(scope="module")
def detector() -> OpenposeDetector:
    torch.manual_seed(0)
    return OpenposeDetector("cpu", random_init=True)


def person_image(size: int = 128) -> np.ndarray:
    """A stick figure with a filled head on a two-tone background, RGB uint8."""
    image = np.full((size, size, 3), (180, 200, 220), np.uint8)
    image[size * 3 // 4 :] = (90, 120, 60)
    s = size / 128
    neck, hip = (int(64 * s), int(40 * s)), (int(64 * s), int(80 * s))
    ends = [(neck, hip), (neck, (int(40 * s), int(70 * s))), (neck, (int(88 * s), int(70 * s)))]
    ends += [(hip, (int(48 * s), int(120 * s))), (hip, (int(80 * s), int(120 * s)))]
    cv2.circle(image, (int(64 * s), int(26 * s)), int(10 * s), (230, 180, 150), -1)
    for a, b in ends:
        cv2.line(image, a, b, (40, 40, 160), max(2, int(6 * s)))
    return image


@pytest.mark.parametrize("model_cls, tsv", MODELS)
def test_model_keys_and_shapes_equal_reference(model_cls, tsv):
    with torch.device("meta"):
        model = model_cls()
    shapes = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert shapes == reference_shapes(tsv)


@pytest.mark.parametrize("model_cls, tsv", MODELS)
@pytest.mark.parametrize("flat", [True, False])
def test_reference_state_dict_loads_strictly(model_cls, tsv, flat):
    # The published .pth files name layers without the block prefix; both layouts must load.
    state = {
        key.split(".", 1)[1] if flat else key: torch.randn(shape) for key, shape in reference_shapes(tsv)
    }
    with torch.device("meta"):
        model = model_cls()
    model.load_state_dict(remap_flat_keys(model, state), strict=True, assign=True)
    first_key = reference_shapes(tsv)[0][0]
    loaded = model.state_dict()[first_key]
    assert torch.equal(loaded, state[first_key.split(".", 1)[1] if flat else first_key])


def test_unknown_keys_are_refused_by_name():
    state = {"conv1_1.weight": torch.zeros(64, 3, 3, 3), "not_a_layer.weight": torch.zeros(1)}
    with torch.device("meta"):
        model = handpose_model()
    with pytest.raises(RuntimeError, match="not_a_layer.weight"):
        model.load_state_dict(remap_flat_keys(model, state), strict=True, assign=True)


def test_weights_file_in_ckpts_folder_is_loaded(tmp_path, monkeypatch):
    state = {key.split(".", 1)[1]: torch.randn(shape) for key, shape in reference_shapes("ann_hand.keys.tsv")}
    torch.save(state, tmp_path / "hand_pose_model.pth")
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    hand = Hand("cpu")
    assert not hand.model.training
    assert torch.equal(hand.model.model6.Mconv7_stage6.bias, state["Mconv7_stage6.bias"])


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError, match="body_pose_model.pth"):
        OpenposeDetector("cpu")
    with pytest.raises(MissingWeightsError, match="hand_pose_model.pth"):
        Hand("cpu")
    with pytest.raises(MissingWeightsError, match="huggingface.co/lllyasviel/Annotators"):
        Body("cpu")


def original_maps(net: torch.nn.Module, bgr: np.ndarray, scale: float) -> list[np.ndarray]:
    """The network's maps at one scale as the original body.py/hand.py compute them: the image resized (bicubic)
    to `scale` * 368 / its height, padded right and down to a multiple of 8 with grey 128, scaled to
    [-0.5, 0.5), the outputs upsampled x8 (bicubic), the padding cut, resized back to the image."""
    h, w = bgr.shape[:2]
    image = cv2.resize(bgr, (0, 0), fx=scale * 368 / h, fy=scale * 368 / h, interpolation=cv2.INTER_CUBIC)
    ih, iw = image.shape[:2]
    padded = np.full((ih + (-ih) % 8, iw + (-iw) % 8, 3), 128, np.uint8)
    padded[:ih, :iw] = image
    with torch.no_grad():
        outputs = net(torch.from_numpy(padded.transpose(2, 0, 1)[None].astype(np.float32)) / 256 - 0.5)
    maps = []
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        up = cv2.resize(out[0].numpy().transpose(1, 2, 0), (0, 0), fx=8, fy=8, interpolation=cv2.INTER_CUBIC)
        maps.append(cv2.resize(up[:ih, :iw], (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float64))
    return maps


def test_detector_runs_the_body_network_on_bgr_and_draws_what_it_decodes(detector):
    image = person_image()
    canvas, pose = detector(image, hand=True, body_scales=(0.25,), hand_scales=(0.25,))
    paf, heatmap = original_maps(detector.body_estimation.model, image[:, :, ::-1].copy(), 0.25)
    candidate, subset = decode_body(heatmap, paf)
    assert pose == {"candidate": candidate.tolist(), "subset": subset.tolist()}
    assert len(candidate) > 0  # random weights find peaks (but no person)
    np.testing.assert_array_equal(canvas, draw_bodypose(np.zeros_like(image), candidate, subset))
    assert next(detector.body_estimation.model.parameters()).device == torch.device("cpu")


def test_hand_branch_draws_detected_hands(detector, monkeypatch):
    # Random body weights find nobody, so give the detector a person whose left arm frames a hand box.
    candidate = np.array(
        [[64, 30, 1, 0], [64, 50, 1, 1], [80, 52, 1, 2], [80, 75, 1, 3], [80, 95, 1, 4]], float
    )
    subset = -np.ones((1, 20))
    subset[0, [1, 5, 6, 7]] = [1, 2, 3, 4]
    subset[0, -2:] = [8, 4]
    monkeypatch.setattr(detector, "body_estimation", lambda image, scales: (candidate, subset))
    hand_peaks = np.zeros((21, 2), int)
    hand_peaks[[0, 1]] = [[5, 6], [20, 25]]
    calls = []
    monkeypatch.setattr(
        detector, "hand_estimation", lambda crop, scales: calls.append(crop.shape) or hand_peaks
    )

    canvas, pose = detector(person_image(), hand=True)
    (box,) = handDetect(candidate, subset, np.zeros((128, 128, 3)))
    x, y, w, _ = box
    assert calls == [(w, w, 3)]
    # The wrist-to-first-joint bone is drawn between the keypoints shifted into image coordinates.
    assert canvas[y + 6, x + 5].any() and canvas[y + 25, x + 20].any()
    assert pose["subset"] == subset.tolist()


def test_hand_estimator_returns_keypoints_in_the_crop(detector):
    crop = person_image(64)[:, :, ::-1].copy()
    peaks = detector.hand_estimation(crop, scales=(0.25,))
    (heatmap,) = original_maps(detector.hand_estimation.model, crop, 0.25)
    assert np.issubdtype(peaks.dtype, np.integer)
    np.testing.assert_array_equal(peaks, find_hand_peaks(heatmap))
    assert (peaks >= 0).all() and (peaks < 64).all() and peaks.any()


def gaussian_blob(shape: tuple[int, int], x: int, y: int, sigma: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def paint_limb(paf: np.ndarray, limb: int, start: tuple[int, int], end: tuple[int, int], width: float = 2.0):
    """Unit vectors from `start` to `end` on the pixels within `width` of the segment, in the limb's PAF."""
    a, b = np.array(start, float), np.array(end, float)
    direction = (b - a) / np.linalg.norm(b - a)
    yy, xx = np.mgrid[: paf.shape[0], : paf.shape[1]]
    rel = np.stack([xx - a[0], yy - a[1]], axis=-1)
    along = rel @ direction
    across = np.abs(rel @ np.array([-direction[1], direction[0]]))
    mask = (along >= 0) & (along <= np.linalg.norm(b - a)) & (across <= width)
    cx, cy = (c - 19 for c in MAP_IDX[limb])
    paf[mask, cx], paf[mask, cy] = direction


def synthetic_pose(
    people: list[dict[int, tuple[int, int]]], stray: dict[int, tuple[int, int]], shape=(128, 160)
):
    """Heatmaps with a blob per keypoint and PAFs along every limb whose two ends a person has."""
    heatmap = np.zeros((*shape, 19))
    paf = np.zeros((*shape, 38))
    for keypoints in [*people, stray]:
        for part, (x, y) in keypoints.items():
            heatmap[:, :, part] += gaussian_blob(shape, x, y)
    for keypoints in people:
        for limb, (a, b) in enumerate(LIMB_SEQ):
            if a - 1 in keypoints and b - 1 in keypoints:
                paint_limb(paf, limb, keypoints[a - 1], keypoints[b - 1])
    return heatmap, paf


def test_decoding_recovers_two_people_from_synthetic_maps():
    # Nose, neck, shoulders and elbows (COCO ids 0, 1, 2, 3, 5, 6), two people side by side.
    person = {0: (40, 30), 1: (40, 50), 2: (25, 52), 3: (20, 75), 5: (55, 52), 6: (60, 75)}
    people = [person, {part: (x + 80, y + 10) for part, (x, y) in person.items()}]
    stray = {9: (140, 115)}  # a right knee with no limb to anyone
    heatmap, paf = synthetic_pose(people, stray)

    candidate, subset = decode_body(heatmap, paf)

    assert candidate.shape == (13, 4)
    assert candidate[:, 3].tolist() == list(range(13))
    assert len(subset) == 2
    found = []
    for row in subset:
        assert row[-1] == 6
        assert row[-2] / row[-1] > 0.4
        parts = {
            part: tuple(candidate[int(row[part]), :2].astype(int)) for part in range(18) if row[part] >= 0
        }
        found.append(parts)
    found.sort(key=lambda parts: parts[1][0])
    assert found == people
    knee_id = next(i for i, (x, y, _, _) in enumerate(candidate) if (x, y) == stray[9])
    assert knee_id not in subset[:, :18]


def test_decoding_drops_peaks_without_limbs():
    heatmap, paf = synthetic_pose([], {0: (30, 30), 1: (30, 60), 2: (10, 60)})
    candidate, subset = decode_body(heatmap, paf)
    assert candidate.shape == (3, 4) and subset.shape == (0, 20)


def test_find_hand_peaks_takes_the_strongest_blob():
    heatmap = np.zeros((64, 64, 22))
    heatmap[:, :, 0] = gaussian_blob((64, 64), 10, 12) + 0.5 * gaussian_blob((64, 64), 50, 40)
    heatmap[:, :, 4] = gaussian_blob((64, 64), 33, 21)
    peaks = find_hand_peaks(heatmap)
    assert peaks[0].tolist() == [10, 12] and peaks[4].tolist() == [33, 21]
    assert (np.delete(peaks, [0, 4], axis=0) == 0).all()


def test_draw_bodypose_draws_at_the_keypoints():
    candidate = np.array([[40, 20, 1, 0], [40, 40, 1, 1], [20, 42, 1, 2], [100, 100, 1, 3]], float)
    subset = -np.ones((1, 20))
    subset[0, [0, 1, 2, 10]] = [0, 1, 2, 3]  # nose, neck, right shoulder, right ankle (no limb to it)
    canvas = draw_bodypose(np.zeros((128, 128, 3), np.uint8), candidate, subset)
    assert canvas.dtype == np.uint8 and canvas.shape == (128, 128, 3)
    assert canvas[100, 100].tolist() == BODY_COLORS[10]
    for x, y in [(40, 20), (40, 40), (20, 42), (40, 30), (30, 41)]:  # keypoints and limb midpoints
        assert canvas[y, x].any()
    assert not canvas[80, 10].any() and not canvas[5, 120].any()


def test_hand_boxes_follow_the_forearm():
    candidate = np.array([[50, 20, 1, 0], [50, 50, 1, 1], [50, 80, 1, 2]], float)
    subset = -np.ones((1, 20))
    subset[0, [5, 6, 7]] = [0, 1, 2]
    # Centre 1/3 of the forearm past the wrist, width 1.5 x max(forearm 30, 0.9 x upper arm 30).
    assert handDetect(candidate, subset, np.zeros((128, 128, 3))) == [[27, 67, 45, True]]
    # Clipped at the bottom of a smaller image; too small a box is dropped.
    assert handDetect(candidate, subset, np.zeros((100, 128, 3))) == [[27, 67, 32, True]]
    assert handDetect(candidate, subset, np.zeros((80, 128, 3))) == []


def test_pad_right_down_corner():
    image = np.zeros((13, 17, 3), np.uint8)
    padded, pad = padRightDownCorner(image, 8, 128)
    assert padded.shape == (16, 24, 3) and pad == [0, 0, 3, 7]
    assert (padded[13:] == 128).all() and (padded[:, 17:] == 128).all() and (padded[:13, :17] == 0).all()

"""UperNet + UniFormer-S segmenter: checkpoint layout, strict loading, preprocessing and palette output."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotator.uniformer import (
    ADE20K_PALETTE,
    MEAN,
    STD,
    WEIGHTS_FILE,
    UniformerDetector,
    colorize,
    logits_to_classes,
    rescale_size,
)
from annotator.util import CKPTS_ENV, MissingWeightsError

KEYS_TSV = Path(__file__).parent / "reference" / "annotators" / "ann_uniformer.keys.tsv"


def reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return rows


def random_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in reference_keys():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def scene_image(height: int = 128, width: int = 160) -> np.ndarray:
    """A scene-like picture: sky gradient, ground, a house and a sun."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = (np.array([90, 150, 235]) * (1 - y) + np.array([200, 220, 250]) * y).astype(np.float32)
    img = np.broadcast_to(img, (height, width, 3)).copy()
    img[height * 2 // 3 :] = (70, 130, 40)
    cv2.rectangle(img, (width // 4, height // 3), (width // 2, height * 3 // 4), (150, 60, 50), -1)
    cv2.circle(img, (width * 4 // 5, height // 5), height // 10, (255, 230, 80), -1)
    noise = np.random.default_rng(0).normal(0, 6, img.shape)
    return (img + noise).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector() -> UniformerDetector:
    return UniformerDetector(random_init=True, short_side=64)


def test_state_dict_matches_reference_keys(detector: UniformerDetector) -> None:
    ours = [(k, tuple(v.shape)) for k, v in detector.model.state_dict().items()]
    assert ours == reference_keys()


def test_checkpoint_file_loads_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = random_state_dict()
    # the published file is an mmcv checkpoint: the weights sit under "state_dict" beside "meta"
    meta = {"CLASSES": tuple(f"class{i}" for i in range(150)), "PALETTE": ADE20K_PALETTE.tolist()}
    torch.save({"meta": meta, "state_dict": state}, tmp_path / WEIGHTS_FILE)
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    loaded = UniformerDetector(short_side=64).model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_weights_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError, match=WEIGHTS_FILE):
        UniformerDetector()


def test_detector_colours_the_classes_of_mmsegs_whole_image_inference(detector: UniformerDetector) -> None:
    """mmseg's test pipeline by hand: keep-ratio resize to a 64 short side (bilinear), RGB normalised by
    ImageNet's mean and std, the decode head's logits resized bilinearly to the network input and then to the
    image, argmax, ADE20K's palette."""
    image = scene_image()  # 128x160 -> 64x80
    resized = cv2.resize(image, (80, 64), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = torch.from_numpy(((resized - np.array(MEAN)) / np.array(STD)).astype(np.float32).transpose(2, 0, 1)[None])
    with torch.no_grad():
        logits = detector.model.decode_head(detector.model.backbone(x))
    logits = torch.nn.functional.interpolate(logits, size=(64, 80), mode="bilinear", align_corners=False)
    logits = torch.nn.functional.interpolate(logits, size=(128, 160), mode="bilinear", align_corners=False)
    expected = ADE20K_PALETTE[logits.argmax(dim=1)[0].numpy()]
    out = detector(image)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 1


def test_detector_follows_its_device(detector: UniformerDetector) -> None:
    assert {p.device for p in detector.model.parameters()} == {torch.device("cpu")}
    assert not detector.model.training


def test_stage_outputs_and_auxiliary_head(detector: UniformerDetector) -> None:
    """The backbone's four maps at strides 4 to 32, each layer-normalised over its channels; the auxiliary head
    (mmseg's FCNHead: one 3x3 conv, BatchNorm, ReLU, a 1x1 classifier) on the third, computed by hand."""
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    model = detector.model
    with torch.no_grad():
        features = model.backbone(x)
        aux = model.auxiliary_head(features)
        conv, bn = model.auxiliary_head.convs[0].conv, model.auxiliary_head.convs[0].bn
        hidden = torch.nn.functional.conv2d(features[2], conv.weight, padding=1)
        hidden = torch.nn.functional.batch_norm(hidden, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                eps=bn.eps).relu()
        expected = torch.nn.functional.conv2d(hidden, model.auxiliary_head.conv_seg.weight,
                                              model.auxiliary_head.conv_seg.bias)
    assert [tuple(f.shape[1:]) for f in features] == [(64, 16, 24), (128, 8, 12), (320, 4, 6), (512, 2, 3)]
    for i, f in enumerate(features, start=1):
        norm = getattr(model.backbone, f"norm{i}")
        standard = (f - norm.bias[:, None, None]) / norm.weight[:, None, None]
        torch.testing.assert_close(standard.mean(dim=1), torch.zeros_like(standard[:, 0]), rtol=0, atol=1e-4)
        torch.testing.assert_close(standard.var(dim=1, unbiased=False), torch.ones_like(standard[:, 0]),
                                   rtol=0, atol=2e-2)
    torch.testing.assert_close(aux, expected)


def test_rescale_size_is_mmseg_keep_ratio() -> None:
    assert rescale_size(128, 160) == (512, 640)  # small images are enlarged to a 512 short side
    assert rescale_size(480, 640) == (512, 683)
    assert rescale_size(300, 3000) == (205, 2048)  # the 2048 long side caps very wide images


def test_palette_is_ade20k() -> None:
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120] and ADE20K_PALETTE[149].tolist() == [92, 0, 255]
    # mmseg's palette gives road (6) and skyscraper (48) the same grey; every other class is distinct
    colours = {tuple(c) for c in ADE20K_PALETTE.tolist()}
    assert len(colours) == 149
    assert ADE20K_PALETTE[6].tolist() == ADE20K_PALETTE[48].tolist() == [140, 140, 140]


def test_hand_built_logits_are_coloured_by_class() -> None:
    classes = np.array([[0, 2, 2], [12, 149, 21]])
    logits = torch.nn.functional.one_hot(torch.from_numpy(classes), 150).permute(2, 0, 1)[None].float() * 10
    # an exact 2x bilinear upsample gives each pixel's nearest source the largest weight
    out = colorize(logits_to_classes(logits, (4, 6), (4, 6)))
    expected = ADE20K_PALETTE[classes.repeat(2, axis=0).repeat(2, axis=1)]
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, expected)

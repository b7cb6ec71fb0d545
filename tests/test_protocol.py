"""ControlNet++'s evaluation protocol (cldm/protocol.py, tool_eval_control.py --protocol): each metric against an
independent computation (OpenCV's Canny, MS-SSIM written out from Wang et al.'s definition, RMSE and mIoU counted
by hand on small arrays, the annotator's own HED recipe), the intervals, and the command end to end on a tiny
model with generated data."""

import json

import cv2
import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

import cldm.protocol
from annotator.uniformer import NO_CLASS as IGNORE
from cldm import fidelity
from cldm.data.circles import make_fill50k
from cldm.model import save_state_dict
from cldm.protocol import (
    HED,
    Canny,
    Depth,
    Lineart,
    ProtocolRun,
    Sampling,
    Segmentation,
    intersect_and_union,
    mean_iou,
    ms_ssim,
    paired_difference,
    run,
    summarize,
)
from conftest import ROOT, model_as_trained, randomize_zero_convs
from ldm.checkpoint import UserError

TINY = str(ROOT / "models" / "cldm_tiny.yaml")


def shapes(size: int = 96) -> np.ndarray:
    """A picture of a few filled shapes, away from the border."""
    image = np.full((size, size, 3), 40, np.uint8)
    cv2.circle(image, (40, 44), 22, (200, 90, 30), -1, cv2.LINE_AA)
    cv2.rectangle(image, (60, 15), (85, 80), (30, 160, 220), -1)
    cv2.ellipse(image, (30, 78), (18, 8), 20, 0, 360, (250, 250, 250), -1, cv2.LINE_AA)
    return image


def opencv_canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's Canny (L2 gradient, hysteresis) on the image as kornia prepares it: luma in [0, 1], Gaussian 5x5
    sigma 1, 3x3 Sobel; the gradients handed over as int16 at 1000x, so the thresholds are too."""
    gray = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    blurred = cv2.GaussianBlur(gray, (5, 5), 1.0)
    dx, dy = (np.round(cv2.Sobel(blurred, cv2.CV_64F, *d, ksize=3) * 1000).astype(np.int16) for d in ((1, 0), (0, 1)))
    return cv2.Canny(dx, dy, low * 1000, high * 1000, L2gradient=True) > 0


def test_canny_finds_the_edges_opencv_finds_at_the_papers_thresholds():
    image = np.full((128, 128, 3), 40, np.uint8)
    cv2.circle(image, (40, 44), 22, (200, 90, 30), -1, cv2.LINE_AA)
    cv2.rectangle(image, (60, 15), (85, 60), (30, 160, 220), -1)
    for i, contrast in enumerate((6, 9, 12, 15, 18, 24)):  # faint bars: their edges straddle the thresholds
        cv2.rectangle(image, (12 + 18 * i, 80), (22 + 18 * i, 110), (40 + contrast,) * 3, -1)
    ours = Canny().edges(image[None])[0]
    theirs = opencv_canny(image, 0.1, 0.2)
    assert 300 < theirs.sum() < 400 and abs(int(ours.sum()) - int(theirs.sum())) <= 0.03 * theirs.sum()
    for a, b in ((ours, theirs), (theirs, ours)):  # every edge pixel within a pixel of the other's (NMS breaks ties)
        distance = cv2.distanceTransform((~b).astype(np.uint8), cv2.DIST_L2, 3)
        assert (distance[a] <= 1).all()


def test_canny_f1_pools_a_prompts_images_and_is_a_percentage(monkeypatch):
    task = Canny()
    label = np.zeros((4, 4), np.uint8)
    label[1, :] = 255  # 4 edge pixels
    found = np.zeros((2, 4, 4), bool)
    found[0, 1, :2] = True  # image 0: 2 right
    found[1, 1, :] = True   # image 1: 4 right ...
    found[1, 3, :] = True   # ... and 4 wrong
    monkeypatch.setattr(task, "edges", lambda images: found)
    tp, fp, fn = 2 + 4, 4, 2 + 0
    f1 = task.statistics(label, np.zeros((2, 4, 4, 3), np.uint8))
    assert f1[0] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    monkeypatch.setattr(task, "edges", lambda images: np.zeros((2, 4, 4), bool))
    assert task.statistics(label, np.zeros((2, 4, 4, 3), np.uint8))[0] == 0.0
    assert task.value(np.array([[0.5], [0.25]])) == pytest.approx(37.5)


def test_canny_hints_come_from_the_image_or_from_the_data():
    image = shapes()
    hint, label = Canny().condition(image, np.zeros_like(image))
    assert set(np.unique(label)) == {0, 255} and (hint == label[..., None]).all()
    data_hint = np.zeros_like(image)
    data_hint[10:12] = 200
    hint, label = Canny(hint_source="data").condition(image, data_hint)
    assert hint is data_hint and label.sum() == 255 * 2 * 96
    with pytest.raises(ValueError, match="takes its hint from the data"):
        Segmentation(hint_source="image", segmenter=object())


def ms_ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """MS-SSIM of two [0, 1] maps (Wang, Simoncelli & Bovik 2003): at each of five scales the contrast-structure
    term from an 11-tap Gaussian window (sigma 1.5) over the valid region, the full SSIM at the last, the maps
    halved by 2x2 means between scales, weighted by the published exponents; negative terms count as 0. One
    convention is torchmetrics' own (and so the paper's): the last scale's SSIM is averaged over the whole map, its
    borders mirrored."""
    taps = np.exp(-0.5 * (np.arange(11) - 5.0) ** 2 / 1.5 ** 2)
    window = np.outer(taps, taps) / taps.sum() ** 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    result = 1.0
    for scale, beta in enumerate(betas):
        last = scale == len(betas) - 1

        def mean(z):
            return correlate2d(np.pad(z, 5, mode="reflect") if last else z, window, mode="valid")
        mx, my = mean(x), mean(y)
        vx, vy, cov = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
        cs = (2 * cov + c2) / (vx + vy + c2)
        term = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs if last else cs
        result *= max(term.mean(), 0.0) ** beta
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        x, y = (z[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3)) for z in (x, y))
    return result


def test_ms_ssim_is_the_published_definition_averaged_over_a_prompts_images():
    rng = np.random.default_rng(0)
    label = cv2.GaussianBlur(rng.integers(0, 256, (192, 200), dtype=np.uint8), (0, 0), 2)
    noisy = [np.clip(label + rng.normal(0, s, label.shape), 0, 255).astype(np.uint8) for s in (10, 40)]
    expected = np.mean([ms_ssim_by_hand(n / 255.0, label / 255.0) for n in noisy])
    assert ms_ssim(np.stack(noisy), label) == pytest.approx(expected, abs=1e-5)
    assert 0.3 < expected < 0.99
    assert ms_ssim(label[None], label) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 176 pixels a side.*paper's is 512"):
        ms_ssim(noisy[0][None, :160, :160], label[:160, :160])


class SideOutputs(torch.nn.Module):
    """HED's interface with outputs that span the sigmoid: five side outputs at strides 1 to 16, each a pooled
    brightness map of the 0..255 input, centred."""

    def forward(self, x):
        brightness = x.mean(1, keepdim=True) / 255.0
        return [torch.nn.functional.avg_pool2d(brightness, 2 ** k) * 12 - 6 for k in range(5)]


def test_hed_maps_are_the_annotators_soft_edges():
    from annotator.hed import HEDdetector
    detector = HEDdetector(random_init=True)
    detector.model = SideOutputs()
    image = shapes(64)
    ours = HED(detector=detector).maps(image[None])[0]
    reference = detector(image)  # the annotator's own recipe (float64 sigmoid)
    assert ours.std() > 20
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


class Brightness(torch.nn.Module):
    """A line-drawing network's interface: B x 3 x H x W in [0, 1] -> B x 1 x H x W, here the mean brightness."""

    def forward(self, x):
        return x.mean(1, keepdim=True)


def test_lineart_labels_are_the_inverted_drawing_and_outputs_invert_as_the_papers_uint8_arithmetic():
    detector = type("Detector", (), {"model": Brightness()})()
    paper, exact = Lineart(detector=detector), Lineart(detector=detector, inversion="exact")
    image = np.zeros((1, 2, 3), np.uint8)
    image[0, 1] = 100
    hint, label = paper.condition(image, np.zeros_like(image))
    assert label.tolist() == [[255, 155]] and (hint == label[..., None]).all()  # (1 - 0) and (1 - 100/255), cut
    drawn = np.array([0, 1, 2, 100, 255], np.uint8)
    assert paper.inverted(drawn).tolist() == [1, 0, 255, 157, 2]  # (1 - x) on uint8 wraps: (257 - x) mod 256
    assert exact.inverted(drawn).tolist() == [255, 254, 253, 155, 0]
    assert paper.settings() == {"hint_source": "image", "inversion": "paper"}
    # a prompt whose images are its target: exact inversion reproduces the label; the paper's blackens the darkest
    target = cv2.resize(shapes(), (192, 192))
    target[:40] = 0  # drawn at 0: the paper's inversion turns these lines black
    _, label = paper.condition(target, target)
    assert exact.statistics(label, np.stack([target, target]))[0] == pytest.approx(1.0, abs=1e-3)
    assert paper.statistics(label, np.stack([target, target]))[0] < 0.9
    with pytest.raises(ValueError, match="inversion must be one of paper, exact"):
        Lineart(detector=detector, inversion="none")


def test_lineart_labels_are_the_annotators_hints():
    from annotator.lineart import LineartDetector
    torch.manual_seed(0)
    detector = LineartDetector(random_init=True)
    image = shapes(64)
    label = Lineart(detector=detector).label_from_image(image)
    reference = detector(image)  # 255 - the drawing cut to uint8, where the paper cuts 1 - the drawing
    assert reference.std() > 1 and np.abs(label.astype(int) - reference.astype(int)).max() <= 1


class FakeDepth:
    """A depth network that sees the picture's brightness: depth = mean of the normalised input channels + 1."""

    def __call__(self, pixel_values):
        return type("Out", (), {"predicted_depth": pixel_values.mean(1) + 1})()


def processor_384(images, return_tensors):
    x = torch.stack([torch.from_numpy(np.array(im.resize((384, 384)))).permute(2, 0, 1).float() for im in images])
    return {"pixel_values": x / 127.5 - 1}


def test_depth_label_scaling_and_rmse_by_hand(monkeypatch):
    task = Depth(estimator=(processor_384, FakeDepth()))
    hint = np.full((8, 8, 3), 50, np.uint8)
    hint[4:] = 150
    label = task.label_from_hint(hint)
    assert set(np.unique(label)) == {0, 255}  # min-max to 0..255
    assert (task.label_from_hint(np.full((8, 8, 3), 7, np.uint8)) == 0).all()  # a flat hint
    found = np.stack([np.full((8, 8), 255, np.uint8), label])
    monkeypatch.setattr(task, "depth_maps", lambda images: found)
    expected = (np.sqrt(255.0 ** 2 * 32 / 64) + 0.0) / 2  # image 0 wrong on half the pixels by 255, image 1 right
    assert task.statistics(label, np.zeros((2, 8, 8, 3), np.uint8))[0] == pytest.approx(expected)


def test_depth_maps_are_divided_by_their_maximum_and_resized_bilinearly():
    task = Depth(estimator=(processor_384, FakeDepth()))
    images = np.zeros((2, 24, 40, 3), np.uint8)
    images[0, :, 20:] = 255
    images[1] = 128
    maps = task.depth_maps(images)
    assert maps.shape == (2, 24, 40)
    assert maps[0, :, :15].max() == 0 and maps[0, :, 25:].min() == 255  # depth 0 and 2, over the maximum 2
    assert (maps[1] == 255).all()  # flat: its own maximum


def test_the_depth_network_loads_from_its_folder_and_is_named_when_missing(tmp_path, monkeypatch):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    from annotator.util import MissingWeightsError
    from cldm.protocol import dpt_large
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="dpt-large lacks config.json, preprocessor_config.json, "
                                                  "model.safetensors or pytorch_model.bin.*Intel/dpt-large"):
        dpt_large(torch.device("cpu"))
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=384, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16)
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(tmp_path / "dpt-large")
    DPTImageProcessorPil(size={"height": 384, "width": 384}).save_pretrained(tmp_path / "dpt-large")
    processor, model = dpt_large(torch.device("cpu"))
    task = Depth(estimator=(processor, model))
    maps = task.depth_maps(np.stack([shapes(64), shapes(64)[::-1]]))
    assert maps.shape == (2, 64, 64) and maps.dtype == np.uint8 and maps.max() > 0  # peaks averaged by the resize


def test_iou_sums_over_the_set_as_mmseg_does():
    label = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, IGNORE, IGNORE]])
    predicted = np.array([[0, 1, 1, 1],
                          [0, 0, 1, 2],
                          [2, 0, 2, 2]])  # the ignored pixels' predictions do not count
    # class 0: intersect 3, pred 4, label 4 -> union 5; class 1: 3, 4, 4 -> 5; class 2: 1, 2, 2 -> 3
    totals = intersect_and_union(predicted, label, 4)
    assert totals.tolist() == [[3, 3, 1, 0], [5, 5, 3, 0]]
    assert mean_iou(totals) == pytest.approx((3 / 5 + 3 / 5 + 1 / 3) / 3)  # class 3, absent, is left out
    # over a set the counts add up before dividing: not the mean of the images' mIoUs
    other = intersect_and_union(np.full((2, 2), 3), np.full((2, 2), 3), 4)
    assert mean_iou(totals + other) == pytest.approx((3 / 5 + 3 / 5 + 1 / 3 + 1) / 4)
    assert np.isnan(mean_iou(np.zeros((2, 4), int)))


def test_segmentation_labels_are_the_palettes_classes_and_black_is_ignored():
    from annotator.uniformer import colorize
    classes = np.arange(150).reshape(10, 15)
    hint = colorize(classes).astype(np.int16)
    hint[0, 0] = 0  # black: ADE20K's "other"
    hint[0, 1] += 3  # a colour off the palette by a little (180, 120, 120 + 3): its nearest class, 1
    task = Segmentation(segmenter=object())
    label = task.label_from_hint(hint.astype(np.uint8))
    expected = classes.copy()
    expected[0, 0] = IGNORE
    expected[classes == 48] = 6  # two ADE20K classes share a colour; the first wins, as in the paper's lookup
    assert (label == expected).all()


class FixedSegmenter:
    """Finds class 1 in the left half and class 2 in the right half of any image."""

    def segment(self, image):
        out = np.ones(image.shape[:2], np.int64)
        out[:, image.shape[1] // 2:] = 2
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protocol")
    model = model_as_trained(TINY)
    randomize_zero_convs(model)
    return model.eval(), save_state_dict(model.state_dict(), folder / "tiny.ckpt"), folder


def test_run_streams_prompts_with_their_own_seeds_and_sums_the_sets_iou(tiny, tmp_path, monkeypatch):
    from annotator.uniformer import colorize
    model = tiny[0]
    data = make_fill50k(tmp_path / "val", n=3, size=32, seed=1)
    from cldm.data import open_dataset
    dataset = open_dataset(data, shuffle=False)
    left_right = np.ones((32, 32), np.int64)
    left_right[:, 16:] = 0  # the hint: class 1 on the left (found), 0 on the right (where class 2 is found)
    items = [dict(item, hint=colorize(left_right) / 255.0) for item in (dataset[i] for i in range(3))]
    sampling = Sampling(images_per_prompt=2, steps=2, batch_size=4)
    calls = []

    def generate(model, prompts, hints, seeds, *args):
        calls.append((prompts, seeds, args))
        return fidelity.generate(model, prompts, hints, seeds, *args)
    monkeypatch.setattr(cldm.protocol, "generate", generate)
    result = run(model, items, Segmentation(segmenter=FixedSegmenter()), sampling=sampling)
    prompts = [item["txt"] for item in items]
    assert [(c[0], c[1]) for c in calls] == [([prompts[0]] * 2 + [prompts[1]] * 2, [42, 43, 44, 45]),
                                            ([prompts[2]] * 2, [46, 47])]  # 4 images a call, 2 per prompt
    assert calls[0][2][-1] == "worst quality, low quality" and calls[0][2][:2] == (2, 7.5)
    assert result.statistics.shape == (3, 300) and result.image_size == (32, 32)
    assert result.value == pytest.approx(100 / 3)  # IoU of class 0: 0 / 3072, class 1: 3072 / 3072, class 2: 0
    assert result.statistics[:, :3].tolist() == [[0, 1024, 0]] * 3  # each prompt's two images
    summary = summarize(result, resamples=100)
    assert summary["ci95"] == [pytest.approx(100 / 3)] * 2  # every prompt alike
    assert summary["differs_from_paper"] == ["images_per_prompt", "steps"]


def test_intervals_cover_the_value_and_pair_the_prompts():
    rng = np.random.default_rng(0)
    sampling = Sampling()
    task = Canny()
    a = ProtocolRun("canny", task.settings(), rng.uniform(0.3, 0.5, (200, 1)), [str(i) for i in range(200)],
                    sampling, (8, 8))
    b = ProtocolRun("canny", task.settings(), a.statistics - 0.01 + rng.normal(0, 0.001, (200, 1)), a.prompts,
                    sampling, (8, 8))
    low, high = summarize(a, resamples=500)["ci95"]
    assert low < a.value < high and high - low < 2.5
    difference = paired_difference(a, b, resamples=500)
    assert difference["difference"] == pytest.approx(1.0, abs=0.05)
    low, high = difference["ci95"]
    assert 0.9 < low < 1.0 < high < 1.1  # far narrower than either run's own interval: the prompts are paired
    with pytest.raises(ValueError, match="not paired"):
        paired_difference(a, ProtocolRun("canny", task.settings(), b.statistics, a.prompts, Sampling(seed=0), (8, 8)))
    with pytest.raises(ValueError, match="cannot compare a canny run .* with a canny run"):
        paired_difference(a, ProtocolRun("canny", {"hint_source": "data"}, b.statistics, a.prompts, sampling, (8, 8)))
    # a run comes back from its report (through JSON) as it was
    back = ProtocolRun.from_summary(json.loads(json.dumps(summarize(b, resamples=10))))
    assert (back.statistics == b.statistics).all() and (back.prompts, back.sampling, back.image_size, back.settings) \
        == (b.prompts, b.sampling, b.image_size, b.settings)
    assert paired_difference(a, back, resamples=500) == difference


def eval_tool(*args):
    from tool_eval_control import main
    return main(["--config", TINY, "--device", "cpu", "--bootstrap", "100", *map(str, args)])


def test_tool_runs_the_protocol_end_to_end_and_writes_json_and_markdown(tiny, tmp_path, monkeypatch):
    from annotator.hed import HEDdetector
    _, ckpt, _ = tiny
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(tmp_path))
    torch.save(HEDdetector(random_init=True).model.state_dict(), tmp_path / "ControlNetHED.pth")
    data = make_fill50k(tmp_path / "val", n=3, size=176, seed=1)
    out, md = tmp_path / "hed.json", tmp_path / "hed.md"
    common = ["--ckpt", ckpt, "--data_root", data, "--protocol", "controlnet++", "--images_per_prompt", 2,
              "--steps", 2, "--resolution", 176]
    summary = eval_tool(*common, "--condition", "hed", "--n", 2, "--out", out, "--markdown", md)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["condition"] == "hed" and written["prompts"] == 2 and written["resolution"] == [176, 176]
    assert 0 < written["value"] <= 1 and written["ci95"][0] <= written["value"] <= written["ci95"][1]
    assert written["sampling"]["sampler"] == "unipc_bh2" and written["sampling"]["guidance_scale"] == 7.5
    table = md.read_text()
    assert "| hed SSIM (higher is better) | " in table
    assert "Differs from the paper's settings in: images_per_prompt, steps" in table
    with pytest.raises(FileExistsError, match="hed.json already exists"):
        eval_tool(*common, "--condition", "hed", "--out", out)
    canny = eval_tool(*common, "--condition", "canny", "--resolution", 32, "--n", 3, "--seed", 7, "--out", out,
                      "--force")
    assert canny["prompts"] == 3 and canny["sampling"]["seed"] == 7 and canny["metric"] == "F1 (%)"
    # the same model against its own earlier report: paired, nothing changed
    again = eval_tool(*common, "--condition", "canny", "--resolution", 32, "--n", 3, "--seed", 7,
                      "--compare_with", out, "--markdown", md, "--force")
    assert again["compared_with"]["difference"] == 0 and again["compared_with"]["ci95"] == [0, 0]
    assert "difference +0 (95% interval +0 to +0)" in md.read_text()
    with pytest.raises(UserError, match="is a canny evaluation sampled with .*'seed': 7.*not canny with .*'seed': 8"):
        eval_tool(*common, "--condition", "canny", "--resolution", 32, "--n", 3, "--seed", 8, "--compare_with", out)
    with pytest.raises(UserError, match="not paired: their prompts"):
        eval_tool(*common, "--condition", "canny", "--resolution", 32, "--n", 2, "--seed", 7, "--compare_with", out)


@pytest.mark.parametrize("extra, message", [
    (["--protocol", "controlnet++"], "needs --condition"),
    (["--protocol", "controlnet++", "--condition", "canny", "--metrics", "fill"], "--metrics does not apply to "
                                                                                  "--protocol controlnet\\+\\+"),
    (["--condition", "canny"], "--condition does not apply to the evaluation with and without control"),
    (["--protocol", "controlnet++", "--condition", "depth", "--hint_source", "image"], "takes its hint from the data"),
    (["--protocol", "controlnet++", "--condition", "canny", "--lineart_inversion", "exact"], "applies to --condition "
                                                                                             "lineart, not canny"),
])
def test_tool_refuses_options_that_would_do_nothing(tiny, tmp_path, extra, message):
    with pytest.raises((UserError, ValueError), match=message):
        eval_tool("--ckpt", tiny[1], "--data_root", tmp_path, *extra)

"""Is a control obeyed? Fidelity metrics of images generated under a control, as ControlNet++ (Li et al. 2024)
made them the standard, and the evaluation that samples a model with and without its control and scores both.

Metrics (per sample; `Scorers` builds the ones asked for):
  fill   Fill50K-type data: IoU between the generated fill region (pixels nearer the circle's colour than the
         background's) and the target disc; whether the region's mean colour is within COLOR_TOLERANCE of the
         circle's colour; and the trivial "fill everything" IoU as a floor.
  canny  F1 between the hint's edges and cv2.Canny of the output, within a tolerance radius.
  ssim   SSIM between the hint and the same detector (canny or hed) applied to the output.
  depth  RMSE between the hint and MiDaS depth of the output (needs annotator/ckpts MiDaS weights).
  seg    mIoU between the hint and UniFormer's segmentation of the output (needs its weights).
Sample i starts from noise seeded by seed + i in both conditions, so the two are paired; "without control"
samples with no control unit at all. tool_eval_control.py is the command line; training can log the same
metrics while it runs.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from cldm.data import open_dataset
from cldm.data.batch import HINT
from cldm.data.circles import MIN_CONTRAST
from cldm.model import atomic_output
from cldm.pipeline import sample
from ldm.batch import CAPTION, IMAGE

COLOR_TOLERANCE = MIN_CONTRAST / 2  # RGB distance: half the least fill/background contrast of Fill50K
CANNY_THRESHOLDS = (100, 200)
CONDITIONS = ("control", "no_control")
# The metrics Scorers builds, the values each one's scorer gives, and those for which lower is better (for every
# other, higher).
METRIC_KEYS = {"fill": ("fill_iou", "fill_color_acc", "fill_floor_iou"), "canny": ("canny_f1",), "ssim": ("ssim",),
               "depth": ("depth_rmse",), "seg": ("seg_miou",)}
METRICS = tuple(METRIC_KEYS)
LOWER_IS_BETTER = ("depth_rmse",)


# ---- metrics on single images (uint8 HxWx3 RGB unless said otherwise) ----

def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks are identical (1)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def fill_region(image: np.ndarray, color: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels nearer the circle's colour than the background's."""
    x = image.astype(np.float32)
    return ((x - color) ** 2).sum(-1) < ((x - background) ** 2).sum(-1)


def reference_fill(target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(disc mask, circle colour, background colour) read off a Fill50K target: the background is the median
    border colour, the circle's the median of the pixels far from it."""
    border = np.concatenate([target[0], target[-1], target[:, 0], target[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    far = np.linalg.norm(target.astype(np.float32) - background, axis=-1) > COLOR_TOLERANCE
    if not far.any():
        raise ValueError("the target has no circle: no pixel differs from the background")
    color = np.median(target[far].astype(np.float32), axis=0)
    return fill_region(target, color, background), color, background


def is_fill_target(target: np.ndarray, explained: float = 0.9) -> bool:
    """Whether a target is Fill50K-type (the fill metric applies): one region of one colour on a background of
    another, the two colours within COLOR_TOLERANCE of at least `explained` of the pixels."""
    try:
        _, color, background = reference_fill(target)
    except ValueError:
        return False
    x = target.astype(np.float32)
    near = np.minimum(np.linalg.norm(x - color, axis=-1), np.linalg.norm(x - background, axis=-1))
    return bool((near < COLOR_TOLERANCE).mean() >= explained)


def color_error(image: np.ndarray, mask: np.ndarray, color: np.ndarray) -> float:
    """RGB distance between the mean colour of image[mask] and `color` (inf for an empty mask)."""
    if not mask.any():
        return math.inf
    return float(np.linalg.norm(image[mask].astype(np.float32).mean(0) - color))


def disc_fit_iou(mask: np.ndarray) -> float:
    """IoU of a region with its best-fitting disc (same area, centred at its centroid): 1 for a disc."""
    area = int(mask.sum())
    if area == 0:
        return 0.0
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    disc = (xx - xs.mean()) ** 2 + (yy - ys.mean()) ** 2 <= area / math.pi
    return iou(mask, disc)


def edge_f1(reference: np.ndarray, predicted: np.ndarray, tolerance: float = 2.0) -> float:
    """F1 of predicted edge pixels against reference ones; a pixel within `tolerance` px of the other map counts.

    Both maps empty: 1. One empty: 0.
    """
    if not reference.any() or not predicted.any():
        return float(reference.any() == predicted.any())

    def distance_to(edges: np.ndarray) -> np.ndarray:
        return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    precision = float((distance_to(reference)[predicted] <= tolerance).mean())
    recall = float((distance_to(predicted)[reference] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def canny(image: np.ndarray) -> np.ndarray:
    return cv2.Canny(image, *CANNY_THRESHOLDS)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Gaussian window 11, sigma 1.5) of two uint8 single-channel maps."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def as_tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32) / 255.0)[None, None]

    return float(structural_similarity_index_measure(as_tensor(a), as_tensor(b), data_range=1.0))


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# ---- per-sample scores: (target, hint, output) -> named values ----

def score_fill(target: np.ndarray, hint: np.ndarray, output: np.ndarray) -> dict[str, float]:
    disc, color, background = reference_fill(target)
    region = fill_region(output, color, background)
    error = color_error(output, region, color)
    return {"fill_iou": iou(region, disc), "fill_color_acc": float(error < COLOR_TOLERANCE),
            "fill_floor_iou": iou(np.ones_like(disc), disc)}


def score_canny(target: np.ndarray, hint: np.ndarray, output: np.ndarray) -> dict[str, float]:
    return {"canny_f1": edge_f1(gray(hint) > 127, canny(output) > 0)}


class Scorers:
    """The metric functions asked for; detector-based ones load their networks once, on first use."""

    def __init__(self, metrics: list[str], detector: str = "canny", device: str | torch.device = "cpu"):
        self.device = device
        self.detector = detector
        self.skipped: dict[str, str] = {}
        self.functions: dict[str, Callable] = {}
        builders = {"fill": lambda: score_fill, "canny": lambda: score_canny, "ssim": self.ssim_scorer,
                    "depth": self.depth_scorer, "seg": self.seg_scorer}
        for name in metrics:
            if name not in builders:
                raise ValueError(f"unknown metric {name!r}; choose from {sorted(builders)}")
            try:
                self.functions[name] = builders[name]()
            except FileNotFoundError as err:  # annotator.util.MissingWeightsError
                self.skipped[name] = str(err).splitlines()[0]

    def ssim_scorer(self) -> Callable:
        detect = self.detector_fn(self.detector)
        return lambda target, hint, output: {"ssim": ssim(gray(hint), gray(detect(output)))}

    def detector_fn(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        if name == "canny":
            return canny
        if name == "hed":
            from annotator.hed import HEDdetector
            return HEDdetector(self.device)
        raise ValueError(f"unknown --detector {name!r}; choose canny or hed")

    def depth_scorer(self) -> Callable:
        from annotator.midas import MidasDetector
        midas = MidasDetector(self.device)

        def score(target, hint, output):
            depth = midas(output)[0].astype(np.float32) / 255.0
            return {"depth_rmse": float(np.sqrt(((gray(hint).astype(np.float32) / 255.0 - depth) ** 2).mean()))}
        return score

    def seg_scorer(self) -> Callable:
        from annotator.uniformer import ADE20K_PALETTE, UniformerDetector
        segmenter = UniformerDetector(self.device)
        palette = np.asarray(ADE20K_PALETTE, dtype=np.float32)

        def score(target, hint, output):
            # hint colours -> nearest palette class; mIoU over the classes present in either map
            distances = ((hint.reshape(-1, 1, 3).astype(np.float32) - palette[None]) ** 2).sum(-1)
            expected = distances.argmin(1).reshape(hint.shape[:2])
            found = segmenter.segment(output)
            classes = np.union1d(np.unique(expected), np.unique(found))
            return {"seg_miou": float(np.mean([iou(expected == c, found == c) for c in classes]))}
        return score

    def __call__(self, target: np.ndarray, hint: np.ndarray, output: np.ndarray) -> dict[str, float]:
        scores = {}
        for fn in self.functions.values():
            scores.update(fn(target, hint, output))
        return scores


# ---- sampling ----

@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[str], hints: torch.Tensor | None, seeds: list[int],
             steps: int = 20, guidance_scale: float = 3.0, batch_size: int = 64, sampler: str = "ddim",
             sizes: Mapping[str, tuple[int, int]] | None = None, negative_prompt: str = "") -> np.ndarray:
    """One uint8 image per prompt, image i from seeds[i]; hints (BCHW in [0, 1]) or None: no control.

    Classifier-free guidance against `negative_prompt` (default the empty prompt); the model's own control
    network acts on both passes, at strength 1 (the apps' default mode). `sizes`: SDXL's size conditioning,
    sample()'s arguments by name.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        units = [] if hints is None else [model.unit(hints[start:end])]
        out.append(sample(model, prompts[start:end], negative_prompt=negative_prompt, units=units, sampler=sampler,
                          steps=steps, cfg_scale=guidance_scale, seed=seeds[start:end], **(sizes or {})).images)
    return np.concatenate(out)


# ---- evaluation ----

def load_samples(data_root: str | Path, n: int, **options) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, hints, targets) of the first n items of a data root in any format (cldm.data), as uint8 BHWC;
    `options` go to cldm.data.open_dataset (format, resize, format options)."""
    dataset = open_dataset(data_root, shuffle=False, **options)
    if n > len(dataset):
        raise ValueError(f"{data_root} holds {len(dataset)} samples, fewer than the {n} asked for")
    items = [dataset[i] for i in range(n)]
    hints = np.stack([(it[HINT] * 255).round().astype(np.uint8) for it in items])
    targets = np.stack([((it[IMAGE] + 1) * 127.5).round().astype(np.uint8) for it in items])
    return [it[CAPTION] for it in items], hints, targets


def evaluate(model: torch.nn.Module, prompts: list[str], hints: np.ndarray, targets: np.ndarray,
             scorers: Scorers, seed: int = 0, steps: int = 20, guidance_scale: float = 3.0,
             batch_size: int = 64, sampler: str = "ddim", conditions: Sequence[str] = CONDITIONS,
             sizes: Mapping[str, tuple[int, int]] | None = None
             ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Per-sample scores {condition: {metric: array}} and the images {condition: BHWC uint8}, for each of
    `conditions` (default both); `sizes` as in generate."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition {unknown[0]!r}; choose from {CONDITIONS}")
    seeds = [seed + i for i in range(len(prompts))]
    hint_tensor = torch.from_numpy(hints).permute(0, 3, 1, 2).float() / 255.0
    run = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, sampler=sampler, sizes=sizes)
    control_of = {"control": hint_tensor, "no_control": None}
    images = {c: generate(model, prompts, control_of[c], seeds, **run) for c in conditions}
    scores = {}
    for condition, outputs in images.items():
        rows = [scorers(t, h, o) for t, h, o in zip(targets, hints, outputs)]
        scores[condition] = {k: np.array([r[k] for r in rows]) for k in rows[0]} if rows else {}
    return scores, images


def ci95(values: np.ndarray) -> float:
    """Half-width of the normal 95% confidence interval of the mean of `values` (nan for fewer than two)."""
    return 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b over paired samples and the half-width of its 95% interval."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return {"mean": float(diff.mean()), "ci95": ci95(diff)}


def summarize(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """mean, std and the 95% interval of the mean per condition, and the paired difference (control - no control)
    with its 95% interval."""
    summary = {}
    for metric, with_control in scores["control"].items():
        entry = {c: {"mean": float(scores[c][metric].mean()), "std": float(scores[c][metric].std()),
                     "ci95": ci95(scores[c][metric])} for c in CONDITIONS}
        entry["paired_diff"] = paired_difference(with_control, scores["no_control"][metric])
        summary[metric] = entry
    return summary


# What two evaluations must share to be compared sample by sample (tool_eval_control's summary keys).
PAIRING = ("data_root", "n", "seed", "sampler", "steps", "guidance_scale")


def compare(after: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Two evaluations of the same samples from the same seeds (e.g. a model before and after reward fine-tuning):
    per metric both means and the paired difference (after - before) with its 95% interval."""
    return {metric: {"before": float(np.mean(before[metric])), "after": float(np.mean(values)),
                     "paired_diff": paired_difference(values, before[metric])}
            for metric, values in after.items() if metric in before}


def format_table(summary: dict[str, dict]) -> str:
    lines = [f"{'metric':<16}{'with control':>18}{'without control':>18}{'difference (95% CI)':>24}"]
    for metric, e in summary.items():
        c, nc, d = e["control"], e["no_control"], e["paired_diff"]
        lines.append(f"{metric:<16}{c['mean']:>10.3f} ± {c['std']:<5.3f}{nc['mean']:>10.3f} ± {nc['std']:<5.3f}"
                     f"{d['mean']:>+14.3f} ± {d['ci95']:.3f}")
    return "\n".join(lines)


def format_comparison(comparison: dict[str, dict]) -> str:
    lines = [f"{'metric (with control)':<24}{'before':>10}{'after':>10}{'difference (95% CI)':>24}"]
    for metric, e in comparison.items():
        d = e["paired_diff"]
        lines.append(f"{metric:<24}{e['before']:>10.3f}{e['after']:>10.3f}{d['mean']:>+14.3f} ± {d['ci95']:.3f}")
    return "\n".join(lines)


def sheet(hints: np.ndarray, targets: np.ndarray, images: dict[str, np.ndarray], prompts: list[str],
          rows: int = 8, zoom: float = 2) -> np.ndarray:
    """uint8 HxWx3 RGB with one row per sample: hint | target | without control | with control, and the prompt;
    cells are `zoom` times the images' size."""
    columns = ["hint", "target", "without control", "with control"]
    cells = [hints, targets, images["no_control"], images["control"]]
    rows = min(rows, len(prompts))
    h, w = round(hints.shape[1] * zoom), round(hints.shape[2] * zoom)
    interpolation = cv2.INTER_NEAREST if zoom >= 1 else cv2.INTER_AREA
    pad, header, caption = 4, 18, 14
    page = np.full((header + rows * (h + caption + pad), len(columns) * (w + pad) + pad, 3), 255, np.uint8)
    for j, name in enumerate(columns):
        cv2.putText(page, name, (pad + j * (w + pad), 13), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1, cv2.LINE_AA)
    for i in range(rows):
        y = header + i * (h + caption + pad)
        for j, cell in enumerate(cells):
            x = pad + j * (w + pad)
            page[y:y + h, x:x + w] = cv2.resize(cell[i], (w, h), interpolation=interpolation)
        cv2.putText(page, prompts[i][:60], (pad, y + h + 11), cv2.FONT_HERSHEY_PLAIN, 0.8, (60, 60, 60), 1,
                    cv2.LINE_AA)
    return page


def save_sheet(path: str | Path, hints: np.ndarray, targets: np.ndarray, images: dict[str, np.ndarray],
               prompts: list[str], rows: int = 8, zoom: float = 2, force: bool = True) -> Path:
    """The `sheet` as a PNG at `path`."""
    return save_png(path, sheet(hints, targets, images, prompts, rows, zoom), force)


def save_png(path: str | Path, image: np.ndarray, force: bool = True) -> Path:
    """A uint8 HxWx3 RGB image as a PNG at `path` (written to a temp file and renamed)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    with atomic_output(path, force) as tmp:
        Path(tmp).write_bytes(png.tobytes())
    return Path(path)

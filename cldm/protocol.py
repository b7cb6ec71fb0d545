"""ControlNet++'s evaluation protocol (Li et al., ECCV 2024; the eval/ scripts of liming-ai/ControlNet_Plus_Plus):
does a ControlNet obey its condition, measured the way the paper measured it, so that numbers can be set beside
its tables.

For every held-out prompt the model draws `images_per_prompt` images (4 in the paper, its "groups") with the
paper's sampling (diffusers' default UniPC, 20 steps, guidance 7.5 against "worst quality, low quality"); image g
of prompt i starts from the seed `seed + images_per_prompt * i + g`, so two models evaluated with the same seed
see the same noise and can be compared prompt by prompt. A detector then reads the condition back off each image
and compares it with the condition the model was given:

  canny    label: kornia's Canny (thresholds 0.1 / 0.2) of the image; read off each image by the same; per
           prompt the F1 over all its images' pixels; reported: the mean over prompts, in %.
  hed      label: HED (ControlNetHED.pth) of the image; read by the same; per prompt the MS-SSIM, mean over its
           images; reported: the mean over prompts.
  lineart  label: 1 - line drawing (sk_model.pth) of the image; read by the line drawing, inverted; per prompt
           the MS-SSIM, mean over its images; reported: the mean over prompts.
  depth    label: the data's depth hint, min-max scaled to 0..255; read by DPT-Large (Intel/dpt-large); per
           prompt the RMSE in 0..255, mean over its images; reported: the mean over prompts.
  seg      label: the data's ADE20K colour hint, as classes; read by UperNet-UniFormer (annotator/uniformer);
           per prompt the intersection and union of each class; reported: the mIoU of their sums, in %.

For canny, hed and lineart the paper makes the condition from the image itself with the detector that scores the
output (`hint_source="image"`, the default); `hint_source="data"` uses the data's hint instead. Depth and seg use
the data's hint. The numbers are those of the paper's code, quirks included where they move the result (see each
task); docs/evaluation.md lists them, the weights each task needs and the paper's own numbers.

Each reported number comes with a 95% bootstrap interval over the prompts (the unit the images of one prompt
share), and `paired_difference` gives the interval of the difference between two runs on the same prompts and
seeds. tool_eval_control.py --protocol controlnet++ is the command line.
"""

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from scipy.stats import bootstrap

from annotator.uniformer.palette import ADE20K_PALETTE, NO_CLASS, classes_of
from cldm.data.batch import HINT
from cldm.fidelity import generate
from ldm.batch import CAPTION, IMAGE

log = logging.getLogger(__name__)

HINT_SOURCES = ("image", "data")


@dataclass(frozen=True)
class Sampling:
    """How the images are drawn; the defaults are the paper's (eval/eval.py and the eval_*.sh scripts)."""

    images_per_prompt: int = 4
    seed: int = 42
    sampler: str = "unipc_bh2"
    steps: int = 20
    guidance_scale: float = 7.5
    negative_prompt: str = "worst quality, low quality"
    batch_size: int = 16  # images per sample() call

    def seeds(self, prompt_index: int) -> list[int]:
        """The seeds of one prompt's images."""
        g = self.images_per_prompt
        return [self.seed + g * prompt_index + k for k in range(g)]


PAPER = Sampling()


# ---- the tasks: one per condition ----

class Task(ABC):
    """One condition of the protocol: how its hint and label are made, how the generated images are read, and
    how per-prompt statistics add up to the reported number."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the reported number, as the paper's table heads it
    higher_is_better: ClassVar[bool]
    hint_from_image: ClassVar[bool] = False  # whether the paper makes the hint from the image (ImageTask)

    def __init__(self, device: str | torch.device = "cpu", hint_source: str | None = None) -> None:
        self.device = torch.device(device)
        hint_source = hint_source or ("image" if self.hint_from_image else "data")
        if hint_source not in HINT_SOURCES:
            raise ValueError(f"hint source must be one of {', '.join(HINT_SOURCES)}, got {hint_source!r}")
        if hint_source == "image" and not self.hint_from_image:
            raise ValueError(f"the {self.name} condition takes its hint from the data (the paper's labels are the "
                             "data's), not from the image")
        self.hint_source = hint_source

    def settings(self) -> dict:
        """How this task was set up, for the report."""
        return {"hint_source": self.hint_source}

    def condition(self, target: np.ndarray, hint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hint for the model as HxWx3 uint8, label) of one held-out sample (uint8 HxWx3 target and hint)."""
        return hint, self.label_from_hint(hint)

    @abstractmethod
    def label_from_hint(self, hint: np.ndarray) -> np.ndarray:
        """The label of a hint given in the data."""

    @abstractmethod
    def statistics(self, label: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """One prompt's statistics (a vector) from its label and its G generated images (G x H x W x 3 uint8)."""

    @classmethod
    def value(cls, statistics: np.ndarray) -> float:
        """The reported number from the statistics of the prompts (N x d); by default the mean of column 0."""
        return float(statistics[:, 0].mean())


class ImageTask(Task):
    """A condition the paper makes from the image itself, with the detector that scores the outputs."""

    hint_from_image = True

    def condition(self, target: np.ndarray, hint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.hint_source == "image":
            label = self.label_from_image(target)
            return self.as_hint(label), label
        return super().condition(target, hint)

    @abstractmethod
    def label_from_image(self, target: np.ndarray) -> np.ndarray:
        """The label the detector reads off a target image (uint8 HxWx3)."""

    def as_hint(self, label: np.ndarray) -> np.ndarray:
        """A label made from the image as the hint the model reads (grey, 3 channels)."""
        return np.repeat(label[..., None], 3, axis=-1)


def gray(image: np.ndarray) -> np.ndarray:
    """uint8 luma as PIL's convert('L') computes it, which the paper's scripts read every map through."""
    return np.asarray(Image.fromarray(image).convert("L")) if image.ndim == 3 else image


def as_unit_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """B x H x W x C uint8 -> B x C x H x W float in [0, 1] (torchvision's pil_to_tensor / 255)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def as_pil_uint8(x: torch.Tensor) -> np.ndarray:
    """A [0, 1] float map as torchvision's to_pil_image stores it: x * 255 truncated to uint8."""
    return x.mul(255).byte().cpu().numpy()


class Canny(ImageTask):
    """Canny edges as the paper finds them (kornia.filters.canny, thresholds 0.1 / 0.2 on [0, 1] images, its
    Gaussian 5x5 sigma 1 and hysteresis), and the F1 of the images' edge pixels against the label's, all G images
    of a prompt pooled (torchmetrics' BinaryF1Score on the flattened stack, 0 when neither has an edge), in %."""

    name, metric, higher_is_better = "canny", "F1 (%)", True
    low_threshold, high_threshold = 0.1, 0.2

    def edges(self, images: np.ndarray) -> np.ndarray:
        """B x H x W x 3 uint8 -> B x H x W bool."""
        from kornia.filters import canny
        with torch.no_grad():
            found = canny(as_unit_tensor(images, self.device), self.low_threshold, self.high_threshold)[1]
        return found[:, 0].cpu().numpy() > 0.5

    def label_from_image(self, target: np.ndarray) -> np.ndarray:
        return np.where(self.edges(target[None])[0], 255, 0).astype(np.uint8)

    def label_from_hint(self, hint: np.ndarray) -> np.ndarray:
        return np.where(gray(hint) > 127, 255, 0).astype(np.uint8)

    def statistics(self, label: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        from torchmetrics.functional.classification import binary_f1_score
        found = torch.from_numpy(self.edges(outputs)).long()
        expected = torch.from_numpy(label == 255).long().expand_as(found)
        return np.array([float(binary_f1_score(found.flatten(), expected.flatten()))])

    @classmethod
    def value(cls, statistics: np.ndarray) -> float:
        return 100.0 * float(statistics[:, 0].mean())


def ms_ssim(found: np.ndarray, label: np.ndarray) -> float:
    """torchmetrics' MS-SSIM (its defaults: Gaussian 11 / 1.5, five scales; data range 1), mean over the G maps
    `found` (G x H x W uint8) against one label (H x W uint8), as the paper's eval_edge.py calls it."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
    size = min(label.shape)
    if size < 176:  # five halvings must leave more than the 11-pixel window
        raise ValueError(f"MS-SSIM needs maps of at least 176 pixels a side, these are {label.shape[1]}x"
                         f"{label.shape[0]}: evaluate at a larger --resolution (the paper's is 512)")
    preds = torch.from_numpy(found).float()[:, None] / 255.0
    target = torch.from_numpy(label).float()[None, None].expand_as(preds) / 255.0
    return float(multiscale_structural_similarity_index_measure(preds.clip(0, 1), target.clip(0, 1),
                                                                data_range=1.0))


class HED(ImageTask):
    """HED soft edges (ControlNet 1.1's network, ControlNetHED.pth) as the paper's HEDdetector computes them: the
    sigmoid of the mean of the five side outputs in float32, bilinearly upsampled, cut to uint8; MS-SSIM of the
    images' maps against the label's."""

    name, metric, higher_is_better = "hed", "SSIM", True

    def __init__(self, device: str | torch.device = "cpu", hint_source: str | None = None,
                 detector: object | None = None) -> None:
        super().__init__(device, hint_source)
        if detector is None:
            from annotator.hed import HEDdetector
            detector = HEDdetector(self.device)
        self.network = detector.model

    def maps(self, images: np.ndarray) -> np.ndarray:
        """B x H x W x 3 uint8 -> B x H x W uint8 soft edges."""
        from annotator.hed import side_output_mean
        x = as_unit_tensor(images, self.device)
        with torch.no_grad():
            edge = torch.sigmoid(side_output_mean(self.network, (x * 255).clip(0, 255)))
        return (edge * 255.0).clip(0, 255).to(torch.uint8).cpu().numpy()

    def label_from_image(self, target: np.ndarray) -> np.ndarray:
        return self.maps(target[None])[0]

    def label_from_hint(self, hint: np.ndarray) -> np.ndarray:
        return gray(hint)

    def statistics(self, label: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        return np.array([ms_ssim(self.maps(outputs), label)])


LINEART_INVERSIONS = ("paper", "exact")


class Lineart(ImageTask):
    """Line art with ControlNet 1.1's line-drawing network (annotator/lineart, sk_model.pth: dark lines on white
    in [0, 1]) as the paper's eval.py runs it: the label and hint are 1 - drawing of the image, cut to uint8 (white
    lines on black); each image's drawing is cut to uint8 and inverted for the MS-SSIM against the label.

    The paper's eval_edge.py inverts the images' drawings as `1 - x` on a uint8 tensor, which wraps around: x
    becomes (257 - x) mod 256, so lines drawn at 0 or 1 (the darkest, x <= 1) come out black instead of white and
    every other pixel 2/255 brighter. `inversion="paper"` (the default) computes that, as the published numbers
    were; "exact" inverts as 255 - x."""

    name, metric, higher_is_better = "lineart", "SSIM", True

    def __init__(self, device: str | torch.device = "cpu", hint_source: str | None = None,
                 detector: object | None = None, inversion: str = "paper") -> None:
        super().__init__(device, hint_source)
        if inversion not in LINEART_INVERSIONS:
            raise ValueError(f"line-art inversion must be one of {', '.join(LINEART_INVERSIONS)}, got {inversion!r}")
        if detector is None:
            from annotator.lineart import LineartDetector
            detector = LineartDetector(self.device)
        self.network, self.inversion = detector.model, inversion

    def settings(self) -> dict:
        return {**super().settings(), "inversion": self.inversion}

    def drawings(self, images: np.ndarray) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x H x W line drawings in [0, 1] (0 = line)."""
        with torch.no_grad():
            return self.network(as_unit_tensor(images, self.device))[:, 0]

    def label_from_image(self, target: np.ndarray) -> np.ndarray:
        return as_pil_uint8(1 - self.drawings(target[None])[0])

    def label_from_hint(self, hint: np.ndarray) -> np.ndarray:
        return gray(hint)

    def inverted(self, drawn: np.ndarray) -> np.ndarray:
        """uint8 drawings (0 = line) as white lines on black, by the chosen inversion."""
        if self.inversion == "paper":
            return ((1 - drawn.astype(np.int64)) % 256).astype(np.uint8)
        return 255 - drawn

    def statistics(self, label: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        return np.array([ms_ssim(self.inverted(as_pil_uint8(self.drawings(outputs))), label)])


class Depth(Task):
    """Depth RMSE as the paper's eval_depth.py computes it: the label is the data's depth hint scaled to its own
    0..255 range (min-max, cut to uint8); each image's depth comes from DPT-Large (transformers'
    DPTForDepthEstimation and its PIL image processor: 384 x 384 input), divided by its maximum, cut to uint8 and
    resized bilinearly to the image; RMSE of the two in 0..255 per image, the mean over the prompt's images."""

    name, metric, higher_is_better = "depth", "RMSE", False

    def __init__(self, device: str | torch.device = "cpu", hint_source: str | None = None,
                 estimator: tuple[Callable, torch.nn.Module] | None = None) -> None:
        super().__init__(device, hint_source)
        self.processor, self.model = estimator or dpt_large(self.device)

    def label_from_hint(self, hint: np.ndarray) -> np.ndarray:
        span = int(hint.max()) - int(hint.min())
        scaled = (hint - hint.min()) / span * 255 if span else np.zeros(hint.shape)
        return gray(scaled.astype(np.uint8))

    def depth_maps(self, images: np.ndarray) -> np.ndarray:
        """B x H x W x 3 uint8 -> B x H x W uint8 relative depth (near is bright)."""
        inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        with torch.no_grad():
            predicted = self.model(pixel_values=inputs["pixel_values"].to(self.device)).predicted_depth
        height, width = images.shape[1:3]
        maps = []
        for depth in predicted:
            peak = depth.max()
            small = as_pil_uint8(depth / peak if peak > 0 else torch.zeros_like(depth))
            maps.append(np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)))
        return np.stack(maps)

    def statistics(self, label: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        errors = self.depth_maps(outputs).astype(np.float32) - label.astype(np.float32)
        return np.array([float(np.sqrt((errors ** 2).mean(axis=(1, 2))).mean())])


DPT_FOLDER = "dpt-large"
DPT_SOURCE = "https://huggingface.co/Intel/dpt-large"


def dpt_large(device: torch.device) -> tuple[Callable, torch.nn.Module]:
    """(image processor, DPTForDepthEstimation) from annotator/ckpts/dpt-large (the Intel/dpt-large folder)."""
    from transformers import DPTForDepthEstimation, DPTImageProcessorPil
    folder = hub_folder(DPT_FOLDER, DPT_SOURCE, ("config.json", "preprocessor_config.json"))
    model = DPTForDepthEstimation.from_pretrained(folder).to(device).eval()
    return DPTImageProcessorPil.from_pretrained(folder), model


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_folder(name: str, source: str, required: Sequence[str | tuple[str, ...]]) -> str:
    """annotator/ckpts/NAME, a Hugging Face model folder holding the `required` files (a tuple: any one of them)
    and its weights, or a MissingWeightsError naming what to put there."""
    from annotator.util import MissingWeightsError, ckpts_dir
    folder = ckpts_dir() / name
    missing = [" or ".join(names) for names in [*((r,) if isinstance(r, str) else r for r in required), WEIGHT_FILES]
               if not any((folder / f).is_file() for f in names)]
    if missing:
        raise MissingWeightsError(f"{folder} lacks {', '.join(missing)}: download the files of {source} into it "
                                  f"(or point $CONTROLNET_ANNOTATOR_CKPTS at the folder that holds {name}/)")
    return str(folder)


class Segmentation(Task):
    """ADE20K segmentation mIoU as mmseg's IoUMetric computes it over the whole set: the label is the data's colour
    hint, each pixel the class of the nearest of ADE20K's 150 colours or, nearest black, no class (ignored, as
    reduce_zero_label makes the paper's class 0); each image is segmented by UperNet-UniFormer (annotator/
    uniformer, mmseg's whole-image inference); per class the intersection and union are summed over all images of
    all prompts, and the mIoU is the mean IoU over the classes present (union > 0), in %."""

    name, metric, higher_is_better = "seg", "mIoU (%)", True

    def __init__(self, device: str | torch.device = "cpu", hint_source: str | None = None,
                 segmenter: object | None = None) -> None:
        super().__init__(device, hint_source)
        from annotator.uniformer import UniformerDetector
        self.segmenter = segmenter or UniformerDetector(self.device)
        self.classes = len(ADE20K_PALETTE)

    def label_from_hint(self, hint: np.ndarray) -> np.ndarray:
        return classes_of(hint)

    def statistics(self, label: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        totals = np.zeros((2, self.classes), np.int64)
        for image in outputs:
            totals += intersect_and_union(self.segmenter.segment(image), label, self.classes)
        return totals.reshape(-1)

    @classmethod
    def value(cls, statistics: np.ndarray) -> float:
        return 100.0 * mean_iou(statistics.sum(0).reshape(2, -1))


def intersect_and_union(predicted: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """2 x classes: pixels per class where prediction and label agree, and in either (mmseg's intersect_and_union),
    over the pixels whose label is a class."""
    keep = label != NO_CLASS
    predicted, label = predicted[keep], label[keep]
    intersect = np.bincount(predicted[predicted == label], minlength=classes)[:classes]
    area_predicted = np.bincount(predicted, minlength=classes)[:classes]
    area_label = np.bincount(label, minlength=classes)[:classes]
    return np.stack([intersect, area_predicted + area_label - intersect])


def mean_iou(totals: np.ndarray) -> float:
    """Mean over the classes with a non-empty union of intersection / union (2 x classes sums)."""
    present = totals[1] > 0
    return float((totals[0, present] / totals[1, present]).mean()) if present.any() else math.nan


TASKS: dict[str, type[Task]] = {t.name: t for t in (Canny, HED, Lineart, Depth, Segmentation)}


# ---- running it ----

@dataclass
class ProtocolRun:
    """What a run gives: its condition (a name of TASKS) and the task's settings, the per-prompt statistics
    (N x d), and the prompts and sampling behind them. A report (`summarize`) holds all of it, so an earlier run
    comes back from its JSON (`from_summary`) to be compared with."""

    condition: str
    settings: dict
    statistics: np.ndarray
    prompts: list[str]
    sampling: Sampling
    image_size: tuple[int, int]  # (width, height) of the images as read and drawn

    @property
    def value(self) -> float:
        return TASKS[self.condition].value(self.statistics)

    @classmethod
    def from_summary(cls, summary: dict) -> "ProtocolRun":
        """The run a report of `summarize` describes."""
        task = TASKS[summary["condition"]]
        settings = {k: summary[k] for k in summary.get("task_settings", [])}
        per_prompt = summary["per_prompt"]
        return cls(task.name, settings, np.asarray(per_prompt["statistics"], dtype=np.float64), per_prompt["prompt"],
                   Sampling(**summary["sampling"]), tuple(summary["resolution"]))


def sample_uint8(item: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """(prompt, hint, target) of a reader's item, the images as uint8 HxWx3."""
    hint = (np.asarray(item[HINT]) * 255).round().astype(np.uint8)
    if hint.ndim == 3 and hint.shape[2] == 1:
        hint = np.repeat(hint, 3, axis=2)
    target = ((np.asarray(item[IMAGE]) + 1) * 127.5).round().astype(np.uint8)
    return item[CAPTION], hint, target


class ImageSink(ABC):
    """Something that sees every generated image beside its prompt and target (FID, CLIP score)."""

    @abstractmethod
    def update(self, prompt_index: int, prompt: str, target: np.ndarray, outputs: np.ndarray) -> None:
        """One prompt's target (H x W x 3) and its G images (G x H x W x 3), all uint8."""

    @abstractmethod
    def summary(self, resamples: int = 2000, seed: int = 0) -> dict:
        """The figure over all it has seen, for the report: metric, higher_is_better, value, and a 95% interval of
        `resamples` bootstrap resamples (ci95) where the figure has per-prompt parts."""


@torch.no_grad()
def run(model: torch.nn.Module, dataset: Sequence[dict], task: Task, n: int | None = None,
        sampling: Sampling = Sampling(), sinks: Sequence[ImageSink] = (),
        sizes: dict[str, tuple[int, int]] | None = None) -> ProtocolRun:
    """The protocol on the first n items of `dataset` (a reader of cldm.data; all when n is None), streamed a few
    prompts at a time so that no more than `sampling.batch_size` images are held."""
    n = len(dataset) if n is None else n
    if not 1 <= n <= len(dataset):
        raise ValueError(f"the held-out set holds {len(dataset)} samples; asked for {n}")
    if sampling.images_per_prompt < 1:
        raise ValueError(f"images per prompt must be at least 1, got {sampling.images_per_prompt}")
    per_call = max(1, sampling.batch_size // sampling.images_per_prompt)
    g = sampling.images_per_prompt
    prompts, statistics = [], []
    for start in range(0, n, per_call):
        chunk = [sample_uint8(dataset[i]) for i in range(start, min(start + per_call, n))]
        conditions = [task.condition(target, hint) for _, hint, target in chunk]
        hints = np.stack([h for h, _ in conditions for _ in range(g)])
        hint_tensor = torch.from_numpy(hints).permute(0, 3, 1, 2).float() / 255.0
        seeds = [s for i in range(start, start + len(chunk)) for s in sampling.seeds(i)]
        images = generate(model, [p for p, _, _ in chunk for _ in range(g)], hint_tensor, seeds, sampling.steps,
                          sampling.guidance_scale, len(seeds), sampling.sampler, sizes, sampling.negative_prompt)
        for k, ((prompt, _, target), (_, label)) in enumerate(zip(chunk, conditions)):
            outputs = images[k * g:(k + 1) * g]
            statistics.append(task.statistics(label, outputs))
            for sink in sinks:
                sink.update(start + k, prompt, target, outputs)
            prompts.append(prompt)
        log.info("%s: %d of %d prompts", task.name, len(prompts), n)
    height, width = chunk[0][2].shape[:2]
    return ProtocolRun(task.name, task.settings(), np.stack(statistics), prompts, sampling, (width, height))


# ---- intervals ----

def interval(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 2000,
             seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of statistic(prompt indices) over n prompts resampled with replacement
    (scipy.stats.bootstrap); (nan, nan) for fewer than two prompts."""
    if n < 2:
        return math.nan, math.nan
    result = bootstrap((np.arange(n),), lambda idx: statistic(idx.astype(np.int64)), vectorized=False,
                       n_resamples=resamples, confidence_level=0.95, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(run_: ProtocolRun, resamples: int = 2000, seed: int = 0) -> dict:
    """The reported number with its 95% interval, what it was measured on, and each prompt's statistics."""
    task, stats = TASKS[run_.condition], run_.statistics
    low, high = interval(lambda idx: task.value(stats[idx]), len(stats), resamples, seed)
    return {"condition": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "value": run_.value, "ci95": [low, high], "prompts": len(stats), **run_.settings,
            "task_settings": sorted(run_.settings),
            "resolution": list(run_.image_size), "sampling": asdict(run_.sampling),
            "differs_from_paper": sorted(k for k, v in asdict(run_.sampling).items()
                                         if k != "batch_size" and v != getattr(PAPER, k)),
            "per_prompt": {"prompt": run_.prompts, "statistics": stats.tolist()}}


def paired_difference(a: ProtocolRun, b: ProtocolRun, resamples: int = 2000, seed: int = 0) -> dict:
    """a's number minus b's with a 95% interval, the prompts resampled together: both runs must be of the same
    condition on the same prompts with the same seeds."""
    if a.condition != b.condition or a.settings != b.settings:
        raise ValueError(f"cannot compare a {a.condition} run ({a.settings}) with a {b.condition} run "
                         f"({b.settings})")
    if a.prompts != b.prompts or a.sampling.seeds(0) != b.sampling.seeds(0) or \
            a.sampling.images_per_prompt != b.sampling.images_per_prompt or a.image_size != b.image_size:
        raise ValueError("the two runs are not paired: their prompts, seeds or image sizes differ")
    task = TASKS[a.condition]
    low, high = interval(lambda idx: task.value(a.statistics[idx]) - task.value(b.statistics[idx]),
                         len(a.prompts), resamples, seed)
    return {"difference": a.value - b.value, "ci95": [low, high]}

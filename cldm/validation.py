"""Control fidelity while training: every N steps, sample a held-out set with fixed seeds and log how well the
control is obeyed, so a run shows the curve on which the paper's "sudden convergence" appears.

`ControlValidation` is a Lightning callback. At the start of a run (step 0, or the resumed step), every
`every` global steps and at the end, rank zero samples the held-out prompts with their hints through
`cldm.fidelity.evaluate` (hence `cldm.pipeline.sample`, the model's own network as a `model.unit(hint)`), sample
i from seed + i, under the training's autocast (`--precision`), and logs to every attached logger:

  val/<metric>             the mean over the held-out samples with control (the curve to watch)
  val/<metric>_no_control  the same samples without any control unit: the base's score to beat
  val/seconds              what the validation took
and a sheet of the first rows (hint | target | without control | with control) to TensorBoard and to
SAVE_DIR/image_log/val/fidelity_gs-<step>.png.

Without control, the samples depend only on the UNet, the VAE and the text encoder. When none of those trains
(sd_locked and every other mode that trains only `control_model`), they are sampled once per run and their
images and scores reused, which halves the cost; otherwise (sd_locked=False) they are sampled every time.

The other ranks do not validate; they go on to the next step's gradient all-reduce and wait there for rank
zero (so a validation must take less than the process group's timeout, 30 minutes by default). The sampling
calls the LightningModule itself, not the DDP wrapper, so it runs no collective operation. Strategies that shard
the weights (FSDP, DeepSpeed stage 3) would need every rank to sample, and are refused.
"""

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import Precision

from cldm.fidelity import CONDITIONS, Scorers, evaluate, is_fill_target, load_samples, save_png, sheet
from cldm.sharding import shards_weights
from ldm.checkpoint import UserError

log = logging.getLogger(__name__)

GENERAL_METRICS = ("canny", "ssim")  # apply to any data; "fill" only to Fill50K-type targets
SHEET_ROWS = 8
# tutorial_train's --val_* defaults; sampling as tool_eval_control.py's, so its numbers match the logged ones
DEFAULTS = {"every": 500, "samples": 16, "sampler": "ddim", "steps": 20, "scale": 3.0}


@dataclass(frozen=True)
class HeldOut:
    """The held-out samples: prompts, and hints and targets as uint8 BHWC, read from `root`."""

    root: str
    prompts: list[str]
    hints: np.ndarray
    targets: np.ndarray


def read_held_out(root: str | Path, n: int, **options) -> HeldOut:
    """The first n samples of a data root in any format (`options` go to cldm.data.open_dataset)."""
    if n < 1:
        raise UserError(f"--val_samples must be at least 1, got {n}")
    try:
        with torch.random.fork_rng():  # readers draw crops from torch's generator; the training's stays as it was
            prompts, hints, targets = load_samples(root, n, **options)
    except ValueError as err:
        raise UserError(f"--val_data {root}: {err}") from err
    return HeldOut(str(root), prompts, hints, targets)


def choose_metrics(held_out: HeldOut, metrics: Sequence[str] | None = None) -> list[str]:
    """The metrics asked for, or those that apply to the data: fill IoU when every target is Fill50K-type (one
    colour on another), canny F1 and SSIM always. A fill metric asked for on other targets is refused."""
    fill_type = [is_fill_target(t) for t in held_out.targets]
    if metrics is None:
        return (["fill"] if all(fill_type) else []) + list(GENERAL_METRICS)
    if "fill" in metrics and not all(fill_type):
        raise UserError(f"--val_metrics fill: sample {fill_type.index(False)} of {held_out.root} is not a "
                        "Fill50K-type target (one colour on a background of another)",
                        f"choose from {', '.join(GENERAL_METRICS)}, depth, seg")
    return list(metrics)


def no_control_trains(model: torch.nn.Module) -> bool:
    """Whether training changes what the model samples without control: the UNet, the VAE or the text encoder."""
    parts = (model.model, model.first_stage_model, model.conditioning_model)
    return any(p.requires_grad for part in parts if part is not None for p in part.parameters())


class ControlValidation(Callback):
    """Samples `held_out` with and without control every `every` global steps and logs the fidelity metrics and a
    sheet of images (module docstring). Sampling: `sampler` with `steps`, guidance `guidance_scale` against the
    empty prompt, sample i from seed + i, `batch_size` at a time."""

    def __init__(self, held_out: HeldOut, every: int, metrics: Sequence[str] | None = None, sampler: str = "ddim",
                 steps: int = 20, guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 16,
                 detector: str = "canny", save_dir: str | Path | None = None):
        super().__init__()
        if every < 1:
            raise UserError(f"--val_every must be at least 1, got {every}")
        if steps < 1:
            raise UserError(f"--val_steps must be at least 1, got {steps}")
        self.held_out, self.every = held_out, every
        self.metrics = choose_metrics(held_out, metrics)
        self.run = dict(seed=seed, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size,
                        sampler=sampler)
        self.detector, self.save_dir = detector, save_dir
        self.scorers: Scorers | None = None
        self.last_step = -1
        self.no_control: tuple[dict[str, np.ndarray], np.ndarray] | None = None  # scores, images, while constant

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if shards_weights(trainer.strategy):
            raise UserError(f"--val_data samples on rank zero alone, which {type(trainer.strategy).__name__} "
                            "cannot do: it splits the weights across ranks",
                            "train with --strategy ddp or deepspeed_stage_2, or drop --val_data")
        f = pl_module.vae_scale_factor
        h, w = self.held_out.hints.shape[1:3]
        if h % f or w % f:
            raise UserError(f"--val_data {self.held_out.root}: its images are {w}x{h}, not multiples of the VAE's "
                            f"{f} pixels", "bring them to the training size with --resolution")
        self.no_control = None  # another run (or a resumed one) may train another set of weights
        if trainer.is_global_zero and self.scorers is None:
            self.scorers = Scorers(self.metrics, self.detector, pl_module.device)
            for name, why in self.scorers.skipped.items():
                log.warning("--val_data: not scoring %s: %s", name, why)
            log.info("Validating on %d samples of %s every %d steps (%s, %d steps, guidance %g): %s",
                     len(self.held_out.prompts), self.held_out.root, self.every, self.run["sampler"],
                     self.run["steps"], self.run["guidance_scale"], ", ".join(self.scorers.functions) or "no metric")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validate(trainer, pl_module)

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate the model as it is at this global step, once per step (also under gradient accumulation)."""
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        if not trainer.is_global_zero:
            return
        started = time.perf_counter()
        scores, images = self.sample_and_score(pl_module, trainer.precision_plugin)
        values = {f"val/{metric}{'' if condition == 'control' else '_no_control'}": float(per_sample.mean())
                  for condition in CONDITIONS for metric, per_sample in scores[condition].items()}
        values["val/seconds"] = time.perf_counter() - started
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        self.log_sheet(trainer, images, step)
        log.info("validation at step %d (%.1f s): %s", step, values["val/seconds"],
                 ", ".join(f"{m} {scores['control'][m].mean():.3f} (without control {s.mean():.3f})"
                           for m, s in scores["no_control"].items()))

    def sample_and_score(self, model: pl.LightningModule, precision: Precision | None = None
                         ) -> tuple[dict, dict[str, np.ndarray]]:
        """Scores and images with and without control, under the training's `precision` (its autocast, which
        frozen weights in half precision compute in), of the EMA weights when the run keeps an EMA; the model's
        modules are left in their modes (sampling draws from its own seeded generators, not the training's)."""
        reuse = self.no_control is not None and not no_control_trains(model)
        conditions = ("control",) if reuse else CONDITIONS
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            h = self.held_out
            with precision.forward_context() if precision is not None else contextlib.nullcontext(), \
                    model.ema_scope():
                scores, images = evaluate(model, h.prompts, h.hints, h.targets, self.scorers,
                                          conditions=conditions, **self.run)
        finally:
            for m, training in modes.items():
                m.training = training
        if reuse:
            scores["no_control"], images["no_control"] = self.no_control
        else:
            self.no_control = scores["no_control"], images["no_control"]
        return scores, images

    def log_sheet(self, trainer: pl.Trainer, images: dict[str, np.ndarray], step: int) -> None:
        h = self.held_out
        size = h.hints.shape[1]
        zoom = 128 / size if size < 128 else min(1.0, 256 / size)  # cells of 128-256 px
        root = Path(self.save_dir or trainer.default_root_dir) / "image_log" / "val"
        root.mkdir(parents=True, exist_ok=True)
        page = sheet(h.hints, h.targets, images, h.prompts, SHEET_ROWS, zoom)
        save_png(root / f"fidelity_gs-{step:06}.png", page)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", page, step, dataformats="HWC")

"""Control fidelity while training: every N steps, sample a held-out set with fixed seeds and log how well the
control is obeyed, so a run shows the curve on which the paper's "sudden convergence" appears, and checkpoints
can be kept and training stopped by it.

`ControlValidation` is a Lightning callback over Lightning's validation loop. Every `every` global steps and at
the last step the loop runs the model's `validation_step` on the held-out samples (their diffusion loss,
val/loss_simple etc., on every rank), and then this callback samples the held-out prompts with their hints
through `cldm.fidelity.evaluate` (hence `cldm.pipeline.sample`, the model's own network as a `model.unit(hint)`),
sample i from seed + i, under the training's autocast (`--precision`), and logs on every rank, so that
ModelCheckpoint and EarlyStopping see them:

  val/<metric>             the mean over the held-out samples with control (the curve to watch)
  val/<metric>_no_control  the same samples without any control unit: the base's score to beat
  val/seconds              what the sampling took
and a sheet of the first rows (hint | target | without control | with control) to TensorBoard and to
SAVE_DIR/image_log/val/fidelity_gs-<step>.png. At the start of a run (step 0, or the resumed step) it samples
and logs the same once more, to the loggers only: the starting weights are no candidate for the best.

Without control, the samples depend only on the UNet, the VAE and the text encoder. When none of those trains
(sd_locked and every other mode that trains only `control_model`), they are sampled once per run and their
images and scores reused, which halves the cost; otherwise (sd_locked=False) they are sampled every time.

Only rank zero samples and scores; it sends the values to the others, which meanwhile only wait (the held-out
loss costs them a forward pass per sample). The sampling calls the LightningModule itself, not the DDP wrapper,
so it runs no collective operation. Under --strategy fsdp every rank holds only a part of the trained weights,
so every rank samples (the same images, in lock step), and rank zero scores; DeepSpeed stage 3 is refused.
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
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import Precision
from torch.utils.data import DataLoader, Dataset

from cldm.data.batch import HINT, ControlImageItem, ItemCheck
from cldm.fidelity import (
    CONDITIONS,
    LOWER_IS_BETTER,
    METRIC_KEYS,
    Scorers,
    evaluate,
    is_fill_target,
    load_samples,
    save_png,
    sheet,
)
from cldm.sharding import ShardedDataParallel, shards_weights
from cldm.training import last_batch
from ldm.batch import CAPTION, IMAGE
from ldm.checkpoint import UserError

log = logging.getLogger(__name__)

GENERAL_METRICS = ("canny", "ssim")  # apply to any data; "fill" only to Fill50K-type targets
SHEET_ROWS = 8
# tutorial_train's --val_* defaults; sampling as tool_eval_control.py's, so its numbers match the logged ones
DEFAULTS = {"every": 500, "samples": 16, "sampler": "ddim", "steps": 20, "scale": 3.0}


# What the model's validation_step logs on the held-out samples (DDPM.p_losses' names, and with the EMA weights).
HELD_OUT_LOSSES = tuple(f"val/{name}{ema}" for name in ("loss_simple", "loss_vlb", "loss") for ema in ("", "_ema"))


@dataclass(frozen=True)
class HeldOut:
    """The held-out samples: prompts, and hints and targets as uint8 BHWC, read from `root`."""

    root: str
    prompts: list[str]
    hints: np.ndarray
    targets: np.ndarray


class HeldOutItems(Dataset):
    """The held-out samples as the training's items: the target in [-1, 1], the hint in [0, 1], the prompt."""

    def __init__(self, held_out: HeldOut) -> None:
        self.held_out = held_out

    def __len__(self) -> int:
        return len(self.held_out.prompts)

    def __getitem__(self, i: int) -> ControlImageItem:
        h = self.held_out
        return {IMAGE: h.targets[i].astype(np.float32) / 127.5 - 1.0, CAPTION: h.prompts[i],
                HINT: h.hints[i].astype(np.float32) / 255.0}


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
        self.scorers: Scorers | None = None  # where samples are drawn: rank zero, and under fsdp every rank
        self.no_control: tuple[dict[str, np.ndarray], np.ndarray] | None = None  # scores, images, while constant

    def logged(self) -> dict[str, str]:
        """Every value a validation logs, with "max" or "min" for the better direction."""
        fidelity = {f"val/{key}{suffix}": "min" if key in LOWER_IS_BETTER else "max"
                    for metric in self.metrics for key in METRIC_KEYS[metric] for suffix in ("", "_no_control")}
        return {**fidelity, "val/seconds": "min", **{name: "min" for name in HELD_OUT_LOSSES}}

    def loader(self) -> DataLoader:
        """The held-out samples as training items, for the validation loop's held-out loss; every rank reads all of
        them, so that every rank runs the same forward passes. One at a time: validation_step seeds each batch, so
        each sample draws the same noise whatever the batch size and the number of ranks."""
        # its own generator: an iteration draws a seed, which the training's generator must not give
        return DataLoader(HeldOutItems(self.held_out), batch_size=1, collate_fn=ItemCheck("--val_data"),
                          generator=torch.Generator().manual_seed(0))

    def trainer_options(self, accumulate_grad_batches: int) -> dict:
        """Lightning's schedule of this validation: every `every` global steps across epochs, no sanity check (the
        run's start is validated by on_train_start)."""
        return dict(val_check_interval=self.every * accumulate_grad_batches, check_val_every_n_epoch=None,
                    num_sanity_val_steps=0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if shards_weights(trainer.strategy) and not isinstance(trainer.strategy, ShardedDataParallel):
            raise UserError(f"--val_data cannot sample under {type(trainer.strategy).__name__}: it splits every "
                            "weight across ranks", "train with --strategy fsdp or ddp, or drop --val_data")
        f = pl_module.vae_scale_factor
        h, w = self.held_out.hints.shape[1:3]
        if h % f or w % f:
            raise UserError(f"--val_data {self.held_out.root}: its images are {w}x{h}, not multiples of the VAE's "
                            f"{f} pixels", "bring them to the training size with --resolution")
        self.no_control = None  # another run (or a resumed one) may train another set of weights
        if self.scorers is None and not trainer.is_global_zero and isinstance(trainer.strategy, ShardedDataParallel):
            self.scorers = Scorers([])  # it samples with rank zero, which scores
        if trainer.is_global_zero and self.scorers is None:
            self.scorers = Scorers(self.metrics, self.detector, pl_module.device)
            for name, why in self.scorers.skipped.items():
                log.warning("--val_data: not scoring %s: %s", name, why)
            log.info("Validating on %d samples of %s every %d steps (%s, %d steps, guidance %g): %s",
                     len(self.held_out.prompts), self.held_out.root, self.every, self.run["sampler"],
                     self.run["steps"], self.run["guidance_scale"], ", ".join(self.scorers.functions) or "no metric")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_values(trainer, self.validate(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # Lightning validates once more before a stop it is told of: the last step's weights are validated too
        trainer.should_stop = trainer.should_stop or last_batch(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self.validate(trainer, pl_module)
        self.log_values(trainer, values)
        pl_module.log_dict(values, logger=False, sync_dist=True)  # every rank: ModelCheckpoint, EarlyStopping
        # the held-out loss of validation_step goes to the loggers at the global step, not one step earlier
        pl_module.log("step", float(trainer.global_step), sync_dist=True)

    @staticmethod
    def log_values(trainer: pl.Trainer, values: dict[str, float]) -> None:
        """To the loggers at the global step, as they are (Lightning's own logging would round them to float32)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Sample and score the model as it is at this global step (rank zero; under fsdp every rank samples);
        the values, which every rank returns, are rank zero's."""
        step = trainer.global_step
        values: dict[str, float] = {}
        if self.scorers is not None:  # rank zero, and under fsdp every rank
            started = time.perf_counter()
            scores, images = self.sample_and_score(pl_module, trainer.precision_plugin)
            values = {f"val/{metric}{'' if condition == 'control' else '_no_control'}": float(per_sample.mean())
                      for condition in CONDITIONS for metric, per_sample in scores[condition].items()}
            values["val/seconds"] = time.perf_counter() - started
            if trainer.is_global_zero:
                self.log_sheet(trainer, images, step)
                log.info("validation at step %d (%.1f s): %s", step, values["val/seconds"],
                         ", ".join(f"{m} {scores['control'][m].mean():.3f} (without control {s.mean():.3f})"
                                   for m, s in scores["no_control"].items()))
        return trainer.strategy.broadcast(values, src=0)

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


def config_monitor(config: str | Path) -> str | None:
    """The config's `monitor`: the validation value that chooses checkpoints (the original ldm's setting)."""
    return (OmegaConf.load(config).model.get("params") or {}).get("monitor")


def selection_callbacks(validation: ControlValidation | None, keep_best: int, monitor: str | None, mode: str | None,
                        patience: int | None, checkpoint_dir: Path, source: str) -> list[Callback]:
    """--keep_best K and --early_stop_patience N: Lightning's ModelCheckpoint keeping the K best checkpoints in
    CHECKPOINT_DIR/best/, and its EarlyStopping, by the validation value `monitor` (named by `source`), better when
    larger with `mode` max. Both act after each validation (Lightning's validation loop), on every rank
    (cldm.training.LastCheckpoint writes last.ckpt again after them)."""
    if keep_best < 0 or (patience is not None and patience < 1):
        raise UserError(f"--keep_best must be 0 or more and --early_stop_patience 1 or more, got {keep_best} and "
                        f"{patience}")
    if not keep_best and patience is None:
        return []
    if validation is None:
        raise UserError("--keep_best and --early_stop_patience choose by a validation value, and no --val_data is "
                        "given", "name a held-out data root with --val_data")
    logged = validation.logged()
    if monitor not in logged:
        raise UserError(f"{source} {monitor} is not a value the validation logs",
                        f"choose --monitor from {', '.join(logged)}")
    mode = mode or logged[monitor]
    callbacks: list[Callback] = []
    if keep_best:
        name = monitor.replace("/", "_")
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir / "best", monitor=monitor, mode=mode,
                                         filename=f"step-{{step:06d}}-{name}-{{{monitor}:.4f}}", save_top_k=keep_best,
                                         auto_insert_metric_name=False, enable_version_counter=False))
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience, verbose=True))
    log.info("Choosing by %s (%s is better)%s%s", monitor, "more" if mode == "max" else "less",
             f": the {keep_best} best checkpoints kept in {checkpoint_dir / 'best'}" if keep_best else "",
             f"; stopping after {patience} validations without improvement" if patience is not None else "")
    return callbacks

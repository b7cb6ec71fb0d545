"""Training a ControlLDM so that it cannot go wrong without a word: settings, resume, outputs, latent caches.

- Settings: the YAML governs; a command-line option overrides it only when given. On resume every setting that
  differs from the checkpoint's run is logged, and takes effect (learning rate, sd_locked, only_mid_control,
  prompt dropout) or is refused by name (the optimizer, whose state would not carry over).
- Resume: `--resume` must be a Lightning checkpoint of this config; anything else is named for what it is.
  A changed trainable set (sd_locked) keeps weights and global step; the optimizer state is carried over by
  parameter name, so newly trainable tensors start fresh and the others keep theirs.
- Outputs: a new run never overwrites an earlier run's checkpoints without --force; checkpoints are written
  atomically, and a full disk is reported as such.
- Latent caches: a cache made with another VAE or text encoder than the model's is refused (by a fingerprint
  of their weights, not a path).
"""

import inspect
import logging
import os
import warnings
from collections.abc import Mapping
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states  # Lightning's own, unexported
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Checkpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.checkpoint import (
    ENCODER_PREFIXES,
    SAFETENSORS,
    SHARDED_INDEX,
    UserError,
    atomic_output,
    is_sharded_checkpoint,
    read_checkpoint,
    read_sharded_tensors,
    require_finite,
    save_torch,
    sniff,
    state_dict_of,
    weights_fingerprint,
)
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.modules.ema import EMA_KEY
from ldm.util import get_obj_from_str

log = logging.getLogger(__name__)
info = rank_zero_only(log.info)
warn = rank_zero_only(log.warning)

# Training settings: the config's model parameter (and command-line option) of each name -> the model attribute
# that holds it. The config governs; an option given on the command line overrides it.
TRAINING_OPTIONS = {"learning_rate": "learning_rate", "sd_locked": "sd_locked", "only_mid_control": "only_mid_control",
                    "drop_prompt_rate": "drop_prompt_rate", "optimizer": "optimizer_name",
                    "max_nan_steps": "max_nan_steps", "snr_gamma": "objective.snr_gamma",
                    "noise_offset": "objective.noise_offset", "zero_terminal_snr": "zero_terminal_snr",
                    "use_ema": "use_ema", "ema_decay": "ema_decay", "reward": "reward_name",
                    "reward_weight": "reward_weight", "reward_max_t": "reward_max_t"}
# Settings whose change on resume cannot take effect: the optimizer state is the optimizer's own.
FIXED_ON_RESUME = ("optimizer",)
# Where a ControlLDM checkpoint records its training settings and its optimizer's parameter names.
TRAINING_STATE = "control_training"
PARAM_GROUPS = "param_groups"
ENCODERS_FINGERPRINT = "encoders_fingerprint"  # meta.json of a latent cache: dtype name -> fingerprint
FINGERPRINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def training_settings(model: torch.nn.Module) -> dict[str, Any]:
    return {option: attrgetter(attr)(model) for option, attr in TRAINING_OPTIONS.items()}


def given_options(args: Any) -> dict[str, Any]:
    """The training options given on the command line (argparse default None: not given); --ema_decay alone also
    turns the EMA on."""
    given = {option: getattr(args, option) for option in TRAINING_OPTIONS if getattr(args, option) is not None}
    if "ema_decay" in given:
        if given.get("use_ema") is False:
            raise UserError(f"--ema_decay {given['ema_decay']} with --use_ema False would do nothing",
                            "drop one of them")
        given["use_ema"] = True
    return given


def config_settings(config: str | os.PathLike) -> dict[str, Any]:
    """The training settings a model config gives: its `model.params`, else the defaults of the model class."""
    model = OmegaConf.load(config).model
    params = model.get("params") or {}
    defaults: dict[str, Any] = {}
    for cls in reversed(get_obj_from_str(model.target).__mro__):  # a subclass's default wins
        if "__init__" in vars(cls):
            defaults |= {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                         if p.default is not inspect.Parameter.empty}
    return {option: params[option] if option in params else defaults.get(option) for option in TRAINING_OPTIONS}


def config_overrides(config: str | os.PathLike, given: Mapping[str, Any]) -> dict[str, Any]:
    """The model parameters that the options given on the command line override (create_model's `params`); each
    that differs from the config is logged."""
    configured = config_settings(config)
    for option, value in given.items():
        if value != configured[option]:
            info("%s = %s (from the command line; the config says %s)", option, value, configured[option])
    return dict(given)


def compare_with_resumed(model: torch.nn.Module, given: Mapping[str, Any], resumed: Mapping,
                         resume_path: str | os.PathLike) -> None:
    """On resume, compare the model's settings with the checkpoint's run: each difference is logged, or refused
    where it cannot take effect."""
    saved = resumed.get(TRAINING_STATE, {})
    for option, value in training_settings(model).items():
        if option not in saved or saved[option] == value:
            continue
        source = "the command line" if option in given else "the config"
        if option in FIXED_ON_RESUME:
            raise UserError(f"--{option} {value} (from {source}): {resume_path} was trained with {option} "
                            f"{saved[option]}, whose state does not carry over to {value}",
                            f"resume with --{option} {saved[option]}, or start a new run from its weights "
                            f"with --resume_path")
        if option in given:
            info("Resuming with %s = %s (from %s); the checkpoint's run had %s", option, value, source, saved[option])
        else:  # a setting of the run's command line that this one leaves out: said, since it changes the training
            warn("Resuming with %s = %s (from %s); the checkpoint's run had %s (pass --%s %s to keep it)", option,
                 value, source, saved[option], option, saved[option])


def read_resume_checkpoint(path: str | os.PathLike) -> dict:
    """The Lightning checkpoint --resume names (tensors memory-mapped), or an error saying what the file is.

    A sharded checkpoint folder (--strategy fsdp) gives its weights' shapes alone (on the meta device): the
    strategy reads the weights themselves.
    """
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise UserError(f"--resume {path} is a folder but not a sharded checkpoint (it has no {SHARDED_INDEX})",
                        "name a Lightning checkpoint such as OUTPUT_DIR/checkpoints/last.ckpt")
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such file (a Lightning checkpoint such as "
                                f"OUTPUT_DIR/checkpoints/last.ckpt)")
    if path.is_file() and sniff(path) == SAFETENSORS:
        raise UserError(f"--resume {path} is a safetensors weights file, not a Lightning checkpoint "
                        f"(weights, optimizer state and step)",
                        f"to start a new run from these weights, pass them as --resume_path {path}")
    checkpoint = read_checkpoint(path, location="meta") if path.is_dir() else read_checkpoint(path, mmap=True)
    # a sharded checkpoint's optimizer state is in its shards, not in Lightning's dict
    required = {"pytorch-lightning_version", "state_dict", "loops", *(["optimizer_states"] * path.is_file())}
    if not (isinstance(checkpoint, dict) and required <= checkpoint.keys()):
        tensors = state_dict_of(checkpoint, path)
        raise UserError(f"--resume {path} holds weights only ({len(tensors)} tensors), not a Lightning checkpoint "
                        f"with optimizer state and step",
                        f"to start a new run from these weights, pass them as --resume_path {path}")
    return checkpoint


def load_resumed_weights(model: torch.nn.Module, checkpoint: dict, path: str | os.PathLike,
                         config: str | os.PathLike, control_prefix: str) -> None:
    """The weights of a --resume checkpoint, which must be exactly this config's model's, all finite (the noise
    schedule excepted, which follows from the config: a resumed run may rescale it to zero terminal SNR). A sharded
    checkpoint's (shapes alone) are only checked: the strategy loads them."""
    derived = set(SCHEDULE_BUFFERS) - dict(model.named_parameters()).keys()  # a learned logvar is a weight
    state = {k: v for k, v in state_dict_of(checkpoint, path).items() if k not in derived}
    own = {k: v for k, v in model.state_dict().items() if k not in derived}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing and all(k.startswith(control_prefix) for k in missing):
        raise UserError(f"--resume {path} holds a model without its control network ({len(missing)} "
                        f"{control_prefix}* keys missing), not a training checkpoint of {config}",
                        "make an initial checkpoint with tool_add_control.py and start from it with --resume_path")
    if missing or unexpected or wrong:
        found = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                 (("keys missing", missing), ("unexpected keys", unexpected), ("shapes differ", wrong)) if keys]
        raise UserError(f"--resume {path} was not trained with {config}: {', '.join(found)}",
                        "pass the --config it was trained with")
    if any(v.is_meta for v in state.values()):
        return
    require_finite(state, path)
    model.load_state_dict(state, strict=False)  # every key but the schedule's is checked above


def check_sharded_resume(model: torch.nn.Module, checkpoint: Mapping, path: str | os.PathLike, sharded: bool) -> None:
    """A sharded checkpoint resumes under --strategy fsdp (`sharded`), with any number of processes. Under it the
    strategy restores the optimizer's state itself, for exactly the tensors that trained when the checkpoint was
    saved: a run that trains another set (a changed sd_locked) is refused."""
    if not sharded:
        if is_sharded_checkpoint(path):
            raise UserError(f"--resume {path} is a sharded checkpoint (of --strategy fsdp), which only that strategy "
                            "resumes", f"resume with --strategy fsdp (any number of devices), or start a new run "
                            f"from its weights with --resume_path {path}")
        return
    saved = checkpoint.get(TRAINING_STATE, {})
    if PARAM_GROUPS not in saved:
        return
    old = {n for group in saved[PARAM_GROUPS] for n in group}
    new = {n for group in optimizer_param_names(model, fresh_optimizer(model)) for n in group}
    if old != new:
        changed = sorted(old ^ new)
        raise UserError(f"--resume {path} under --strategy fsdp: the checkpoint's optimizer state covers the "
                        f"{len(old)} tensors it trained, this run trains {len(new)} ({len(changed)} differ, e.g. "
                        f"{changed[0]}), and a sharded optimizer state cannot be carried over to another set",
                        f"resume with the settings it was trained with (sd_locked {saved.get('sd_locked')}), or "
                        f"start a new run from its weights with --resume_path {path}")


def check_fresh_output(checkpoint_dir: str | os.PathLike, resume: str | None, force: bool) -> None:
    """A new run into a folder with an earlier run's checkpoints would overwrite them: refuse without --force."""
    checkpoint_dir = Path(checkpoint_dir)
    earlier = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if resume is not None or not earlier:
        return
    if force:
        info("--force: checkpoints of an earlier run in %s (%s) will be overwritten", checkpoint_dir,
             ", ".join(earlier))
        return
    last = checkpoint_dir / ("last.ckpt" if "last.ckpt" in earlier else earlier[-1])
    raise UserError(f"{checkpoint_dir} holds checkpoints of an earlier run ({', '.join(earlier[:4])}"
                    f"{', ...' * (len(earlier) > 4)}), which a new run would overwrite",
                    f"continue that run with --resume {last}, choose another --output_dir, or pass --force")


def encoders_fingerprints(model: torch.nn.Module) -> dict[str, str]:
    """Fingerprints of the frozen VAE and text encoder(s), whose outputs a latent cache holds: of their weights
    as they are, and rounded to each dtype --frozen_dtype may hold them in (a resumed run's come so)."""
    state = encoder_weights(model)
    return {name: weights_fingerprint(cast_floats(state, dtype)) for name, dtype in FINGERPRINT_DTYPES.items()}


def encoder_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def cast_floats(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def check_cache(model: torch.nn.Module, meta: Mapping, cache_dir: str | os.PathLike) -> None:
    """Refuse a latent cache made with other VAE or text encoder weights than the model's."""
    rebuild = f"rebuild it with tool_cache_latents.py --ckpt <this run's initial checkpoint> --out {cache_dir} --force"
    if ENCODERS_FINGERPRINT not in meta:
        raise UserError(f"{cache_dir} records no fingerprint of the VAE and text encoder it was made with "
                        f"(made by an older tool_cache_latents.py), so it cannot be checked against this model",
                        rebuild)
    recorded, state = meta[ENCODERS_FINGERPRINT], encoder_weights(model)
    if not any(recorded.get(name) == weights_fingerprint(cast_floats(state, dtype))
               for name, dtype in FINGERPRINT_DTYPES.items()):
        raise UserError(f"{cache_dir} was made with another VAE / text encoder (from {meta.get('ckpt', '?')}) "
                        f"than this run's model: its latents and text embeddings do not fit it", rebuild)


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of the parameters in each of the optimizer's groups, in order (its state is indexed so)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


def checkpoint_averages(checkpoint: Mapping, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The EMA of the trained weights that a training checkpoint (`checkpoint`, read from `path`) holds in its
    optimizer's state, by parameter name; {} for a run without EMA or a file that is not a training checkpoint."""
    if is_sharded_checkpoint(path):  # the optimizer's state is kept by parameter name there
        return read_sharded_tensors(path, "optimizer_0.state.", "." + EMA_KEY)
    states, names = checkpoint.get("optimizer_states"), checkpoint.get(TRAINING_STATE, {}).get(PARAM_GROUPS)
    if not isinstance(states, list) or len(states) != 1 or names is None:
        return {}
    by_index = {index: name for group, group_names in zip(states[0]["param_groups"], names)
                for index, name in zip(group["params"], group_names)}
    return {by_index[index]: state[EMA_KEY] for index, state in states[0]["state"].items()
            if EMA_KEY in state and by_index.get(index)}


def weights_to_use(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a file to sample with, score or convert: its tensors, and for a training checkpoint of a run
    with EMA the EMA of its trained tensors in their place (logged): what the run validated, chose its best
    checkpoints by and exported. A training continues from the raw ones (load_state_dict)."""
    checkpoint = read_checkpoint(path)
    state_dict = state_dict_of(checkpoint, path)
    averages = checkpoint_averages(checkpoint, path) if isinstance(checkpoint, dict) else {}
    if averages:
        log.info("%s: the EMA of its %d trained tensors in place of the raw weights", path, len(averages))
    return {**state_dict, **averages}


def training_state(model: torch.nn.Module) -> dict:
    """What a checkpoint records besides weights and optimizer state: the settings and the optimizer's names."""
    state = training_settings(model)
    trainer = model._trainer
    if trainer is not None and len(trainer.optimizers) == 1:
        state[PARAM_GROUPS] = optimizer_param_names(model, trainer.optimizers[0])
    return state


def fresh_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer this run builds (configure_optimizers returns it alone, or with schedulers)."""
    built = model.configure_optimizers()
    return built[0][0] if isinstance(built, (list, tuple)) else built


def adapt_optimizer_state(model: torch.nn.Module, checkpoint: dict) -> None:
    """Make a checkpoint's optimizer state fit this run's optimizer (called before Lightning restores it).

    A changed trainable set (sd_locked) carries each tensor's state over by name: newly trainable tensors start
    fresh, the others keep theirs. A changed learning rate scales every group's rate (and schedulers' bases).
    """
    saved = checkpoint.get(TRAINING_STATE, {})
    if not model.trainer.strategy.lightning_restore_optimizer and len(model.trainer.optimizers) == 1:
        # a sharding strategy has restored the optimizer itself, for the same trainable tensors
        # (check_sharded_resume); only a changed learning rate is left to apply, to the live optimizer
        scale_learning_rate(model, saved, model.trainer.optimizers[0].param_groups, checkpoint)
        return
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1:
        return
    optimizer = fresh_optimizer(model)
    names = optimizer_param_names(model, optimizer)
    old_names = saved.get(PARAM_GROUPS)
    if old_names is None:
        if "sd_locked" in saved and saved["sd_locked"] != model.sd_locked:
            raise UserError(f"the checkpoint was trained with sd_locked={saved['sd_locked']} and records no "
                            f"optimizer layout (an older version), so its optimizer state cannot be carried over",
                            f"resume with --sd_locked {saved['sd_locked']}")
        old_names = names
    if names != old_names:
        states[0] = carry_state_by_name(states[0], old_names, optimizer, names)
        schedulers = checkpoint.get("lr_schedulers") or []
        rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for scheduler in schedulers:
            if len(scheduler.get("base_lrs", rates)) != len(rates):
                scheduler["base_lrs"], scheduler["_last_lr"] = list(rates), list(rates)
    else:
        scale_learning_rate(model, saved, states[0]["param_groups"], checkpoint)


def scale_learning_rate(model: torch.nn.Module, saved: Mapping, param_groups: list[dict], checkpoint: dict) -> None:
    """A learning rate changed on resume scales every parameter group's rate (and the schedulers' bases)."""
    if saved.get("learning_rate", model.learning_rate) == model.learning_rate or not saved["learning_rate"]:
        return
    factor = model.learning_rate / saved["learning_rate"]
    for group in param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    for scheduler in checkpoint.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr"):
            if key in scheduler:
                scheduler[key] = [rate * factor for rate in scheduler[key]]
    info("Learning rate %s -> %s: every parameter group's rate scaled by %g, optimizer state kept",
         saved["learning_rate"], model.learning_rate, factor)


def carry_state_by_name(saved: dict, old_names: list[list[str]], optimizer: torch.optim.Optimizer,
                        names: list[list[str]]) -> dict:
    """The optimizer state dict of `optimizer`'s layout, with each parameter's saved state found by its name."""
    old_index = {name: i for i, name in enumerate(n for group in old_names for n in group)}
    flat = [n for group in names for n in group]
    state = {i: saved["state"][old_index[n]] for i, n in enumerate(flat)
             if n in old_index and old_index[n] in saved["state"]}
    groups, start = [], 0
    for group, group_names in zip(optimizer.state_dict()["param_groups"], names):
        groups.append({**group, "params": list(range(start, start + len(group_names)))})
        start += len(group_names)
    fresh = [n for n in flat if n not in old_index]
    dropped = [n for n in old_index if n not in set(flat)]
    info("Trainable tensors changed on resume: %d start training with fresh optimizer state%s, %d keep theirs, "
         "%d stop training%s", len(fresh), f" (e.g. {fresh[0]})" if fresh else "", len(state), len(dropped),
         f" (e.g. {dropped[0]})" if dropped else "")
    return {"state": state, "param_groups": groups}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through a temp file renamed into place (ldm.checkpoint.atomic_output):
    an interrupted or failed save leaves the previous checkpoint whole, and a full disk is named as such."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any | None = None) -> None:
        with atomic_output(path, force=True) as tmp:
            save_torch(checkpoint, tmp)


def run_loggers(output_dir: str | os.PathLike) -> list[pl.loggers.Logger]:
    """TensorBoard and CSV loggers writing into one `lightning_logs/version_N` (each would pick its own N)."""
    # The CSV logger warns that it "will delete" earlier files when its folder holds any: here TensorBoard's, of
    # this run, which it leaves alone (it removes only a metrics.csv, and the folder is new).
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    tensorboard = TensorBoardLogger(output_dir)
    return [tensorboard, CSVLogger(output_dir, version=tensorboard.version)]


def latest_metrics_csv(output_dir: str | os.PathLike) -> Path:
    """The CSV logger's file (run_loggers) of the newest run under output_dir/lightning_logs."""
    logs = Path(output_dir) / "lightning_logs"
    files = sorted(logs.glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no training log under {logs}")
    return files[-1]


class EpochProgressBar(RichProgressBar):
    """Lightning's progress bar, which shows "Epoch 3/-2" when the run is bounded by steps (max_epochs -1): then
    it shows the epoch alone, the global step being in the bar's metrics."""

    def _get_train_description(self, current_epoch: int) -> str:  # the one hook Lightning gives for the label
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        label = f"Epoch {current_epoch}"
        return f"{label:{len(self.validation_description)}}"


def progress_bar() -> list[pl.Callback]:
    """The progress bar to add to a Trainer's callbacks (Lightning's own TQDM bar, which has no such label, when
    rich is not installed)."""
    return [EpochProgressBar()] if _RICH_AVAILABLE else []


def last_batch(trainer: pl.Trainer) -> bool:
    """Whether the training ends after this batch: its last step, or the last batch of its last epoch."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    return (epochs is not None and trainer.current_epoch + 1 >= epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class LastCheckpoint(Checkpoint):
    """Writes `last` every `every` global steps and at the run's last step, from inside the training loop, and again
    after a validation that stopped the run or (`choosing`: --keep_best, --early_stop_patience) chose something at
    a step it was written at, so that a run resumed from it knows what that validation chose and goes on where it
    stopped. Lightning's state after fit counts a cut-short epoch as finished, so a checkpoint written then (as
    ModelCheckpoint's save_last does at the end) would resume in a new epoch: other samples, the epoch count one
    ahead, an epoch-bounded run ending early. A Checkpoint, so that Lightning runs it after the ModelCheckpoints."""

    def __init__(self, last: Path, every: int, choosing: bool = False) -> None:
        self.last, self.every, self.choosing = last, every, choosing
        self.saved_step: int | None = None  # the global step `last` holds
        self.start_step = 0  # the global step the run started (or resumed) at

    def save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.last)
        self.saved_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # once per update: with gradient accumulation the step stays put for the micro-batches between updates
        step = trainer.global_step
        if step not in (self.saved_step, self.start_step) and (step % self.every == 0 or last_batch(trainer)):
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.should_stop or (
                self.choosing and self.saved_step == trainer.global_step)):
            self.save(trainer)


class RandomState(pl.Callback):
    """The random generators' states (torch, CUDA, numpy, Python) of every rank, saved in checkpoints and set again
    when training resumes, so that a resumed run draws the same noise, timesteps, prompt dropout and augmentations
    as a run never interrupted (Lightning restores the weights, the optimizer and the loops, not the generators).

    Where they are set again follows what the uninterrupted run did next: a checkpoint saved at the end of an epoch
    is followed by the next epoch's data loader, which draws a seed, so they are set before the resumed run makes
    its loader; one saved within an epoch is followed by the next batch of a loader already made, so they are set
    after (the resumed run makes its loader before on_train_start)."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None
        self.trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        mine = storable_rng_states(_collect_rng_states())
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)  # Lightning asks every rank for the state
        epoch_ended = self.trainer is not None and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {"ranks": ranks, "epoch_ended": bool(epoch_ended)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = state_dict
        if state_dict["epoch_ended"]:
            self.restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.saved is not None:
            self.restore()

    def restore(self) -> None:
        ranks, self.saved = self.saved["ranks"], None
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if len(ranks) != world:
            info("The checkpoint's random states are of %d processes, this run has %d: its noise and augmentations "
                 "are not those of an uninterrupted run", len(ranks), world)
            return
        _set_rng_states(loadable_rng_states(ranks[rank]))


def storable_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """Lightning's collected generator states in types that a weights-only checkpoint load accepts (numpy's key
    array as a tensor)."""
    name, keys, position, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}


def loadable_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    name, keys, position, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, keys.numpy().astype(np.uint32), position, has_gauss, gauss)}

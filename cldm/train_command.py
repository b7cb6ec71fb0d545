"""The training command line, as the original tutorial has it: tutorial_train.py and its SD2.1 twin run this.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tutorial_train.py                      # the original's settings
    python tutorial_train.py --devices 2 --strategy ddp --precision bf16-mixed --drop_prompt_rate 0.5
    python tool_cache_latents.py --ckpt ./models/control_sd15_ini.ckpt --out ./training/fill50k_cache
    python tutorial_train.py --cached_latents ./training/fill50k_cache --precision bf16-mixed \\
        --gradient_checkpointing False                  # fast; benchmarks/RESULTS.md has the low-memory recipes

Writes image_log/ (ImageLogger grids), checkpoints/ (Lightning checkpoints every --checkpoint_every
steps and at the end, last.ckpt kept; continue with --resume checkpoints/last.ckpt) and a control-only
export (`control_model.*` in safetensors, like the ControlNet 1.1 files) under --output_dir.
"""

import argparse
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from cldm.cli import devices_arg, given_on_command_line, refuse_existing, str2bool
from cldm.controlnet_union import control_type_params
from cldm.data import (
    FORMATS,
    BadSampleError,
    KohyaDataset,
    PairedImageDataset,
    Resize,
    detect_format,
    open_dataset,
)
from cldm.data.base import select_samples
from cldm.data.images import set_max_image_pixels
from cldm.data.kohya_config import DatasetConfig, read_dataset_config
from cldm.data.latent_cache import CachedDataset
from cldm.data.loading import SkippedSamples, TrainData, report_captions, sample_error_message
from cldm.data.options import add_format_arguments, add_resize_arguments, format_options
from cldm.fidelity import METRICS
from cldm.loader import load_model
from cldm.logger import ImageLogger
from cldm.model import CONTROL_PREFIX, create_model, save_state_dict
from cldm.reward import PAPER_MAX_T, REWARDS, images_needed
from cldm.sharding import FSDP_STRATEGIES, check_strategy, full_tensors, make_strategy
from cldm.training import (
    TRAINING_STATE,
    AtomicCheckpointIO,
    LastCheckpoint,
    RandomState,
    check_cache,
    check_fresh_output,
    check_sharded_resume,
    compare_with_resumed,
    config_overrides,
    config_settings,
    given_options,
    load_resumed_weights,
    progress_bar,
    read_resume_checkpoint,
    run_loggers,
)
from cldm.validation import DEFAULTS as VALIDATION
from cldm.validation import ControlValidation, config_monitor, read_held_out, selection_callbacks
from ldm.batch import BatchKeyError
from ldm.checkpoint import UserError, is_sharded_checkpoint
from ldm.models.diffusion.ddpm import COMPILE_MODES, OPTIMIZERS, TrainingStopped
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.modules.diffusionmodules.openaimodel import set_gradient_checkpointing
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

log = logging.getLogger(__name__)


def build_parser(config: str, resume_path: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=config, help="model YAML (default %(default)s)")
    p.add_argument("--resume_path", default=None,
                   help=f"initial weights made by tool_add_control.py (default {resume_path}); 'none' starts "
                        "from the config's random weights")
    p.add_argument("--resume", default=None, help="Lightning checkpoint to continue from, e.g. checkpoints/last.ckpt")
    p.add_argument("--data_root", default=None,
                   help="data folder or shard URI (default ./training/fill50k, or the one a --cached_latents cache "
                        "records)")
    p.add_argument("--image_size", type=int, default=None,
                   help="stretch images to this square size, ignoring their aspect ratio (the original's sizing; "
                        "see --resolution)")
    p.add_argument("--batch_size", type=int, default=None, help="(default 4, or a --dataset_config's batch_size)")
    model = p.add_argument_group("training settings (default: the config's; on resume, a change is logged)")
    model.add_argument("--learning_rate", type=float, default=None, help="(the original's: 1e-5)")
    model.add_argument("--sd_locked", type=str2bool, default=None,
                       help="False also trains the UNet's decoder (the original's: True)")
    model.add_argument("--only_mid_control", type=str2bool, default=None,
                       help="True adds only the middle block's residual (the original's: False)")
    model.add_argument("--drop_prompt_rate", type=float, default=None,
                       help="probability of training on an empty prompt (the paper uses 0.5; the original code 0)")
    model.add_argument("--control_type", default=None,
                       help="ControlNet-Union configs: what the data set's hints show (openpose, depth, canny, "
                            "scribble, normal, segment, ...; names joined by commas for hints of 3 channels per type)")
    model.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                       help="adamw (fused kernel where the device has one; the default) or adamw8bit (needs "
                            "bitsandbytes)")
    ema = p.add_argument_group("EMA of the trained weights (docs/train.md; off unless the config or an option sets it)")
    ema.add_argument("--use_ema", type=str2bool, default=None,
                     help="keep an exponential moving average of the trained weights; the logged samples, --val_data "
                          "and the export use it (the config's use_ema, False in ours)")
    ema.add_argument("--ema_decay", type=float, default=None,
                     help="the EMA's decay, and turns it on (the config's ema_decay; 0.9999 as the original ldm)")
    ema.add_argument("--ema_export", choices=EMA_EXPORTS, default=None,
                     help="with EMA: the export holds the EMA weights (ema, the default), the raw ones (raw), or the "
                          "EMA ones with the raw ones beside them in EXPORT_raw.safetensors (both)")
    loss = p.add_argument_group("training objective (docs/train.md; each off unless the config or the option sets it)")
    loss.add_argument("--snr_gamma", type=float, default=None,
                      help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's value)")
    loss.add_argument("--noise_offset", type=float, default=None,
                      help="add this times a per-channel Gaussian to the noise (0.05-0.1 usual; helps very dark or "
                           "bright images)")
    loss.add_argument("--zero_terminal_snr", type=str2bool, default=None,
                      help="True rescales the noise schedule so that its last step is pure noise (Lin et al. 2024); "
                           "v-prediction configs only")
    reward = p.add_argument_group("reward fine-tuning, as ControlNet++ (docs/train.md; off unless the config or "
                                  "--reward sets it)")
    reward.add_argument("--reward", choices=REWARDS, default=None,
                        help="add the consistency loss of this detector on the one-step denoised image to the loss "
                             "(hed, depth, seg and lineart need their weights in annotator/ckpts/)")
    reward.add_argument("--reward_weight", type=float, default=None,
                        help="the reward loss's weight (default: the paper's for the condition, 0.5 for seg and "
                             "lineart, else 1; 0 turns the reward off)")
    reward.add_argument("--reward_max_t", type=int, default=None,
                        help=f"reward the samples whose timestep is at most this (default {PAPER_MAX_T}, the paper's)")
    p.add_argument("--max_steps", type=int, default=-1, help="-1: until --max_epochs")
    p.add_argument("--max_epochs", type=int, default=None,
                   help="passes over the data (kohya's --max_train_epochs, diffusers' --num_train_epochs); the run "
                        "ends at whichever of --max_steps and --max_epochs comes first (default: Lightning's, 1000 "
                        "without --max_steps, no bound with it)")
    model.add_argument("--max_nan_steps", type=int, default=None,
                       help="skip up to N steps whose loss is NaN or infinite before stopping (default: stop at the "
                            "first)")
    p.add_argument("--accumulate_grad_batches", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=None,
                   help="clip the trained tensors' gradient to this total norm before each update (kohya's and "
                        "diffusers' scripts clip at 1.0 by default; the original ControlNet does not clip: off)")
    p.add_argument("--precision", default="32", help="32, 16-mixed, bf16-mixed, ...")
    p.add_argument("--logger_freq", type=int, default=300, help="ImageLogger: every N global steps")
    p.add_argument("--log_every_n_steps", type=int, default=50, help="how often losses go to the loggers")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the logged samples")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=devices_arg, default="auto", help="auto, a count, or a list like 0,1")
    p.add_argument("--strategy", default="auto",
                   help="auto, ddp, fsdp (FSDP2: the trained weights, their gradients and optimizer state sharded), "
                        "fsdp_cpu_offload, deepspeed_stage_2, deepspeed_stage_3(_offload), ... (docs/train.md)")
    p.add_argument("--checkpoint_every", type=int, default=1000, help="save a checkpoint every N global steps")
    p.add_argument("--output_dir", default=".", help="where image_log/, checkpoints/ and lightning_logs/ go")
    p.add_argument("--export", default=None,
                   help="control-only safetensors written at the end (default OUTPUT_DIR/control_model.safetensors)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing export, and the checkpoints of an earlier run in OUTPUT_DIR")
    data = p.add_argument_group("data (docs/data.md)")
    add_format_arguments(data)
    add_resize_arguments(data)
    data.add_argument("--caption_extension", default=None,
                      help="kohya format: caption files' extension (default .txt; .txt and .caption stand in for "
                           "each other)")
    data.add_argument("--require_captions", action="store_true",
                      help="kohya format: stop at an image without a caption file (default: it trains on an empty "
                           "caption, with a warning naming it, as in kohya)")
    data.add_argument("--dataset_config", default=None,
                      help="kohya's dataset config (TOML or JSON: [general], [[datasets]], [[datasets.subsets]]) "
                           "in place of --data_root (docs/data.md)")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="train on N samples of the data, drawn by --seed (diffusers' option)")
    data.add_argument("--skip_bad_samples", action="store_true",
                      help="log, count and skip unreadable or misfit samples instead of stopping")
    data.add_argument("--max_image_pixels", type=int, default=None,
                      help="images claiming more pixels are bad samples, as decompression bombs (default PIL's, "
                           "89478485)")
    data.add_argument("--num_nodes", type=int, default=1, help="machines in the run (launch: docs/data.md)")
    val = p.add_argument_group("control fidelity while training (docs/train.md; off unless --val_data is given)")
    val.add_argument("--val_data", default=None,
                     help="held-out data root (any format): sampled with fixed seeds every --val_every steps; its "
                          "fidelity metrics (val/*) and a sheet of images go to the loggers and image_log/val/")
    val.add_argument("--val_every", type=int, default=None, help=f"global steps between validations "
                                                                  f"(default {VALIDATION['every']})")
    val.add_argument("--val_samples", type=int, default=None,
                     help=f"the first N held-out samples (default {VALIDATION['samples']})")
    val.add_argument("--val_sampler", choices=list(SAMPLERS), default=None,
                     help=f"(default {VALIDATION['sampler']})")
    val.add_argument("--val_steps", type=int, default=None, help=f"sampling steps (default {VALIDATION['steps']})")
    val.add_argument("--val_scale", type=float, default=None,
                     help=f"classifier-free guidance scale (default {VALIDATION['scale']}, as tool_eval_control.py)")
    val.add_argument("--val_metrics", nargs="+", choices=METRICS, default=None,
                     help="default: fill (when every target is Fill50K-type), canny, ssim")
    val.add_argument("--val_data_format", choices=FORMATS, default=None,
                     help="reader of --val_data (default: told by its files)")
    val.add_argument("--val_conditioning_data_dir", default=None, help="kohya format: the held-out set's hints")
    val.add_argument("--val_split", default=None, help="hf format: the held-out split (default train)")
    val.add_argument("--keep_best", type=int, default=0, metavar="K",
                     help="keep the K best checkpoints by --monitor in OUTPUT_DIR/checkpoints/best/")
    val.add_argument("--monitor", default=None,
                     help="the validation value that chooses them, e.g. val/fill_iou, val/canny_f1 (default: the "
                          "config's monitor, val/loss_simple_ema in ours: the held-out loss)")
    val.add_argument("--monitor_mode", choices=("max", "min"), default=None,
                     help="whether more is better (default: max for fidelity scores, min for losses and errors)")
    val.add_argument("--early_stop_patience", type=int, default=None, metavar="N",
                     help="stop when N validations in a row have not improved --monitor")
    fast = p.add_argument_group("speed and memory (figures in benchmarks/RESULTS.md)")
    fast.add_argument("--cached_latents", default=None, metavar="DIR",
                      help="train from a tool_cache_latents.py cache: the VAE and text encoder do not run")
    fast.add_argument("--gradient_checkpointing", type=str2bool, default=None,
                      help="recompute activations in backward (use_checkpoint): less memory, slower steps "
                           "(default: as the config says)")
    fast.add_argument("--channels_last", action="store_true", help="NHWC memory format for the convolutions")
    fast.add_argument("--frozen_dtype", choices=tuple(FROZEN_DTYPES), default=None,
                      help="hold the frozen weights (UNet, VAE, text encoders) in this dtype: half their memory "
                           "(SDXL: 7 GB instead of 14); needs --precision bf16-mixed / 16-mixed to match")
    fast.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                      help="torch.compile the UNet and the control network, optionally naming a mode")
    return p


def parse_args(argv: list[str] | None, config: str, resume_path: str) -> argparse.Namespace:
    return build_parser(config, resume_path).parse_args(argv)


# --ema_export: what the control-only export holds when the run keeps an EMA (default "ema").
EMA_EXPORTS = ("ema", "raw", "both")


def raw_export_path(export: Path) -> Path:
    """Where --ema_export both writes the raw weights: beside the export, `_raw` added to its name."""
    return export.with_name(f"{export.stem}_raw{export.suffix}")


def write_exports(model: pl.LightningModule, export: Path, ema_export: str, force: bool, write: bool) -> list[Path]:
    """The control-only export(s) at the end of training: the EMA weights, the raw ones, or both (--ema_export).
    Every rank calls it (under fsdp the weights are gathered from every rank's shards); rank zero `write`s."""
    written = []

    def export_to(path: Path) -> None:
        control = full_tensors(model.control_state_dict())
        if write:
            save_state_dict(control, path, force=force, metadata=model.control_mode.recorded(model))
        written.append(path)

    if ema_export in ("raw", "both"):
        export_to(raw_export_path(export) if ema_export == "both" else export)
    if ema_export in ("ema", "both"):
        with model.ema_scope():
            export_to(export)
    return written


# --frozen_dtype: the dtype of the frozen weights, and the --precision whose autocast they compute under.
FROZEN_DTYPES = {"bf16": (torch.bfloat16, "bf16-mixed"), "fp16": (torch.float16, "16-mixed")}


def build_model(args: argparse.Namespace, resume_path: str) -> pl.LightningModule:
    """The model of --config with the weights of --resume (a Lightning checkpoint of this config) or of
    --resume_path (initial weights), and the training settings of the config and the command line."""
    given = given_options(args)
    params = config_overrides(args.config, given) | control_type_params(args.config, args.control_type)
    initial = args.resume_path or resume_path
    if args.resume is not None:
        if args.resume_path is not None:
            raise UserError("--resume_path is not used with --resume: the weights come from the checkpoint",
                            "drop --resume_path, or drop --resume to start a new run from its weights")
        model = create_model(args.config, params=params).cpu()
        resumed = read_resume_checkpoint(args.resume)
        load_resumed_weights(model, resumed, args.resume, args.config, CONTROL_PREFIX)
        compare_with_resumed(model, given, resumed, args.resume)
        check_sharded_resume(model, resumed, args.resume, args.strategy in FSDP_STRATEGIES)
    elif initial.lower() == "none":
        model = create_model(args.config, params=params).cpu()
    else:
        if not (Path(initial).is_file() or is_sharded_checkpoint(initial)):
            raise FileNotFoundError(f"Initial checkpoint not found: {initial}; make it from an SD checkpoint first, "
                                    f"e.g. python tool_add_control.py ./models/v1-5-pruned.ckpt {initial}")
        # every weight from the file but what the mode initialises itself (model.fresh_prefixes); all finite
        model, _ = load_model(args.config, [initial], params=params, initial=True)
    if args.gradient_checkpointing is not None:
        set_gradient_checkpointing(model, args.gradient_checkpointing)
        model.reward_checkpointing = args.gradient_checkpointing
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile_denoiser(mode=args.compile)
    return model


def check_reward(model: pl.LightningModule, cached_latents: str | None) -> None:
    """Load the reward's detector before anything slow (a missing weight file is named), refuse a reward that needs
    the training images with a latent cache, and say what the reward does."""
    if model.reward_name is None:
        return
    reward = model.reward_term()
    if reward is None:
        log.info("reward_weight 0: the %s reward is off, the loss is the diffusion loss alone", model.reward_name)
        return
    if cached_latents is not None and reward.model.uses_target:
        raise images_needed(model.reward_name, f"--cached_latents {cached_latents}")
    log.info("Reward fine-tuning (ControlNet++): the %s reward at weight %g on the samples with timestep <= %d",
             reward.model.name, reward.weight, reward.max_t)


# Options of the readers, which a latent cache replaces: the cache fixed the sizing, the format and the captions.
READER_OPTIONS = ("data_format", "resolution", "resize", "conditioning_data_dir", "caption_extension", "image_column",
                  "conditioning_image_column", "caption_column", "split", "allow_outside_root", "skip_bad_samples",
                  "require_captions")
DEFAULT_BATCH_SIZE = 4
# options a --dataset_config replaces: the file names the folders and the sizing
REPLACED_BY_DATASET_CONFIG = ("data_root", "data_format", "conditioning_data_dir", "image_size", "resize",
                              "cached_latents", "image_column", "conditioning_image_column", "caption_column",
                              "split", "allow_outside_root")


def read_kohya_dataset_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DatasetConfig | None:
    """--dataset_config read together with the command line's --resolution, --caption_extension and
    --batch_size; fills in --batch_size and --resolution (for --val_data) from the file where they are not
    given. None without --dataset_config."""
    if args.dataset_config is None:
        args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
        return None
    replaced = [f"--{name}" for name in REPLACED_BY_DATASET_CONFIG if getattr(args, name) != parser.get_default(name)]
    if replaced:
        raise UserError(f"{', '.join(replaced)} cannot be given with --dataset_config {args.dataset_config}",
                        "the dataset config names the folders (image_dir, conditioning_data_dir) and the sizing "
                        "(resolution, enable_bucket)")
    shared = {"resolution": args.resolution, "caption_extension": args.caption_extension,
              "batch_size": args.batch_size}
    config = read_dataset_config(args.dataset_config, {k: v for k, v in shared.items() if v is not None})
    args.batch_size = config.batch_size or DEFAULT_BATCH_SIZE
    args.resolution = args.resolution or config.resize.resolution
    return config


def build_dataset(args: argparse.Namespace, parser: argparse.ArgumentParser,
                  config: DatasetConfig | None = None) -> Dataset:
    """The reader of --data_root (any format), of a kohya dataset config, or the latent cache's with
    --cached_latents (then the readers' options given are refused by name: none would take effect)."""
    if config is not None:
        return KohyaDataset(config.subsets, config.resize, skip_bad=args.skip_bad_samples,
                            require_captions=args.require_captions)
    if args.cached_latents is not None:
        ignored = [f"--{name}" for name in READER_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if ignored:
            raise UserError(f"{', '.join(ignored)} does not apply to --cached_latents {args.cached_latents}: the "
                            f"cache holds the latents of images read and sized when it was made",
                            "drop it, or make a cache with the sizing you want (tool_cache_latents.py --image_size)")
    if args.cached_latents is None:
        if args.image_size is not None and args.resolution is not None:
            raise UserError("give --image_size (stretch) or --resolution (with --resize), not both")
        resize = Resize(args.image_size, "stretch") if args.image_size is not None else \
            Resize(args.resolution, args.resize)
        return open_dataset(args.data_root or "./training/fill50k", resize=resize, **format_options(args),
                            caption_extension=args.caption_extension, skip_bad=args.skip_bad_samples,
                            require_captions=args.require_captions, seed=args.seed or 0)
    dataset = CachedDataset(args.cached_latents, data_root=args.data_root)
    if args.image_size not in (None, dataset.size):
        raise UserError(f"{args.cached_latents} was cached at image size {dataset.size}, not --image_size "
                        f"{args.image_size}")
    return dataset


def build_validation(args: argparse.Namespace) -> ControlValidation | None:
    """The --val_* options as a ControlValidation callback; None without --val_data (then none may be given)."""
    given = {k: v for k, v in vars(args).items() if k.startswith("val_") and v is not None}
    if args.val_data is None:
        if given:
            raise UserError(f"--{next(iter(given))} is given without --val_data, so it would do nothing",
                            "name a held-out data root with --val_data, or drop it")
        return None
    settings = {**VALIDATION, **{k[len("val_"):]: v for k, v in given.items()}}
    if args.image_size is not None:
        resize = Resize(args.image_size, "stretch")
    else:  # the training's sizing without its randomness; one size for all, so they batch
        resize = Resize(args.resolution, "stretch" if args.resize == "stretch" else "center_crop")
    try:
        data_format = args.val_data_format or detect_format(args.val_data, args.val_conditioning_data_dir)
    except ValueError as err:
        raise UserError(f"--val_data {args.val_data}: {err}", "a held-out set's own options are "
                        "--val_data_format, --val_conditioning_data_dir and --val_split") from err
    for option, applies_to in (("val_conditioning_data_dir", "kohya"), ("val_split", "hf")):
        if getattr(args, option) is not None and data_format != applies_to:
            raise UserError(f"--{option} applies to the {applies_to} format, not to the {data_format} format of "
                            f"--val_data {args.val_data}")
    # the training's options that describe a format's files apply to a held-out set of that format too
    schema = {"fill50k": dict(allow_outside_root=args.allow_outside_root),
              "kohya": dict(conditioning_data_dir=args.val_conditioning_data_dir,
                            caption_extension=args.caption_extension),
              "hf": dict(image_column=args.image_column, conditioning_image_column=args.conditioning_image_column,
                         caption_column=args.caption_column, split=args.val_split or "train",
                         allow_outside_root=args.allow_outside_root),
              "shards": {}}[data_format]
    held_out = read_held_out(args.val_data, settings["samples"], data_format=data_format, resize=resize, **schema)
    return ControlValidation(held_out, settings["every"], args.val_metrics, settings["sampler"], settings["steps"],
                             settings["scale"], batch_size=args.batch_size, save_dir=args.output_dir)


def report_captions_for(model: pl.LightningModule, dataset: Dataset) -> None:
    """Empty captions, and captions longer than a CLIP text encoder reads, named by file (a log warning)."""
    if not isinstance(dataset, PairedImageDataset):
        return
    encoder = model.cond_stage_model
    if isinstance(encoder, (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder)):
        tokenizer = encoder.tokenizer  # the context holds start and end tokens besides the caption's
        report_captions(dataset, lambda c: len(tokenizer.encode(c)), tokenizer.context_length - 2)
    else:
        report_captions(dataset)


def main(argv: list[str] | None = None, config: str = "./models/cldm_v15.yaml",
         resume_path: str = "./models/control_sd15_ini.ckpt") -> pl.Trainer:
    parser = build_parser(config, resume_path)
    args = parser.parse_args(argv)
    if args.resume is not None:
        log.info("Resuming from %s with the command line's %s", args.resume, given_on_command_line(parser, args))
    output_dir = Path(args.output_dir)
    export = Path(args.export) if args.export else output_dir / "control_model.safetensors"
    refuse_existing(export, args.force)
    if args.ema_export == "both":
        refuse_existing(raw_export_path(export), args.force)
    check_fresh_output(output_dir / "checkpoints", args.resume, args.force)
    dataset_config = read_kohya_dataset_config(parser, args)
    validation = build_validation(args)
    selection = selection_callbacks(validation, args.keep_best, args.monitor or config_monitor(args.config),
                                    args.monitor_mode, args.early_stop_patience, output_dir / "checkpoints",
                                    "--monitor" if args.monitor else f"{args.config}'s monitor")
    if args.seed is not None:
        pl.seed_everything(args.seed, workers=True)

    if args.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--optimizer adamw8bit needs bitsandbytes", "pip install bitsandbytes")
    if args.frozen_dtype is not None and args.precision != FROZEN_DTYPES[args.frozen_dtype][1]:
        raise UserError(f"--frozen_dtype {args.frozen_dtype} needs --precision "
                        f"{FROZEN_DTYPES[args.frozen_dtype][1]}, got --precision {args.precision}",
                        "the frozen weights compute under that precision's autocast")
    check_strategy(args.strategy, args.accelerator, args.optimizer or "adamw")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise UserError(f"--max_grad_norm must be positive (1.0 in kohya's and diffusers' scripts), got "
                        f"{args.max_grad_norm}")
    model = build_model(args, resume_path)
    if args.ema_export is not None and not model.use_ema:
        raise UserError(f"--ema_export {args.ema_export} is given, but the run keeps no EMA",
                        "turn it on with --ema_decay (or --use_ema True), or drop --ema_export")
    if model.use_ema and "deepspeed" in args.strategy:
        raise UserError(f"--strategy {args.strategy} with an EMA: DeepSpeed keeps the optimizer's state of its own "
                        f"flat partitions, where the EMA cannot follow the weights",
                        "use --strategy fsdp (the EMA is sharded with the weights), or --use_ema False")
    check_reward(model, args.cached_latents)
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    dataset = build_dataset(args, parser, dataset_config)
    if args.cached_latents is not None:
        check_cache(model, dataset.meta, args.cached_latents)
    if args.max_train_samples is not None:
        if not isinstance(dataset, PairedImageDataset):
            raise UserError(f"--max_train_samples needs a map-style format, not the stream of {args.data_root}",
                            "write fewer shards instead")
        dataset = select_samples(dataset, args.max_train_samples, args.seed or 0)
    if args.frozen_dtype is not None:  # after the cache check, whose fingerprint is of the float32 weights
        model.cast_frozen(FROZEN_DTYPES[args.frozen_dtype][0])
    report_captions_for(model, dataset)
    data = TrainData(dataset, args.batch_size, args.num_workers, seed=args.seed or 0, skip_bad=args.skip_bad_samples,
                     held_out=validation.loader() if validation else None)
    skipped = [SkippedSamples()] if args.skip_bad_samples else []
    image_logger = ImageLogger(batch_frequency=args.logger_freq, log_images_kwargs={"ddim_steps": args.sample_steps})
    checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="step-{step:06d}",
                                  every_n_train_steps=args.checkpoint_every, save_top_k=1, save_last=False,
                                  auto_insert_metric_name=False, enable_version_counter=False)
    last_checkpoint = LastCheckpoint(output_dir / "checkpoints" / "last.ckpt", args.checkpoint_every,
                                     choosing=bool(selection))
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=make_strategy(args.strategy),
                         precision=args.precision, max_steps=args.max_steps, max_epochs=args.max_epochs,
                         log_every_n_steps=args.log_every_n_steps,
                         accumulate_grad_batches=args.accumulate_grad_batches, num_nodes=args.num_nodes,
                         gradient_clip_val=args.max_grad_norm, gradient_clip_algorithm="norm",
                         callbacks=[image_logger, checkpoints, *selection, last_checkpoint, *skipped, *progress_bar()]
                         + ([validation] if validation else []) + [RandomState()],
                         use_distributed_sampler=False, logger=run_loggers(output_dir), default_root_dir=output_dir,
                         plugins=[AtomicCheckpointIO()], inference_mode=False,  # nothing the model caches is frozen
                         **(validation.trainer_options(args.accumulate_grad_batches) if validation else
                            {"limit_val_batches": 0}))

    try:
        trainer.fit(model, datamodule=data, ckpt_path=args.resume, weights_only=True)
    except (BadSampleError, BatchKeyError) as err:
        raise UserError(sample_error_message(err)) from err
    except TrainingStopped as err:
        last = last_checkpoint.last if last_checkpoint.saved_step is not None else args.resume
        raise TrainingStopped(str(err), f"{err.advice}; the last checkpoint before it: {last or 'none was saved'}"
                              ) from err

    if last_checkpoint.saved_step != trainer.global_step:  # ended otherwise (interrupted): the state as it is
        trainer.save_checkpoint(last_checkpoint.last, weights_only=False)
    exports = write_exports(model, export, (args.ema_export or "ema") if model.use_ema else "raw", args.force,
                            trainer.is_global_zero)
    if trainer.is_global_zero:
        written = {f"Control-only weights{' (EMA)' * (model.use_ema and path == export)}": path for path in exports}
        written |= {"Checkpoints": output_dir / "checkpoints",
                   "Image grids": output_dir / "image_log" / "train",
                   "Losses": Path(trainer.loggers[1].log_dir) / "metrics.csv"}
        log.info("\n".join(f"{what}: {path}" for what, path in written.items() if path.exists()))
    return trainer


def settings_of_run(config: str | Path, saved: Mapping[str, Any]) -> list[str]:
    """The options that give a run the training settings a checkpoint's run had where they differ from the config's
    (the reward's own excepted; no EMA decay for a run without EMA)."""
    configured = config_settings(config)
    differ = {k: v for k, v in saved.items() if k in configured and v != configured[k] and v is not None
              and not k.startswith("reward")}
    if not saved.get("use_ema"):
        differ.pop("ema_decay", None)
    return [arg for option, value in differ.items() for arg in (f"--{option}", str(value))]


def reward_phase(checkpoint: str | Path, config: str | Path, data_root: str | Path, output_dir: str | Path,
                 reward: str, steps: int, batch_size: int = 4, weight: float | None = None,
                 max_t: int | None = None, learning_rate: float | None = None,
                 extra_args: Sequence[str] = ()) -> pl.Trainer:
    """Reward fine-tuning after training, as ControlNet++ fine-tunes a trained ControlNet: the run of the Lightning
    `checkpoint` (a tutorial_train checkpoint of `config`) continued for `steps` more optimizer steps with the
    `reward` term in its loss, on `data_root`; checkpoints and the control export (control_model.safetensors) go to
    `output_dir`. `weight`, `max_t`, `learning_rate`: the reward's weight and largest rewarded timestep, and the
    learning rate (each default: the reward's, the paper's 200, the checkpoint's run's); the other training settings
    are the checkpoint's run's (sd_locked, ...); `extra_args`: more tutorial_train options (e.g. --accelerator cpu,
    --seed 0, --force). Returns the trainer; its lightning_module is the fine-tuned model."""
    resumed = read_resume_checkpoint(checkpoint)
    argv = ["--config", str(config), "--resume", str(checkpoint), "--data_root", str(data_root),
            "--output_dir", str(output_dir), "--batch_size", str(batch_size),
            "--max_steps", str(resumed["global_step"] + steps), "--reward", reward,
            *settings_of_run(config, resumed.get(TRAINING_STATE, {}))]
    for option, value in (("--reward_weight", weight), ("--reward_max_t", max_t), ("--learning_rate", learning_rate)):
        if value is not None:
            argv += [option, str(value)]
    return main([*argv, *extra_args], config=str(config))

"""Every control mode on one task, side by side: what each trains, ships and costs, and how soon and how well its
control is obeyed (benchmarks/compare_modes.py is the command line; docs/modes.md has the results).

On one base (a family of configs: `<base config>.yaml` for the ControlNet modes, `<base config>_<mode>.yaml` for
the others, e.g. models/cldm_demo_lora.yaml) and Fill50K-type circles, each mode is:

1. measured (cldm/bench/costs.py): trainable parameters, control file bytes, peak training memory and seconds per
   step, on the model `tutorial_train.py` builds and a batch of its training data;
2. trained with `tutorial_train.py`'s own code (cldm.train_command.main) for the same number of samples (steps x
   batch), with `--val_data`, which logs the held-out fill IoU while it trains: the step where it first exceeds
   a threshold is the mode's "sudden convergence";
3. evaluated as `tool_eval_control.py` does (cldm.fidelity.evaluate on the base plus the exported control file):
   final fill IoU over the held-out samples with its 95% interval, and its paired difference to no control.

A mode whose config the family lacks is listed with the reason. The results go into one folder, written whole
or not at all: `comparison.md` (the table), `fidelity.png` (the held-out fill IoU curves) and `results.json`.
The training runs (checkpoints, logs, exports) stay in a work folder; a mode whose run there finished with the
same plan is reused, so an interrupted comparison goes on where it stopped.
"""

import argparse
import csv
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from cldm import train_command
from cldm.bench.costs import control_file_bytes, step_cost, trainable_count
from cldm.bench.measure import machine, release
from cldm.cldm import CONTROLNET
from cldm.control import ControlMode
from cldm.control_weights import Fit, add_control, initial_state
from cldm.controlnet_union import CONTROLNET_UNION
from cldm.controlnet_xs import CONTROLNET_XS
from cldm.data.circles import make_fill50k
from cldm.fidelity import Scorers, evaluate, load_samples, paired_difference, summarize
from cldm.lllite import LLLITE
from cldm.loader import load_model
from cldm.lora import CONTROL_LORA
from cldm.model import CONTROL_PREFIX, create_model, load_state_dict, save_state_dict
from cldm.modes import config_mode
from cldm.reward import REWARDS
from cldm.t2i_adapter import T2I_ADAPTER
from cldm.train_command import reward_phase
from cldm.training import config_settings, latest_metrics_csv
from ldm.checkpoint import EMA_PREFIX, UserError, atomic_output, require_finite, write_text

log = logging.getLogger(__name__)

METRIC = "fill_iou"  # the held-out metric of the circles task, as --val_data logs it (val/fill_iou)
# Lightning's precision names (tutorial_train --precision) and the benchmarks' (cldm/bench/measure.py)
PRECISIONS = {"32": "fp32", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


@dataclass(frozen=True)
class ComparedMode:
    """One row of the comparison: a registered control mode, the family config that builds it (`suffix` after the
    base config's name) and the training settings it runs with on top of the config (tutorial_train options)."""

    name: str
    label: str
    mode: ControlMode
    suffix: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    absent: str = ""  # why a family may have no config for it

    def config(self, base_config: Path) -> Path:
        return base_config.with_name(f"{base_config.stem}{self.suffix}.yaml")


COMPARED: tuple[ComparedMode, ...] = (
    ComparedMode("full", "ControlNet, full (sd_locked=False)", CONTROLNET, "", {"sd_locked": False}),
    ComparedMode("sd_locked", "ControlNet, sd_locked", CONTROLNET, "", {"sd_locked": True}),
    ComparedMode("only_mid_control", "ControlNet, only_mid_control (sd_locked)", CONTROLNET, "",
                 {"sd_locked": True, "only_mid_control": True}),
    ComparedMode("lora", "LoRA-offset (ControlLoRA v2)", CONTROL_LORA, "_lora"),
    ComparedMode("lllite", "ControlNet-LLLite", LLLITE, "_lllite"),
    ComparedMode("t2i", "T2I-Adapter", T2I_ADAPTER, "_t2i"),
    ComparedMode("xs", "ControlNet-XS", CONTROLNET_XS, "_xs"),
    ComparedMode("union", "ControlNet-Union (full, sd_locked=False)", CONTROLNET_UNION, "_union", {"sd_locked": False}),
)
BY_NAME = {m.name: m for m in COMPARED}


@dataclass(frozen=True)
class Plan:
    """What every mode of one comparison shares; a finished run is reused only under the same plan."""

    base_config: str
    base: str | None  # the base weights; None: the configs' random initialisation
    resolution: int
    n_train: int
    n_val: int
    steps: int
    batch_size: int
    val_every: int
    val_samples: int
    eval_samples: int
    sample_steps: int
    guidance_scale: float
    threshold: float
    precision: str
    device: str
    cost_steps: int
    seed: int = 0


@dataclass
class ModeResult:
    """What one mode's run measured (results.json holds one per mode)."""

    name: str
    config: str
    trainable: int
    file_bytes_fp16: int
    file_bytes_fp32: int
    static_bytes: int
    peak_bytes: int
    seconds_per_step: float
    cpu_seconds_per_step: float  # the process's CPU seconds (cldm/bench/costs.py StepCost)
    train_seconds: float
    validation_seconds: float
    curve: list[tuple[int, float, float]]  # (step, fill IoU with control, without), held-out, while training
    first_above: int | None  # the first validated step whose fill IoU exceeds the threshold
    final: dict[str, Any]  # the evaluation's fill_iou entry (cldm.fidelity.summarize)
    scores: list[float]  # the evaluation's fill IoU per held-out sample, with control (sample i from seed i)
    load: tuple[float, float]  # the 1-minute load average when training started and ended
    seconds: float  # the mode's whole run: initial weights, measurement, training, evaluation
    plan: dict[str, Any]


# ---- the data, the initial weights ----

def circles(work: Path, split: str, n: int, size: int, seed: int) -> Path:
    """Fill50K-type circles in the work folder, made once per (n, size, seed): the same arguments give the same
    files, so a set made before is used as it is."""
    root = work / "data" / f"{split}_n{n}_{size}px_seed{seed}"
    if not (root / "prompt.json").is_file():
        make_fill50k(root, n, size, seed, force=True)
    return root


def needs_control_copy(config: Path) -> bool:
    """Whether some of the mode's control weights start as a copy of the base's (a ControlNet's encoder, an XS
    adapter's learnt time embedding: the tool_add_control.py step), rather than all from the mode's own
    initialisation (the model's `fresh_prefixes`)."""
    model = create_model(config, device="meta")
    return any(not key.startswith(model.fresh_prefixes) for key in model.state_dict() if key.startswith(CONTROL_PREFIX))


def initial_weights(config: Path, base: str | None, work: Path) -> str:
    """tutorial_train's --resume_path for a mode: the base itself, the base with its ControlNet copy (made as
    tool_add_control.py makes it, once per config), or 'none' for random weights."""
    if base is None:
        return "none"
    if not needs_control_copy(config):
        return base
    path = work / "init" / f"{config.stem}_{Path(base).stem}_ini.safetensors"
    if not path.is_file():
        sd = {k: v for k, v in load_state_dict(base).items() if not k.startswith(EMA_PREFIX)}
        require_finite(sd, base)
        weights, _ = add_control(sd, initial_state(config), Fit(base, config))
        save_state_dict(weights, path, force=True)
    return str(path)


# ---- one mode ----

def run_options(plan: Plan, steps: int) -> list[str]:
    """The tutorial_train options every run of the comparison shares (training, and the reward phase's `steps` more):
    precision, device and seed, logging and a checkpoint at the end, and --force."""
    return ["--precision", plan.precision, "--accelerator", "gpu" if plan.device == "cuda" else "cpu",
            "--devices", "1", "--seed", str(plan.seed), "--logger_freq", str(10 * steps + 1),
            "--log_every_n_steps", str(min(10, steps)), "--checkpoint_every", str(steps), "--force"]


def train_argv(config: Path, resume_path: str, settings: Mapping[str, Any], plan: Plan, train: Path, val: Path,
               run_dir: Path) -> list[str]:
    """tutorial_train.py's command line for one mode's run."""
    argv = ["--config", str(config), "--resume_path", resume_path, "--data_root", str(train),
            "--batch_size", str(plan.batch_size), "--max_steps", str(plan.steps), "--output_dir", str(run_dir),
            *run_options(plan, plan.steps),
            "--val_data", str(val), "--val_every", str(plan.val_every), "--val_samples", str(plan.val_samples),
            "--val_steps", str(plan.sample_steps), "--val_scale", str(plan.guidance_scale),
            "--val_metrics", "fill"]
    for option, value in settings.items():
        argv += [f"--{option}", str(value)]
    return argv


def measure_costs(argv: list[str], device: torch.device, precision: str, steps: int) -> dict[str, Any]:
    """Counts, file bytes, memory and seconds per step of the model tutorial_train builds from `argv` (which names
    its config and initial weights), trained on a first batch of its own data (the model is thrown away after)."""
    parser = train_command.build_parser("", "")
    args = parser.parse_args(argv)
    train_command.read_kohya_dataset_config(parser, args)
    model = train_command.build_model(args, args.resume_path)
    dataset = train_command.build_dataset(args, parser)
    batch = default_collate([dataset[i] for i in range(args.batch_size)])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    fp16, fp32 = control_file_bytes(model)
    cost = step_cost(model, batch, PRECISIONS[precision], device, warmup=min(3, steps), steps=steps)
    return {"trainable": trainable_count(model), "file_bytes_fp16": fp16, "file_bytes_fp32": fp32,
            "static_bytes": cost.static, "peak_bytes": cost.peak, "seconds_per_step": cost.seconds_per_step,
            "cpu_seconds_per_step": cost.cpu_seconds_per_step}


def validation_curve(metrics_csv: Path, metric: str = METRIC) -> tuple[list[tuple[int, float, float]], float]:
    """The held-out `metric` per validated step, with and without control, and the seconds the validations took
    (--val_data's val/<metric>, val/<metric>_no_control and val/seconds)."""
    with_control, without, seconds = {}, {}, 0.0
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if row.get(f"val/{metric}"):
                with_control[step] = float(row[f"val/{metric}"])
            if row.get(f"val/{metric}_no_control"):
                without[step] = float(row[f"val/{metric}_no_control"])
            if row.get("val/seconds"):
                seconds += float(row["val/seconds"])
    if not with_control:
        raise ValueError(f"{metrics_csv} holds no val/{metric}: the run did not validate")
    return [(s, with_control[s], without.get(s, float("nan"))) for s in sorted(with_control)], seconds


def first_above(curve: Sequence[tuple[int, float, float]], threshold: float) -> int | None:
    """The first validated step whose value with control exceeds `threshold` (None: none does)."""
    return next((step for step, value, _ in curve if value > threshold), None)


def trained_weights(run_dir: Path, plan: Plan) -> list[str]:
    """What a run's model loads from: the base and the run's control export (with sd_locked=False it holds the UNet
    decoder too), as tool_eval_control.py is given them; without a base file, the run's last checkpoint."""
    if plan.base is None:
        return [str(run_dir / "checkpoints" / "last.ckpt")]
    return [plan.base, str(run_dir / "control_model.safetensors")]


def final_fidelity(config: Path, weights: list[str], settings: Mapping[str, Any], plan: Plan,
                   val: Path) -> tuple[dict[str, Any], list[float]]:
    """tool_eval_control.py's evaluation of the trained model: the held-out fill IoU with and without control over
    `eval_samples` samples, sample i from seed i in both (summarize's fill_iou entry), and the per-sample values
    with control."""
    log.info("evaluating %s on %d held-out samples", " + ".join(weights), plan.eval_samples)
    model = load_model(config, weights, params=dict(settings))[0].to(plan.device).eval()
    prompts, hints, targets = load_samples(val, plan.eval_samples)
    scores, _ = evaluate(model, prompts, hints, targets, Scorers(["fill"]), seed=0, steps=plan.sample_steps,
                         guidance_scale=plan.guidance_scale, batch_size=max(plan.batch_size, 16))
    return summarize(scores)[METRIC], scores["control"][METRIC].tolist()


def kept_result(path: Path, plan: Mapping[str, Any], force: bool) -> dict[str, Any] | None:
    """The result a finished run left at `path` under the same `plan`; None when the run is to be made (again): there
    is none, or `force` and one of another plan or an unfinished run is in its folder (refused without `force`)."""
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept["plan"] == plan:
            return kept
        if not force:
            raise UserError(f"{path.parent} holds a finished run of another plan or config",
                            "pass --force to run it again there, or choose another --work_dir")
    elif path.parent.exists() and not force:
        raise UserError(f"{path.parent} holds an unfinished run (no {path.name})",
                        "pass --force to run it again there, or choose another --work_dir")
    return None


def run_plan(plan: Plan, config: Path) -> dict[str, Any]:
    """What a kept run must have been made under to be reused: the plan and the mode's config as it is now (a run
    of an edited config is not the mode's run any more)."""
    return {**asdict(plan), "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()}


def run_mode(mode: ComparedMode, plan: Plan, work: Path, train: Path, val: Path, force: bool) -> ModeResult:
    """One mode measured, trained and evaluated; its result is kept in its run folder and reused under the same
    plan and config."""
    config = mode.config(Path(plan.base_config))
    run_dir = work / "runs" / mode.name
    kept = run_dir / "result.json"
    if (earlier := kept_result(kept, run_plan(plan, config), force)) is not None:
        log.info("%s: reusing the finished run in %s", mode.name, run_dir)
        return ModeResult(**earlier)
    device, begun = torch.device(plan.device), time.perf_counter()
    argv = train_argv(config, initial_weights(config, plan.base, work), mode.settings, plan, train, val, run_dir)
    log.info("%s: measuring a training step (%s)", mode.name, config)
    costs = measure_costs(argv, device, plan.precision, plan.cost_steps)
    release(device)
    log.info("%s: training, as python tutorial_train.py %s", mode.name, shlex.join(argv))
    load_start, started = os.getloadavg()[0], time.perf_counter()
    train_command.main(argv)
    train_seconds, load_end = time.perf_counter() - started, os.getloadavg()[0]
    release(device)
    curve, validation_seconds = validation_curve(latest_metrics_csv(run_dir))
    final, scores = final_fidelity(config, trained_weights(run_dir, plan), mode.settings, plan, val)
    release(device)
    result = ModeResult(mode.name, str(config), **costs, train_seconds=train_seconds,
                        validation_seconds=validation_seconds, curve=curve,
                        first_above=first_above(curve, plan.threshold), final=final, scores=scores,
                        load=(load_start, load_end), seconds=time.perf_counter() - begun,
                        plan=run_plan(plan, config))
    write_text(kept, json.dumps(asdict(result), indent=1))
    return result


# ---- the reward phase (ControlNet++'s fine-tuning, cldm/reward.py) ----

@dataclass(frozen=True)
class RewardPlan:
    """A reward phase after each mode's training: `steps` more steps with the `reward` term (cldm.reward), at
    `lr_scale` times the mode's learning rate; `max_t`, `weight`: the reward's (None: its defaults)."""

    reward: str
    steps: int
    lr_scale: float
    max_t: int | None = None
    weight: float | None = None


@dataclass
class Continuation:
    """A finished run continued: with the reward (weight None: the reward's own) or without it (weight 0)."""

    weight: float | None
    learning_rate: float
    train_seconds: float
    final: dict[str, Any]  # the evaluation's fill_iou entry
    scores: list[float]  # fill IoU per held-out sample, with control
    gain: dict[str, float]  # paired against the trained model's scores: mean and 95% half-width


@dataclass
class RewardResult:
    """A mode's reward phase, and the same steps without the reward: what more training alone gives."""

    name: str
    rewarded: Continuation
    plain: Continuation
    seconds: float
    plan: dict[str, Any]


def continue_run(mode: ComparedMode, trained: ModeResult, plan: Plan, reward: RewardPlan, weight: float | None,
                 train: Path, val: Path, run_dir: Path, out_dir: Path) -> Continuation:
    """The mode's finished run in `run_dir` continued into `out_dir` for the reward plan's steps
    (cldm.train_command.reward_phase: the checkpoint's settings, `weight` 0 turning the reward term off), then
    evaluated as the run was."""
    config = Path(trained.config)
    learning_rate = reward.lr_scale * {**config_settings(config), **mode.settings}["learning_rate"]
    started = time.perf_counter()
    reward_phase(run_dir / "checkpoints" / "last.ckpt", config, train, out_dir, reward.reward,
                 reward.steps, plan.batch_size, weight=weight, max_t=reward.max_t, learning_rate=learning_rate,
                 extra_args=run_options(plan, reward.steps))
    train_seconds = time.perf_counter() - started
    release(torch.device(plan.device))
    final, scores = final_fidelity(config, trained_weights(out_dir, plan), mode.settings, plan, val)
    release(torch.device(plan.device))
    return Continuation(weight, learning_rate, train_seconds, final, scores, paired_difference(scores, trained.scores))


def run_reward(mode: ComparedMode, trained: ModeResult, plan: Plan, reward: RewardPlan, work: Path, train: Path,
               val: Path, force: bool) -> RewardResult:
    """A mode's reward phase and its plain counterpart; kept in the run folder and reused under the same plans."""
    run_dir = work / "runs" / mode.name
    phase_dir = run_dir / "reward"
    kept = phase_dir / "result.json"
    plans = {**run_plan(plan, Path(trained.config)), "reward": asdict(reward)}
    if (earlier := kept_result(kept, plans, force)) is not None:
        log.info("%s: reusing the finished reward phase in %s", mode.name, phase_dir)
        return RewardResult(earlier["name"], Continuation(**earlier["rewarded"]), Continuation(**earlier["plain"]),
                            earlier["seconds"], earlier["plan"])
    begun = time.perf_counter()
    log.info("%s: %d steps with the %s reward, and the same without it", mode.name, reward.steps, reward.reward)
    rewarded = continue_run(mode, trained, plan, reward, reward.weight, train, val, run_dir, phase_dir / reward.reward)
    plain = continue_run(mode, trained, plan, reward, 0.0, train, val, run_dir, phase_dir / "plain")
    result = RewardResult(mode.name, rewarded, plain, time.perf_counter() - begun, plans)
    write_text(kept, json.dumps(asdict(result), indent=1))
    return result


# ---- the comparison ----

def family_modes(base_config: Path, names: Sequence[str]) -> tuple[list[ComparedMode], dict[str, str]]:
    """The modes asked for whose config the family has, and for the others why they are left out. A config of
    another mode than the row's is refused."""
    present, left_out = [], {}
    for name in names:
        mode = BY_NAME[name]
        config = mode.config(base_config)
        if not config.is_file():
            left_out[name] = f"no {config}" + (f": {mode.absent}" if mode.absent else "")
            continue
        if config_mode(config) is not mode.mode:
            raise UserError(f"{config} builds a {config_mode(config).name} model, not the {mode.mode.name} "
                            f"that the comparison's {name} row trains")
        present.append(mode)
    return present, left_out


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def interval(entry: Mapping[str, float]) -> str:
    return f"{entry['mean']:.3f} ± {entry['ci95']:.3f}"


def signed(entry: Mapping[str, float]) -> str:
    return f"{entry['mean']:+.3f} ± {entry['ci95']:.3f}"


def table(results: Sequence[ModeResult], left_out: Mapping[str, str], plan: Plan,
          rewards: Sequence[RewardResult] = (), reward: RewardPlan | None = None) -> str:
    """The comparison as a Markdown table: a row per mode (with the reward phase's columns when there was one), then
    the modes left out and why."""
    samples = plan.steps * plan.batch_size
    columns = ["mode", "config", "trainable params", "control file fp16", "peak training memory",
               "s/step (CPU s/step)", f"first step with fill IoU > {plan.threshold:g} (samples)",
               "final fill IoU (95% CI)", "without control", "gain, paired (95% CI)", "train time (of it validation)",
               "load avg start / end"]
    if reward is not None:
        term = f"the {reward.reward} reward" if reward.weight != 0 else "the reward at weight 0"
        columns += [f"after {reward.steps} steps with {term} (95% CI)",
                    "gain over the trained model", f"gain over {reward.steps} steps without the reward"]
    lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
    by_mode = {r.name: r for r in rewards}
    for r in results:
        reached = (f"{r.first_above} ({r.first_above * plan.batch_size:,})" if r.first_above is not None
                   else f"not within {plan.steps}")
        cells = [BY_NAME[r.name].label, Path(r.config).name, f"{r.trainable:,}", megabytes(r.file_bytes_fp16),
                 megabytes(r.peak_bytes), f"{r.seconds_per_step:.3f} ({r.cpu_seconds_per_step:.3f})", reached,
                 interval(r.final["control"]), interval(r.final["no_control"]), signed(r.final["paired_diff"]),
                 f"{r.train_seconds / 60:.1f} min ({r.validation_seconds / 60:.1f})",
                 f"{r.load[0]:.1f} / {r.load[1]:.1f}"]
        if reward is not None:
            phase = by_mode[r.name]
            cells += [interval(phase.rewarded.final["control"]), signed(phase.rewarded.gain),
                      signed(paired_difference(phase.rewarded.scores, phase.plain.scores))]
        lines.append(f"| {' | '.join(cells)} |")
    for name, why in left_out.items():
        lines.append(f"| {BY_NAME[name].label} | left out: {why} |" + " |" * (len(columns) - 2))
    lines.append("")
    lines.append(f"Every mode trained on the same {samples:,} samples ({plan.steps} steps x batch {plan.batch_size}, "
                 f"{plan.n_train:,} training images of {plan.resolution} px); validation every {plan.val_every} "
                 f"steps on {plan.val_samples} held-out samples, the final figures on {plan.eval_samples} "
                 f"({plan.sample_steps} DDIM steps, guidance {plan.guidance_scale:g}, sample i from seed i with and "
                 f"without control).")
    if reward is not None:
        lines.append(f"Reward phase: each trained run continued for {reward.steps} steps (batch {plan.batch_size}) "
                     f"with the {reward.reward} reward (cldm/reward.py; weight "
                     f"{'its default' if reward.weight is None else f'{reward.weight:g}'}, timesteps <= "
                     f"{'the paper' + chr(39) + 's 200' if reward.max_t is None else reward.max_t}) at "
                     f"{reward.lr_scale:g} times the mode's learning rate, and again without the reward (weight 0): "
                     f"the last column is the reward's own effect. Gains are paired over the same held-out samples "
                     f"and seeds.")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[ModeResult], plan: Plan, path: str) -> None:
    """The held-out fill IoU while training, a line per mode, against the samples seen; the threshold dashed and
    the base without control dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in results:
        steps, values, _ = zip(*r.curve)
        ax.plot([s * plan.batch_size for s in steps], values, marker=".", label=BY_NAME[r.name].label)
    base = [r.curve[0][2] for r in results if r.curve[0][2] == r.curve[0][2]]  # step 0 without control (not nan)
    if base:
        ax.axhline(sum(base) / len(base), color="gray", linestyle=":", label="without control (the base)")
    ax.axhline(plan.threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {plan.threshold:g}")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(f"held-out fill IoU ({plan.val_samples} samples)")
    ax.set_title(f"{Path(plan.base_config).stem}: fill IoU while training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def header(plan: Plan, command: str, results: Sequence[ModeResult], rewards: Sequence[RewardResult]) -> str:
    minutes = sum(r.seconds for r in [*results, *rewards]) / 60
    return (f"# Control modes compared: {Path(plan.base_config).stem}\n\n    {command}\n\n"
            f"{machine()}, {date.today().isoformat()}; the modes' runs took {minutes:.1f} minutes in all.\n\n")


def compare(plan: Plan, names: Sequence[str], work: Path, out: Path, force: bool = False, command: str = "",
            reward: RewardPlan | None = None) -> dict[str, Any]:
    """Run the comparison (with a reward phase after each mode's training when `reward` is given) and write `out` (a
    folder: comparison.md, fidelity.png, results.json); returns what results.json holds."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    if plan.base is not None and not Path(plan.base).is_file():
        raise UserError(f"--base {plan.base}: no such file")
    started = time.perf_counter()
    modes, left_out = family_modes(Path(plan.base_config), names)
    if not modes:
        raise UserError(f"none of the modes asked for has a config in the family of {plan.base_config}",
                        "; ".join(f"{n}: {why}" for n, why in left_out.items()))
    train = circles(work, "train", plan.n_train, plan.resolution, 0)
    val = circles(work, "val", plan.n_val, plan.resolution, 1)
    results = [run_mode(mode, plan, work, train, val, force) for mode in modes]
    rewards = [] if reward is None else [run_reward(mode, result, plan, reward, work, train, val, force)
                                         for mode, result in zip(modes, results)]
    summary = {"plan": asdict(plan), "command": command, "machine": machine(), "date": date.today().isoformat(),
               "command_seconds": time.perf_counter() - started, "left_out": left_out,
               "modes": [asdict(r) for r in results], "reward": None if reward is None else asdict(reward),
               "reward_phases": [asdict(r) for r in rewards]}
    text = header(plan, command, results, rewards) + table(results, left_out, plan, rewards, reward)
    with atomic_output(out, force=force, folder=True) as tmp:
        write_text(Path(tmp) / "comparison.md", text)
        write_text(Path(tmp) / "results.json", json.dumps(summary, indent=1))
        plot(results, plan, str(Path(tmp) / "fidelity.png"))
    log.info("\n%s\nWritten: %s", text, out)
    return summary


# ---- the command line (benchmarks/compare_modes.py) ----

DEMO = dict(resolution=64, n_train=8000, n_val=128, steps=1000, batch_size=32, val_every=50, val_samples=32,
            eval_samples=128, sample_steps=20, cost_steps=10, reward_steps=200)
FAST = dict(resolution=64, n_train=16, n_val=4, steps=2, batch_size=2, val_every=1, val_samples=2, eval_samples=2,
            sample_steps=2, cost_steps=1, reward_steps=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_config", default="models/cldm_demo.yaml",
                   help="the family's ControlNet config; the other modes' are beside it, named <stem>_<mode>.yaml "
                        "(default %(default)s)")
    p.add_argument("--base", default="models/demo_base/demo_base.safetensors",
                   help="the base weights (a Stable Diffusion checkpoint for the SD1.5 family); 'none': random "
                        "(default %(default)s)")
    p.add_argument("--modes", nargs="+", choices=list(BY_NAME), default=list(BY_NAME),
                   help="the modes to compare (default: all)")
    p.add_argument("--fast", action="store_true", help="a smoke run: a few steps and samples of each mode")
    sizes = p.add_argument_group("the run (default: the demo's, docs/demo.md; --fast: a smoke run's)")
    for name, value in DEMO.items():
        sizes.add_argument(f"--{name}", type=int, default=None, help=f"(default {value}, --fast {FAST[name]})")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="of validation and evaluation (default 3)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="the held-out fill IoU whose first crossing is the 'sudden convergence' (default 0.5)")
    reward = p.add_argument_group("the reward phase after training (ControlNet++'s fine-tuning, cldm/reward.py; "
                                  "--reward_steps 0: none)")
    reward.add_argument("--reward", choices=REWARDS, default="fill",
                        help="the reward (default fill: the circles' own; the others need their data and detectors)")
    reward.add_argument("--reward_lr_scale", type=float, default=0.1,
                        help="the phase's learning rate, times each mode's (default 0.1: the demo's ControlNet "
                             "1e-4 -> 1e-5, which the reward's measurements chose)")
    reward.add_argument("--reward_max_t", type=int, default=None,
                        help="reward the samples with timestep <= this (default: the paper's 200)")
    reward.add_argument("--reward_weight", type=float, default=None, help="(default: the reward's own)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="32", help="tutorial_train's (default 32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--work_dir", default="compare_out",
                   help="the training runs and data; a finished mode there is reused (default %(default)s)")
    p.add_argument("--out", default=None,
                   help="the results folder (default docs/modes/<base config stem>)")
    p.add_argument("--force", action="store_true", help="replace --out, and runs of another plan in --work_dir")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {name: getattr(args, name) if getattr(args, name) is not None else (FAST if args.fast else DEMO)[name]
             for name in DEMO}
    reward_steps = sizes.pop("reward_steps")
    reward = RewardPlan(args.reward, reward_steps, args.reward_lr_scale, args.reward_max_t,
                        args.reward_weight) if reward_steps > 0 else None
    base = None if args.base.lower() == "none" else args.base
    plan = Plan(args.base_config, base, **sizes, guidance_scale=args.guidance_scale, threshold=args.threshold,
                precision=args.precision, device=args.device)
    out = Path(args.out or Path("docs") / "modes" / Path(args.base_config).stem)
    command = shlex.join(["python", "benchmarks/compare_modes.py", *(argv if argv is not None else sys.argv[1:])])
    return compare(plan, args.modes, Path(args.work_dir), out, args.force, command, reward)

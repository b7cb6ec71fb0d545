"""The offline demo: train a ControlNet on the CPU in minutes and measure that its control is obeyed.

    python demo.py           # about 10 minutes on 2 CPU cores; results in demo_out/
    python demo.py --fast    # the same steps as a smoke run of under 2 minutes (the test suite runs it)

No GPU and no downloads: the base model (a tiny SD1-style VAE, text encoder and UNet trained once on
circles, see models/demo_base/MODEL_CARD.md) ships with the repo. The demo runs the tutorial's own tools:
  1. tool_make_fill50k.py   64x64 Fill50K train and held-out sets (seeds 0 and 1) in demo_out/data/
  2. tool_add_control.py    the base plus a ControlNet copy of its encoder: demo_out/control_demo_ini.safetensors
  3. tutorial_train.py      trains it with models/cldm_demo.yaml (Lightning's progress bar; ImageLogger grids
                            in demo_out/train/image_log/train/, losses in demo_out/train/lightning_logs/)
  4. tool_eval_control.py   samples held-out prompts with and without control from the same seeds, and scores
  with --reward_steps N (or the settings' default), a reward phase (ControlNet++'s fine-tuning, cldm/reward.py):
  5. tutorial_train.py      continues the run for N steps with the fill reward (--resume ... --reward fill)
  6. tool_eval_control.py   scores the fine-tuned model on the same samples and seeds, paired with step 4's scores
then writes demo_out/report.html (hint | target | without | with control, the loss curve, the metric table)
and demo_out/metrics.json. Goal: held-out fill IoU with control >= 0.6 and >= 2x the IoU without control.
"""

import argparse
import base64
import csv
import html
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cldm import cli
from cldm.training import latest_metrics_csv
from ldm.checkpoint import write_text

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "models" / "cldm_demo.yaml"
BASE = ROOT / "models" / "demo_base" / "demo_base.safetensors"
GOAL_IOU, GOAL_RATIO = 0.6, 2.0


@dataclass(frozen=True)
class Settings:
    n_train: int
    n_eval: int
    steps: int
    batch_size: int
    learning_rate: float  # the hint block and zero convs take cldm_demo.yaml's lr_multipliers times this
    sd_locked: bool
    logger_freq: int
    sample_steps: int  # DDIM steps of the ImageLogger grids
    ddim_steps: int  # DDIM steps of the evaluation
    guidance_scale: float
    log_every: int
    reward_steps: int  # the reward phase after training (0: none), with the fill reward
    reward_learning_rate: float
    reward_max_t: int


FULL = Settings(n_train=8000, n_eval=128, steps=1000, batch_size=32, learning_rate=1e-4, sd_locked=False,
                logger_freq=250, sample_steps=20, ddim_steps=20, guidance_scale=3.0, log_every=10,
                reward_steps=0, reward_learning_rate=1e-5, reward_max_t=200)
FAST = Settings(n_train=16, n_eval=4, steps=3, batch_size=2, learning_rate=1e-4, sd_locked=False,
                logger_freq=3, sample_steps=2, ddim_steps=2, guidance_scale=3.0, log_every=1,
                reward_steps=2, reward_learning_rate=1e-5, reward_max_t=999)


def idle_cores(before: str, after: str, cpus: Collection[int]) -> tuple[float, int]:
    """How many of `cpus` were idle between two readings of /proc/stat (idle and iowait time over all time, summed
    over the CPUs), and how many CPUs that counts (the ones both readings list)."""
    def times(stat: str) -> dict[int, tuple[int, int]]:  # cpu -> (idle, total) in clock ticks
        out = {}
        for line in stat.splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
                out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
        return out

    first, second = times(before), times(after)
    counted = [c for c in first if c in second and second[c][1] > first[c][1]]
    idle = sum((second[c][0] - first[c][0]) / (second[c][1] - first[c][1]) for c in counted)
    return idle, len(counted)


def threads_for(idle: float, cores: int) -> int:
    """Torch threads = the cores other processes leave idle, rounded (at least 1).

    Intra-op threads that share a core with a busy process stall each other. Measured on 2 cores (seconds per
    training step): with other jobs running, 1 thread 0.28-0.32 and 2 threads 0.45-3.95; idle, 1 thread 0.33-0.35
    and 2 threads 0.22-0.25.
    """
    return max(1, min(cores, int(idle + 0.5)))


def pick_threads(seconds: float = 1.0, stat: Path = Path("/proc/stat")) -> tuple[int, str]:
    """The thread count for what the cores are doing now (sampled over `seconds`), and why, in words.

    Not the load average: its one-minute window still holds work that has just ended (the demo's own pip install).
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    try:
        before = stat.read_text()
        time.sleep(seconds)
        idle, counted = idle_cores(before, stat.read_text(), cpus)
    except OSError:
        counted = 0
    if not counted:
        return len(cpus), f"all {len(cpus)} cores this process may use ({stat} does not say how busy they are)"
    threads = threads_for(idle, counted)
    return threads, f"{idle:.1f} of the {counted} cores this process may use were idle over the last {seconds:g} s"


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def command(tool: str, argv: list[str]) -> str:
    return " ".join(["python", tool, *map(shlex.quote, argv)])


def run_command(tool: str, argv: list[str], commands: list[str], threads: int | None) -> tuple[int, str]:
    """Run a tool as its own process, as a user would type it, after printing the command line; with `threads`
    torch threads, or (None) as many as the cores are idle right before it starts. Returns the count and why."""
    why = "--threads"
    if threads is None:
        threads, why = pick_threads()
    line = command(tool, argv)
    commands.append(line)
    print(f"\n$ {line}\n({threads} torch thread{'s' * (threads > 1)}: {why})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the tool
    if subprocess.run([sys.executable, str(ROOT / tool), *argv], env=env).returncode != 0:
        raise ChildProcessError(f"{tool} failed (its message is above); the command was: {line}")
    return threads, why


def loss_curve(metrics_csv: Path) -> list[tuple[int, float]]:
    with open(metrics_csv) as f:
        return [(int(r["step"]), float(r["train/loss_step"])) for r in csv.DictReader(f) if r.get("train/loss_step")]


def svg_curve(points: list[tuple[int, float]], width: int = 640, height: int = 240, window: int = 10) -> str:
    """The loss per logged step (light) and its running mean over `window` points (dark), as inline SVG."""
    if len(points) < 2:
        return "<p>(too few logged steps for a curve)</p>"
    steps, losses = zip(*points)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    pad, top = 40, max(losses)
    x = lambda s: pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * pad)  # noqa: E731
    y = lambda v: height - pad + -(v / top) * (height - 2 * pad)  # noqa: E731

    def polyline(values: list[float], color: str) -> str:
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values))
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>'

    axes = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>'
            f'<text x="{pad}" y="{height - 15}" font-size="11">step {steps[0]}</text>'
            f'<text x="{width - pad}" y="{height - 15}" font-size="11" text-anchor="end">step {steps[-1]}</text>'
            f'<text x="{pad - 4}" y="{pad}" font-size="11" text-anchor="end">{top:.2f}</text>'
            f'<text x="{pad - 4}" y="{height - pad}" font-size="11" text-anchor="end">0</text>')
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{axes}'
            f'{polyline(list(losses), "#bbb")}{polyline(smooth, "#1f5fa8")}</svg>')


def last_grids(image_log: Path) -> list[Path]:
    """The ImageLogger grids of the last step it logged (names hold `_gs-{step:06}_`)."""
    step = lambda p: int(p.name.split("_gs-")[1][:6])  # noqa: E731
    grids = sorted(image_log.glob("*_gs-*.png"))
    return [p for p in grids if step(p) == max(map(step, grids))] if grids else []


def embed_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def goal(summary: dict) -> dict:
    """The issue's goal on the fill IoU, and whether control beats no control by more than seed noise."""
    fill = summary["metrics"]["fill_iou"]
    with_control, without = fill["control"]["mean"], fill["no_control"]["mean"]
    diff = fill["paired_diff"]
    return {"fill_iou_control": with_control, "fill_iou_no_control": without,
            "ratio": with_control / without if without > 0 else float("inf"),
            "reached": with_control >= GOAL_IOU and with_control >= GOAL_RATIO * without,
            "beats_seed_noise": diff["mean"] - diff["ci95"] > 0,
            "target": f"fill IoU with control >= {GOAL_IOU} and >= {GOAL_RATIO}x without"}


def app_command(control: Path, guidance_scale: float) -> str:
    """The command that opens the interactive scribble app on the trained model: the shipped base plus the control
    export (with sd_locked=False it holds the trained UNet decoder too), at the guidance scale of the evaluation."""
    return command("gradio_apps/gradio_scribble2image_interactive.py", [
        "--config", str(CONFIG.relative_to(ROOT)), "--base", str(BASE.relative_to(ROOT)), "--ckpt", str(control),
        "--scale", str(guidance_scale)])


def reward_section(reward: dict | None) -> str:
    """The report's before / after table of the reward phase (empty without one)."""
    if reward is None:
        return ""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{e['before']:.3f}</td><td>{e['after']:.3f}</td>"
                   f"<td>{e['paired_diff']['mean']:+.3f} ± {e['paired_diff']['ci95']:.3f}</td></tr>"
                   for name, e in reward["compared"].items())
    return (f"<h2>Reward fine-tuning</h2><p>After training, {reward['steps']} more steps with the fill reward "
            f"(ControlNet++'s fine-tuning: the one-step denoised image's soft fill region against the target's disc "
            f"on the samples with timestep &lt;= {reward['max_t']}, learning rate {reward['learning_rate']:g}). "
            f"The same held-out samples and seeds before and after:</p><table><tr><th>metric (with control)</th>"
            f"<th>before</th><th>after</th><th>difference (95% CI)</th></tr>{rows}</table>")


def write_report(out: Path, metrics: dict, summary: dict, curve: list[tuple[int, float]], sheet: Path,
                 grids: list[Path]) -> Path:
    g = metrics["goal"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{e['control']['mean']:.3f} ± {e['control']['std']:.3f}</td>"
        f"<td>{e['no_control']['mean']:.3f} ± {e['no_control']['std']:.3f}</td>"
        f"<td>{e['paired_diff']['mean']:+.3f} ± {e['paired_diff']['ci95']:.3f}</td></tr>"
        for name, e in summary["metrics"].items())
    verdict = "reached" if g["reached"] else "NOT reached"
    commands = "\n".join(html.escape(c) for c in metrics["commands"])
    grid_html = "".join(f"<figure>{embed_png(p)}<figcaption>{html.escape(p.name)}</figcaption></figure>"
                        for p in grids)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ControlNet demo</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}
td:first-child{{text-align:left}}figure img{{width:512px;image-rendering:pixelated}}
pre{{background:#f4f4f4;padding:8px;overflow-x:auto}}</style></head><body>
<h1>ControlNet demo: Fill50K at 64x64, trained on the CPU</h1>
<p>Goal ({html.escape(g["target"])}): <b>{verdict}</b>. Held-out fill IoU {g["fill_iou_control"]:.3f} with control,
{g["fill_iou_no_control"]:.3f} without ({g["ratio"]:.1f}x); paired difference over the same seeds
{"exceeds" if g["beats_seed_noise"] else "does not exceed"} its 95% interval.
{summary["n"]} held-out samples, {summary["sampler"]} {summary["steps"]} steps,
guidance {summary["guidance_scale"]}.</p>
<p>Took {metrics["seconds"]["total"] / 60:.1f} minutes on {html.escape(metrics["machine"])}
with {metrics["threads"]} torch thread(s) in training ({html.escape(metrics["threads_why"])}).</p>
<h2>Samples</h2>{embed_png(sheet)}
<h2>Metrics</h2><table><tr><th>metric</th><th>with control</th><th>without control</th>
<th>difference (95% CI)</th></tr>{rows}</table>
<p>fill_iou: IoU of the pixels nearer the circle's colour than the background's with the target disc;
fill_color_acc: that region's mean colour within 50 RGB of the circle's; fill_floor_iou: "fill everything";
canny_f1: hint edges vs cv2.Canny of the output within 2 px; ssim: hint vs Canny of the output.</p>
{reward_section(metrics.get("reward"))}
<h2>Training loss</h2>{svg_curve(curve)}<p>grey: each logged step; blue: running mean of 10.</p>
<h2>ImageLogger grids (last step)</h2>{grid_html}
<h2>Commands run</h2><pre>{commands}</pre>
<h2>See the control in a browser</h2><p>Draw a circle, prompt its colours (e.g. "red circle with blue background"),
press Run:</p><pre>{html.escape(metrics["app_command"])}</pre></body></html>"""
    path = out / "report.html"
    write_text(path, page)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="smoke run: a few steps and samples, under 2 minutes")
    p.add_argument("--out", default="demo_out", help="output folder (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: for each tool, the cores idle over the second before it starts)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 1000, or 3 with --fast)")
    p.add_argument("--reward_steps", type=int, default=None,
                   help=f"steps of the reward phase after training, 0 for none (default {FULL.reward_steps}, or "
                        f"{FAST.reward_steps} with --fast)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it writes to metrics.json."""
    args = parse_args(argv)
    started = time.monotonic()
    settings = FAST if args.fast else FULL
    given = {k: v for k, v in (("steps", args.steps), ("reward_steps", args.reward_steps)) if v is not None}
    settings = Settings(**{**asdict(settings), **given})
    out = Path(args.out)
    if (out / "metrics.json").exists() and not args.force:
        raise FileExistsError(f"{out} holds the results of an earlier run; pass --force to replace them, "
                              "or choose --out")
    if not BASE.is_file():
        raise FileNotFoundError(f"{BASE} not found: it ships with the repository (or rebuild it with "
                                "tool_train_tiny_base.py)")
    threads = args.threads  # None: each tool gets the cores idle when it starts
    print(f"ControlNet demo ({'fast' if args.fast else 'full'}): {settings}", flush=True)

    seconds, commands = {}, []
    data, train_dir, ini = out / "data", out / "train", out / "control_demo_ini.safetensors"
    control = train_dir / "control_model.safetensors"
    t = time.monotonic()
    for name, n, seed in (("train", settings.n_train, 0), ("val", settings.n_eval, 1)):
        run_command("tool_make_fill50k.py", ["--out", str(data / name), "--n", str(n), "--size", "64", "--seed",
                                          str(seed), "--force"], commands, threads)
    seconds["data"] = time.monotonic() - t

    t = time.monotonic()
    run_command("tool_add_control.py", [str(BASE), str(ini), "--config", str(CONFIG), "--force"], commands, threads)
    seconds["add_control"] = time.monotonic() - t

    t = time.monotonic()
    train_argv = ["--config", str(CONFIG), "--resume_path", str(ini), "--data_root", str(data / "train"),
                  "--batch_size", str(settings.batch_size), "--learning_rate", str(settings.learning_rate),
                  "--sd_locked", str(settings.sd_locked), "--max_steps", str(settings.steps),
                  "--logger_freq", str(settings.logger_freq), "--sample_steps", str(settings.sample_steps),
                  "--log_every_n_steps", str(settings.log_every), "--checkpoint_every", str(settings.steps),
                  "--output_dir", str(train_dir), "--export", str(control), "--accelerator", "cpu",
                  "--devices", "1", "--seed", "0", "--force"]
    train_threads, train_threads_why = run_command("tutorial_train.py", train_argv, commands, threads)
    seconds["train"] = time.monotonic() - t
    curve = loss_curve(latest_metrics_csv(train_dir))

    t = time.monotonic()
    sheet, eval_json = out / "samples.png", out / "eval.json"
    trained_eval = out / "eval_before_reward.json" if settings.reward_steps else eval_json
    # the shipped base plus the exported control file (with sd_locked=False it holds the trained UNet decoder too)
    eval_common = ["--config", str(CONFIG), "--data_root", str(data / "val"), "--n", str(settings.n_eval),
                   "--metrics", "fill", "canny", "ssim", "--seed", "0", "--steps", str(settings.ddim_steps),
                   "--scale", str(settings.guidance_scale), "--device", "cpu", "--force"]
    run_command("tool_eval_control.py", ["--ckpt", str(BASE), str(control), *eval_common, "--out", str(trained_eval),
                                         *([] if settings.reward_steps else ["--sheet", str(sheet)])],
                commands, threads)
    seconds["eval"] = time.monotonic() - t
    reward = None
    if settings.reward_steps:
        t = time.monotonic()
        reward_dir = out / "reward"
        control = reward_dir / "control_model.safetensors"
        total_steps = settings.steps + settings.reward_steps
        reward_argv = ["--config", str(CONFIG), "--resume", str(train_dir / "checkpoints" / "last.ckpt"),
                       "--data_root", str(data / "train"), "--batch_size", str(settings.batch_size),
                       "--learning_rate", str(settings.reward_learning_rate), "--sd_locked", str(settings.sd_locked),
                       "--max_steps", str(total_steps), "--reward", "fill", "--reward_max_t",
                       str(settings.reward_max_t), "--gradient_checkpointing", "False",
                       "--logger_freq", str(total_steps + 1), "--sample_steps", str(settings.sample_steps),
                       "--log_every_n_steps", str(settings.log_every), "--checkpoint_every", str(total_steps),
                       "--output_dir", str(reward_dir), "--export", str(control), "--accelerator", "cpu",
                       "--devices", "1", "--seed", "0", "--force"]
        run_command("tutorial_train.py", reward_argv, commands, threads)
        seconds["reward"] = time.monotonic() - t
        t = time.monotonic()
        run_command("tool_eval_control.py", ["--ckpt", str(BASE), str(control), *eval_common, "--out", str(eval_json),
                                             "--sheet", str(sheet), "--compare_with", str(trained_eval)],
                    commands, threads)
        seconds["reward_eval"] = time.monotonic() - t
        reward = {"steps": settings.reward_steps, "learning_rate": settings.reward_learning_rate,
                  "max_t": settings.reward_max_t, "before": json.loads(trained_eval.read_text())["metrics"],
                  "compared": json.loads(eval_json.read_text())["compared_with"]["metrics"]}
    summary = json.loads(eval_json.read_text())
    seconds["total"] = time.monotonic() - started

    grids = last_grids(train_dir / "image_log" / "train")
    metrics = {"goal": goal(summary), "eval": summary, "settings": asdict(settings),
               "threads": train_threads, "threads_why": train_threads_why,
               "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "commands": commands,
               "app_command": app_command(control, settings.guidance_scale), "loss_curve": curve,
               **({"reward": reward} if reward else {})}
    report = write_report(out, metrics, summary, curve, sheet, grids)
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    g = metrics["goal"]
    print(f"\nHeld-out fill IoU: {g['fill_iou_control']:.3f} with control, {g['fill_iou_no_control']:.3f} without "
          f"({g['ratio']:.1f}x); goal ({g['target']}) {'reached' if g['reached'] else 'NOT reached'}"
          f"{' (a smoke run: its few steps are not meant to train the control)' if args.fast else ''}.")
    if reward:
        fill = reward["compared"]["fill_iou"]
        print(f"Reward phase ({reward['steps']} steps): fill IoU {fill['before']:.3f} -> {fill['after']:.3f}, "
              f"paired difference {fill['paired_diff']['mean']:+.3f} ± {fill['paired_diff']['ci95']:.3f} (95% CI).")
    shown = f"Image grids: {grids[0].parent}\n" if grids else ""
    print(f"Done in {seconds['total'] / 60:.1f} minutes. Report: {report}\nMetrics: {out / 'metrics.json'}\n{shown}"
          f"See the control in a browser (draw a circle, prompt e.g. \"red circle with blue background\"):\n"
          f"  {metrics['app_command']}")
    return metrics


if __name__ == "__main__":
    sys.exit(cli.run_tool(main))

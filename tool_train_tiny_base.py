"""Train the demo's base model once: the x8 KL-VAE, the text encoder and the UNet of models/cldm_demo.yaml.

    python tool_train_tiny_base.py --out base.safetensors --budget_s 14400            # on a CPU: hours
    python tool_train_tiny_base.py --check models/demo_base/demo_base.safetensors     # the circle check only

The shipped weights took 5 minutes on one GPU, in two runs (models/demo_base/MODEL_CARD.md has the commands):
    python tool_train_tiny_base.py --out run1.safetensors --device cuda --budget_s 220 --bf16
    python tool_train_tiny_base.py --resume run1.safetensors --out demo_base.safetensors --device cuda \\
        --budget_s 80 --batch 2048 --lr 1e-3 --warmup 100 --ema_decay 0.998

Data: Fill50K circles rendered in memory with tool_make_fill50k (seed --seed, disjoint from the demo's sets).
Stage 1 trains the VAE (L1 + MSE + 1e-6 KL: SD's autoencoder loss without its perceptual and GAN terms).
Stage 2 freezes it, sets scale_factor to 1 / std of the latents, and trains the UNet and the text encoder
together (eps-prediction, 10% empty prompts for classifier-free guidance, EMA weights). Each stage stops at
its step count or at its share of --budget_s, whichever comes first, and its learning rate follows a cosine
over that progress. The weights are saved after stage 1, every --save_every_s seconds and at the end: all
but control_model.*, in float16 except the schedule buffers and scale_factor.

The circle check (printed, and written to --report): sample --check_n held-out prompts without control. A
sample passes if its fill region (pixels nearer the prompted circle colour than the prompted background) has
IoU >= 0.8 with its best-fitting disc and the region's mean colour is within 50 RGB of the prompted colour.
The base is good enough when at least 80% pass.
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cldm.cli import run_tool
from cldm.data.circles import render, sample_circle
from cldm.fidelity import COLOR_TOLERANCE, color_error, disc_fit_iou, fill_region, generate, save_png, score_fill
from cldm.model import CONTROL_PREFIX, create_model, load_checkpoint, save_state_dict
from ldm.checkpoint import BASE_PREFIXES, TEXT_ENCODER_PREFIX, UNET_PREFIX, write_text

ROOT = Path(__file__).resolve().parent
PASS_DISC_IOU, PASS_RATE = 0.8, 0.8


def render_pool(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """n Fill50K targets (uint8 NHWC) and their circles; sample i is sample_circle(default_rng([seed, i]))."""
    circles = [sample_circle(np.random.default_rng([seed, i]), size) for i in range(n)]
    return torch.from_numpy(np.stack([render(c, size)[1] for c in circles])), circles


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Schedule:
    """Progress of a stage (steps or wall-clock share, whichever is further) and its warmup-cosine LR."""

    def __init__(self, steps: int, seconds: float, lr: float, warmup: int):
        self.steps, self.seconds, self.lr, self.warmup = steps, seconds, lr, warmup
        self.start = time.monotonic()

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.monotonic() - self.start) / self.seconds)

    def rate(self, step: int) -> float:
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress(step))))
        return self.lr * min(1.0, (step + 1) / self.warmup) * cosine

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_vae(model: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace, device: torch.device,
              log: dict) -> None:
    vae = model.first_stage_model
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = Schedule(args.vae_steps, args.budget_s * args.vae_share, args.vae_lr, warmup=100)
    step, curve = 0, []
    while schedule.progress(step) < 1:
        for group in opt.param_groups:
            group["lr"] = schedule.rate(step)
        x = to_model_range(images[torch.randint(len(images), (args.vae_batch,), device=device)])
        with autocast(device, args.bf16):
            posterior = vae.encode(x)
            rec = vae.decode(posterior.sample())
        rec = rec.float()
        # per-pixel L1 + MSE; the KL is summed per image as in SD, so 1e-6 weighs it per pixel-sum
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            curve.append(round(loss.item(), 5))
        if step % args.print_every == 0:
            print(f"vae step {step} loss {loss.item():.4f} ({schedule.elapsed():.0f}s)", flush=True)
    vae.requires_grad_(False)
    log["vae"] = {"steps": step, "seconds": round(schedule.elapsed(), 1), "batch": args.vae_batch,
                  "lr": args.vae_lr, "loss_every_50": curve}


@torch.no_grad()
def encode_pool(model: torch.nn.Module, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image: stage 2 samples latents from them without the encoder."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = model.first_stage_model.encode(to_model_range(images[start:start + batch]))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def prompt_tokens(encoder: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of every pool prompt and of the empty prompt, each distinct prompt tokenized once: open_clip's
    BPE costs ~0.1 ms a prompt, more than a GPU step's share."""
    distinct = list(dict.fromkeys(prompts))
    table = encoder.tokenize([*distinct, ""])
    row = {prompt: i for i, prompt in enumerate(distinct)}
    return table[[row[prompt] for prompt in prompts]], table[-1]


PREFIXES = {"unet": UNET_PREFIX, "text": TEXT_ENCODER_PREFIX}


def trained_modules(model: torch.nn.Module) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"unet": model.model.diffusion_model, "text": model.cond_stage_model})


def base_state_dict(model: torch.nn.Module, ema: AveragedModel | None = None) -> dict[str, torch.Tensor]:
    """The base's weights (EMA ones where given): float16, except the schedule buffers and scale_factor."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(CONTROL_PREFIX)}
    if ema is not None:
        for name, module in ema.module.items():
            state.update({PREFIXES[name] + k: v for k, v in module.state_dict().items()})
    return {k: v.half() if k.startswith(BASE_PREFIXES) and v.is_floating_point() else v for k, v in state.items()}


def train_diffusion(model: torch.nn.Module, images: torch.Tensor, prompts: list[str], args: argparse.Namespace,
                    device: torch.device, log: dict, save) -> AveragedModel:
    mean, std = encode_pool(model, images)
    if not args.resume:
        # unit-variance latents, as SD's 0.18215 makes them for its own VAE
        model.scale_factor.fill_(1.0 / float((mean + std * torch.randn_like(std)).std()))
    modules = trained_modules(model)
    modules.requires_grad_(True)
    encoder = model.cond_stage_model
    pool_tokens, empty_tokens = prompt_tokens(encoder, prompts)
    ema = AveragedModel(modules, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
    opt = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=0.0)
    seconds = args.budget_s if args.resume else args.budget_s * (1 - args.vae_share)
    schedule = Schedule(args.steps, seconds, args.lr, warmup=args.warmup)
    step, curve, last_save = 0, [], time.monotonic()
    while schedule.progress(step) < 1:
        for group in opt.param_groups:
            group["lr"] = schedule.rate(step)
        picked = torch.randint(len(images), (args.batch,))  # on the CPU: the prompts need it without a sync
        idx = picked.to(device)
        z = model.scale_factor * (mean[idx] + std[idx] * torch.randn_like(std[idx]))
        keep = torch.rand(args.batch).ge(args.drop_prompt_rate)
        tokens = torch.where(keep[:, None], pool_tokens[picked], empty_tokens)
        t = torch.randint(0, model.num_timesteps, (args.batch,), device=device)
        with autocast(device, args.bf16):
            c = encoder.encode_tokens(tokens)
            loss, _ = model.p_losses(z, {"c_crossattn": [c]}, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(modules)
        step += 1
        if step % 50 == 0:
            curve.append(round(loss.item(), 5))
        if step % args.print_every == 0:
            print(f"unet step {step} loss {loss.item():.4f} lr {schedule.rate(step):.2e} "
                  f"({schedule.elapsed():.0f}s)", flush=True)
        if time.monotonic() - last_save > args.save_every_s:
            save(base_state_dict(model, ema))
            last_save = time.monotonic()
    modules.requires_grad_(False)
    log["unet"] = {"steps": step, "seconds": round(schedule.elapsed(), 1), "batch": args.batch, "lr": args.lr,
                   "ema_decay": args.ema_decay, "drop_prompt_rate": args.drop_prompt_rate, "loss_every_50": curve}
    return ema


def circle_check(model: torch.nn.Module, n: int, seed: int, size: int, ddim_steps: int, guidance_scale: float,
                 batch_size: int = 256) -> tuple[dict, np.ndarray, list[dict]]:
    """Sample held-out prompts without control and score them as circles (module docstring); also the images."""
    circles = [sample_circle(np.random.default_rng([seed, i]), size) for i in range(n)]
    images = generate(model, [c["prompt"] for c in circles], None, [seed * 100_000 + i for i in range(n)],
                      ddim_steps, guidance_scale, batch_size)
    disc_ious, color_ok = [], []
    for image, c in zip(images, circles):
        color, background = np.array(c["color"], np.float32), np.array(c["background"], np.float32)
        region = fill_region(image, color, background)
        disc_ious.append(disc_fit_iou(region))
        color_ok.append(color_error(image, region, color) < COLOR_TOLERANCE)
    disc_ious, color_ok = np.array(disc_ious), np.array(color_ok)
    passed = (disc_ious >= PASS_DISC_IOU) & color_ok
    result = {"n": n, "seed": seed, "ddim_steps": ddim_steps, "guidance_scale": guidance_scale,
              "pass_rate": float(passed.mean()), "disc_iou_mean": float(disc_ious.mean()),
              "disc_iou_ge_0.8": float((disc_ious >= PASS_DISC_IOU).mean()), "color_acc": float(color_ok.mean()),
              "good_enough": bool(passed.mean() >= PASS_RATE)}
    return result, images, circles


@torch.no_grad()
def reconstruction_check(model: torch.nn.Module, n: int, seed: int, size: int) -> dict:
    """Fill IoU and colour accuracy of VAE reconstructions (posterior mean) of held-out targets."""
    targets, _ = render_pool(n, size, seed)
    x = to_model_range(targets.to(model.device))
    rec = model.first_stage_model.decode(model.first_stage_model.encode(x).mode())
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    scores = [score_fill(t, None, r) for t, r in zip(targets.numpy(), rec)]
    return {"n": n, "fill_iou": float(np.mean([s["fill_iou"] for s in scores])),
            "color_acc": float(np.mean([s["fill_color_acc"] for s in scores]))}


def save_grid(path: str | Path, images: np.ndarray, circles: list[dict], columns: int = 8, zoom: int = 2) -> None:
    """Samples with their two colour names beneath, `columns` per row."""
    n = len(images)
    h, w = images.shape[1] * zoom, images.shape[2] * zoom
    cell_h = h + 24
    sheet = np.full((math.ceil(n / columns) * cell_h, columns * w, 3), 255, np.uint8)
    for i, (image, c) in enumerate(zip(images, circles)):
        y, x = (i // columns) * cell_h, (i % columns) * w
        sheet[y:y + h, x:x + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST)
        for line, text in enumerate((c["color_name"], "on " + c["background_name"])):
            cv2.putText(sheet, text[:21], (x + 2, y + h + 10 + 11 * line), cv2.FONT_HERSHEY_PLAIN, 0.7,
                        (0, 0, 0), 1, cv2.LINE_AA)
    save_png(path, sheet)


def machine() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    gpu = f"{torch.cuda.get_device_name()}; " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}; torch {torch.__version__}; {platform.platform()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "models" / "cldm_demo.yaml"))
    p.add_argument("--out", default=str(ROOT / "models" / "demo_base" / "demo_base.safetensors"))
    p.add_argument("--check", default=None, metavar="WEIGHTS", help="only run the circle check on these weights")
    p.add_argument("--report", default=None, help="JSON report (default: beside --out, or --check, as .json)")
    p.add_argument("--grid", default=None, help="PNG of the first check samples (default: beside the report)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--resume", default=None, metavar="WEIGHTS",
                   help="continue stage 2 from these base weights (their VAE and scale_factor are kept)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast; on small GPU batches float32 (TF32) is as fast and launches fewer kernels")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1000, help="training data and torch seed")
    p.add_argument("--pool", type=int, default=50000, help="distinct training images rendered in memory")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--budget_s", type=float, default=14400, help="wall-clock seconds for both stages together")
    p.add_argument("--vae_share", type=float, default=0.3, help="the VAE's share of --budget_s")
    p.add_argument("--vae_steps", type=int, default=200_000)
    p.add_argument("--vae_batch", type=int, default=128)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1_000_000, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--drop_prompt_rate", type=float, default=0.1)
    p.add_argument("--save_every_s", type=float, default=60)
    p.add_argument("--print_every", type=int, default=200)
    p.add_argument("--check_n", type=int, default=256)
    p.add_argument("--check_seed", type=int, default=2000)
    p.add_argument("--check_steps", type=int, default=20, help="DDIM steps of the check (the demo's)")
    p.add_argument("--check_scales", type=float, nargs="+", default=[3.0],
                   help="guidance scales to check; the first is the headline (the demo's)")
    return p.parse_args(argv)


def run_checks(model: torch.nn.Module, args: argparse.Namespace, report: dict, grid: Path) -> None:
    model.eval()
    report["reconstruction"] = reconstruction_check(model, min(args.check_n, 256), args.check_seed, args.size)
    print(f"VAE reconstruction: {report['reconstruction']}", flush=True)
    report["check"] = []
    for i, scale in enumerate(args.check_scales):
        result, images, circles = circle_check(model, args.check_n, args.check_seed, args.size, args.check_steps,
                                               scale)
        report["check"].append(result)
        print(f"circle check: {result}", flush=True)
        if i == 0:
            save_grid(grid, images[:32], circles[:32])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it
    weights = Path(args.check or args.out)
    report_path = Path(args.report or weights.with_suffix(".json"))
    grid = Path(args.grid or report_path.with_name(report_path.stem + "_samples.png"))
    model = create_model(args.config).to(device)
    report = {"command": "python " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(), "config": str(args.config)}
    if args.check:
        load_checkpoint(model, args.check)
    else:
        if weights.exists() and not args.force:
            raise FileExistsError(f"{weights} already exists; pass --force to overwrite it")

        def save(state: dict) -> None:
            save_state_dict(state, weights, force=True)

        started = time.monotonic()
        images, circles = render_pool(args.pool, args.size, args.seed)
        images = images.to(device)
        print(f"rendered {args.pool} training images in {time.monotonic() - started:.1f}s", flush=True)
        report.update(seed=args.seed, pool=args.pool, budget_s=args.budget_s)
        model.train()
        if args.resume:
            load_checkpoint(model, args.resume, strict=True, prefixes=BASE_PREFIXES)
            report["resumed_from"] = str(args.resume)
        else:
            train_vae(model, images, args, device, report)
            save(base_state_dict(model))
        ema = train_diffusion(model, images, [c["prompt"] for c in circles], args, device, report, save)
        save(base_state_dict(model, ema))
        report["train_seconds"] = round(time.monotonic() - started, 1)
        # check exactly what ships: the float16 weights, reloaded
        load_checkpoint(model, str(weights))
    report["scale_factor"] = float(model.scale_factor)
    run_checks(model, args, report, grid)
    write_text(report_path, json.dumps(report, indent=1))
    print(f"weights: {weights}\nreport: {report_path}\nsamples: {grid}")
    return report


if __name__ == "__main__":
    sys.exit(run_tool(main))

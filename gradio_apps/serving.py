"""Serving the apps: the command lines of a diffusion app and of the annotator app, the device, and Gradio's
server. main() puts the parts together: load the model (gradio_apps/loading.py), build the page
(gradio_apps/page.py) over the request handler (gradio_apps/handling.py), serve it."""

import argparse
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
import torch

from cldm.cli import run_tool
from cldm.hack import disable_verbosity
from gradio_apps.app_spec import AnnotatorTab, ControlApp
from gradio_apps.handling import GUIDANCE, Pipeline
from gradio_apps.loading import MODELS, PRECISIONS, ControlFiles, Detectors, ModelFiles, load_model, speed_up
from gradio_apps.page import build_annotator_demo, build_demo
from ldm.checkpoint import UserError
from ldm.models.diffusion.ddpm import COMPILE_MODES

MAX_UPLOAD = "50mb"  # a large photo or an 8K PNG; Gradio refuses bigger uploads before reading them


def server_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where the model and detectors run (auto: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1; 0.0.0.0 opens the app to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or next free)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--random-weights", action="store_true",
                        help="FOR TESTS AND DEMOS ONLY: random model and detector weights, no files needed; "
                             "the pictures it makes are noise")
    return parser


def app_parser(app: ControlApp) -> argparse.ArgumentParser:
    parser = server_parser(app.title)
    parser.add_argument("--ckpt", default=None,
                        help=f"ControlNet checkpoint (default: models/{app.checkpoint}); with --base, a "
                             "control-only ControlNet 1.1 file")
    parser.add_argument("--base", default=None,
                        help="Stable Diffusion checkpoint loaded first; --ckpt then only adds the ControlNet")
    parser.add_argument("--config", default=str(MODELS / "cldm_v15.yaml"),
                        help="model config (default: models/cldm_v15.yaml)")
    parser.add_argument("--low-vram", action="store_true",
                        help="the original's save_memory: text encoder and VAE leave the GPU while sampling, "
                             "and attention is sliced")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="weights of the UNet and ControlNet: fp32 (as the original), or fp16 / bf16 (half their "
                             "memory, for GPUs; slower on most CPUs); the VAE and text encoder stay fp32")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        help="torch.compile the UNet and ControlNet (the first image of each size compiles; "
                             "'reduce-overhead' adds CUDA graphs)")
    parser.add_argument("--scale", type=float, default=GUIDANCE.value,
                        help="the Guidance Scale the page starts with (default 9, as the original apps; the demo's "
                             "small model wants 3)")
    parser.add_argument("--control-dir", default=str(MODELS),
                        help="folder (searched with its subfolders) of the control files each unit may choose: "
                             "ControlNet, control-LoRA and LLLite files (default: models/)")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu.")
    return torch.device(name)


def launch(demo: gr.Blocks, args: argparse.Namespace, block: bool = True) -> None:
    """Serve `demo` (uploads up to MAX_UPLOAD); block=False returns once it listens."""
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                        max_file_size=MAX_UPLOAD, prevent_thread_lock=not block)


def serve_app(app: ControlApp, argv: Sequence[str] | None) -> None:
    """Load the model, build the page, serve it; a user's mistake raises UserError."""
    args = app_parser(app).parse_args(argv)
    disable_verbosity()
    if not GUIDANCE.minimum <= args.scale <= GUIDANCE.maximum:
        raise UserError(f"--scale must be between {GUIDANCE.minimum:g} and {GUIDANCE.maximum:g}, got {args.scale}")
    device = resolve_device(args.device)
    files = ModelFiles(Path(args.config), Path(args.ckpt) if args.ckpt else MODELS / app.checkpoint,
                       Path(args.base) if args.base else None, args.random_weights)
    model = load_model(files, device)
    speed_up(model, args.precision, args.compile, low_vram=args.low_vram)
    control_files = ControlFiles(args.control_dir, model, files.config, files.own_control())
    pipeline = Pipeline(app, model, Detectors(device, args.random_weights), control_files, low_vram=args.low_vram,
                        model_name=files.name())
    launch(build_demo(app, pipeline, args.scale), args)


def main(app: ControlApp, argv: Sequence[str] | None = None) -> int:
    """Command line of a diffusion app; returns the exit status (1 after one line on a user's mistake)."""
    return run_tool(lambda args: serve_app(app, args), argv)


def serve_annotators(tabs: Sequence[AnnotatorTab], argv: Sequence[str] | None) -> None:
    args = server_parser("ControlNet annotators (detectors only, no diffusion model)").parse_args(argv)
    disable_verbosity()
    launch(build_annotator_demo(tabs, Detectors(resolve_device(args.device), args.random_weights)), args)


def annotator_main(tabs: Sequence[AnnotatorTab], argv: Sequence[str] | None = None) -> int:
    """Command line of the detectors-only app; returns the exit status."""
    return run_tool(lambda args: serve_annotators(tabs, args), argv)

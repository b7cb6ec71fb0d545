"""What every ControlNet app shares: the command line, model and detector loading, the original apps'
`process` pipeline, and their UI on Gradio 6. An app file only names its detector, checkpoint and sliders.

Pipeline (as lllyasviel/ControlNet's gradio_*2image.py): HWC3, resize to a multiple of 64, detect (at the
detector resolution where the original does), hint in [0, 1], DDIM with separate cond and uncond passes,
decode. Guess mode scales residual i by strength * 0.825 ** (12 - i) and gives the uncond pass no control.
"""

import argparse
import importlib
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import cv2
import einops
import gradio as gr
import numpy as np
import PIL.Image
import torch

import config
from annotator.util import HWC3, resize_image
from cldm.cli import CLI_ERRORS, EXIT_ERROR, error_lines
from cldm.model import create_model, load_checkpoint
from cldm.pipeline import sample
from ldm.checkpoint import BASE_PREFIXES, UserError
from ldm.models.diffusion.ddpm import COMPILE_MODES

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CONTROLNET_URL = "https://huggingface.co/lllyasviel/ControlNet/tree/main/models"
CONTROLNET_V11_URL = "https://huggingface.co/lllyasviel/ControlNet-v1-1/tree/main"
SD15_URL = "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (v1-5-pruned.ckpt)"
A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality")
MAX_ASPECT = 8  # beyond this side ratio, resizing the short side to the resolution takes unbounded memory


@dataclass(frozen=True)
class Slider:
    """A numeric setting shown in the UI and passed to `detect` as the keyword `name`."""

    name: str
    label: str
    minimum: float
    maximum: float
    value: float
    step: float

    def make(self) -> gr.Slider:
        # whole-number steps hand the function ints, which OpenCV and the detectors expect
        precision = 0 if float(self.step).is_integer() else None
        return gr.Slider(label=self.label, minimum=self.minimum, maximum=self.maximum, value=self.value,
                         step=self.step, precision=precision)


@dataclass(frozen=True)
class Checkbox:
    """A yes/no setting shown in the UI and passed to `detect` as the keyword `name`."""

    name: str
    label: str
    value: bool = False

    def make(self) -> gr.Checkbox:
        return gr.Checkbox(label=self.label, value=self.value)


Option = Slider | Checkbox


def identity(x: np.ndarray) -> np.ndarray:
    return x


def invert(x: np.ndarray) -> np.ndarray:
    """Line maps are shown as dark lines on white, as the original apps show them."""
    return 255 - x


def dark_strokes(_: Any, image: np.ndarray) -> np.ndarray:
    """Scribble hint: 255 where the picture is dark (pen on paper), 0 elsewhere."""
    return np.where(image.min(axis=2) < 127, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class ControlApp:
    """What one diffusion app adds to the shared pipeline and UI."""

    title: str
    checkpoint: str  # default --ckpt, in models/
    detect: Callable[..., np.ndarray]  # (detector or None, HWC uint8 RGB, **options) -> uint8 map
    detector: Callable[..., Any] | None = None  # detector class, built on first use
    detect_resolution: Slider | None = None  # None: detect on the image already at image_resolution
    options: tuple[Option, ...] = ()
    interpolation: int = cv2.INTER_LINEAR  # how the detected map is resized to the image size
    refine: Callable[[np.ndarray], np.ndarray] = identity  # resized map -> the hint the ControlNet sees
    preview: Callable[[np.ndarray], np.ndarray] = identity  # hint -> the map shown before the samples
    sketch: bool = False  # draw on a canvas instead of uploading a picture


@dataclass(frozen=True)
class AnnotatorTab:
    """One detector tab of the annotator app; its endpoint is /<name>."""

    name: str
    title: str
    detector: Callable[..., Any]
    detect: Callable[..., list[np.ndarray]]  # (detector, HWC uint8 RGB, **options) -> maps to show
    options: tuple[Option, ...] = ()
    resolution: int = 512


class Detectors:
    """Detectors built on first use, one per class: an app starts without their weight files."""

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        self.device = torch.device(device)
        self.random_init = random_init
        self._built: dict[Callable[..., Any], Any] = {}
        self._lock = threading.Lock()

    def get(self, factory: Callable[..., Any]) -> Any:
        with self._lock:
            if factory not in self._built:
                try:
                    self._built[factory] = factory(device=self.device, random_init=self.random_init)
                except (FileNotFoundError, RuntimeError) as err:  # missing, unsafe or mismatched weights
                    raise user_error(str(err), "Cannot load the detector", duration=None) from err
            return self._built[factory]


def image_input() -> gr.Image:
    """The upload box. An unreadable upload (a text file, a broken picture) becomes a message in the UI."""
    # RGBA keeps transparency for HWC3 to put on white; grayscale and palette pictures arrive as RGBA too
    image = gr.Image(label="Input image", sources=["upload", "clipboard"], type="numpy", image_mode="RGBA")
    decode = image.preprocess

    def preprocess(payload: Any) -> np.ndarray | None:
        try:
            return decode(payload)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise user_error(f"Could not read {name} as an image ({err}). Use a PNG, JPEG or WebP picture.",
                             "Not an image") from err

    # set on the instance: a gr.Image subclass would make Gradio write a .pyi stub next to this file
    image.preprocess = preprocess
    return image


def user_error(message: str, title: str, duration: float | None = 10) -> gr.Error:
    """A message for the UI, without a server-side traceback: the app itself did nothing wrong."""
    return gr.Error(message, duration=duration, title=title, print_exception=False)


def prepare(image: np.ndarray, resolution: int) -> np.ndarray:
    """The upload as HWC uint8 RGB for resize_image(., resolution).

    Pictures over twice the size needed are first shrunk (INTER_AREA, as resize_image shrinks), so a
    5000x5000 upload costs megabytes rather than HWC3's gigabyte of float copies. Pictures so elongated
    that the resized long side would be huge are refused.
    """
    h, w = image.shape[:2]
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise user_error(f"The image is {w}x{h} pixels; its sides may differ at most {MAX_ASPECT}:1. "
                         "Crop it closer to a square.", "Image too elongated")
    k = 2.0 * resolution / min(h, w)
    if k < 1.0:
        image = cv2.resize(image, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
    return HWC3(image)


def sketch_to_paper(value: dict | None) -> np.ndarray | None:
    """An ImageEditor value as black strokes on white: whatever a layer covers, plus dark background pixels
    (an uploaded scribble), so any brush colour counts as a stroke."""
    if value is None or value.get("composite") is None:
        return None
    drawn = HWC3(value["composite"]).min(axis=2) < 127
    for layer in value.get("layers") or []:
        drawn |= layer[:, :, 3] > 127
    return np.repeat(np.where(drawn, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def new_canvas(width: int, height: int) -> np.ndarray:
    return np.full((int(height), int(width), 3), 255, dtype=np.uint8)


def resolution_range(model: torch.nn.Module) -> tuple[int, int, int]:
    """(min, max, default) image resolution: half to 1.5x the model's training size, 256-768 for SD1.x."""
    native = model.image_size * model.vae_scale_factor
    low, high = max(64, native // 2), max(128, native * 3 // 2)
    return low, high, min(max(64 * round(native / 64), low), high)


class Pipeline:
    """The original apps' process(): detect, DDIM with the hint, decode; bad input raises gr.Error."""

    def __init__(self, app: ControlApp, model: torch.nn.Module, detectors: Detectors) -> None:
        self.app = app
        self.model = model
        self.detectors = detectors
        self.device = model.device

    def process(self, input_image: np.ndarray | dict | None, prompt: str, a_prompt: str, n_prompt: str,
                num_samples: int, image_resolution: int, ddim_steps: int, guess_mode: bool, strength: float,
                scale: float, seed: int, eta: float, progress: gr.Progress = gr.Progress(), **options: Any
                ) -> list[np.ndarray]:
        """[the detected map] + num_samples images of the resized input's size."""
        image = sketch_to_paper(input_image) if self.app.sketch else input_image
        if image is None:
            raise user_error("Draw a scribble first." if self.app.sketch else "Upload an input image first.",
                             "No input image")
        hint, shown = self.make_hint(image, int(image_resolution), **options)
        try:
            samples = self.sample(hint, f"{prompt or ''}, {a_prompt or ''}", n_prompt or "", int(num_samples),
                                  int(ddim_steps), bool(guess_mode), float(strength), float(scale), int(seed),
                                  float(eta or 0.0), progress)
        except torch.OutOfMemoryError as err:
            raise user_error("Out of GPU memory: use fewer Images, a lower Image Resolution, or --low-vram.",
                             "Out of memory") from err
        return [shown, *samples]

    def make_hint(self, image: np.ndarray, image_resolution: int, detect_resolution: int | None = None,
                  **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """(hint at the resized image's size, the map to show) from an uploaded uint8 picture."""
        app = self.app
        image = prepare(image, max(image_resolution, int(detect_resolution or 0)))
        img = resize_image(image, image_resolution)
        H, W, _ = img.shape
        # resized before detection, so a huge upload never reaches a detector at full size
        source = img if detect_resolution is None else resize_image(image, int(detect_resolution))
        detector = None if app.detector is None else self.detectors.get(app.detector)
        with torch.no_grad():
            detected = HWC3(app.detect(detector, source, **options))
        hint = app.refine(cv2.resize(detected, (W, H), interpolation=app.interpolation))
        return hint, app.preview(hint)

    @torch.no_grad()
    def sample(self, hint: np.ndarray, prompt: str, n_prompt: str, num_samples: int, ddim_steps: int,
               guess_mode: bool, strength: float, scale: float, seed: int, eta: float,
               progress: gr.Progress) -> list[np.ndarray]:
        """num_samples HWC uint8 images guided by `hint` (HWC uint8); seed -1 picks one at random."""
        control = torch.from_numpy(hint.copy()).float().to(self.device) / 255.0
        control = einops.rearrange(control, "h w c -> 1 c h w")
        # guess mode: the ControlNet acts on the cond pass only, so it alone has to carry the content
        unit = self.model.unit(control, strength=strength, mode="control" if guess_mode else "balanced")
        samples = sample(self.model, prompt, n_prompt, units=[unit], steps=ddim_steps, cfg_scale=scale,
                         seed=None if seed == -1 else seed, num_images=num_samples, eta=eta,
                         low_vram=config.save_memory,
                         callback=lambda done, total: progress((done, total), desc="Sampling", unit="steps"))
        return list(samples.images)


def gallery() -> gr.Gallery:
    # PNG: line maps stay exact (WebP would smear them)
    return gr.Gallery(label="Output", show_label=False, elem_id="gallery", columns=2, height="auto",
                      format="png")


def sketch_input() -> gr.Sketchpad:
    """Canvas size sliders, a button that opens a fresh white canvas, and the canvas itself."""
    canvas_width = Slider("canvas_width", "Canvas Width", 256, 1024, 512, 1).make()
    canvas_height = Slider("canvas_height", "Canvas Height", 256, 1024, 512, 1).make()
    create_button = gr.Button("Open drawing canvas!")
    canvas = gr.Sketchpad(label="Scribble", type="numpy", image_mode="RGBA", canvas_size=(512, 512),
                          brush=gr.Brush(default_size=6, default_color="#000000"))
    create_button.click(new_canvas, inputs=[canvas_width, canvas_height], outputs=[canvas],
                        api_name="new_canvas")
    return canvas


def build_demo(app: ControlApp, pipeline: Pipeline) -> gr.Blocks:
    """The original app's layout: input, prompt and Run, advanced options folded, gallery on the right."""
    resolutions = resolution_range(pipeline.model)
    with gr.Blocks(title=app.title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {app.title}")
        with gr.Row():
            with gr.Column():
                input_image = sketch_input() if app.sketch else image_input()
                prompt = gr.Textbox(label="Prompt")
                run_button = gr.Button("Run", variant="primary")
                with gr.Accordion("Advanced options", open=False):
                    num_samples = Slider("num_samples", "Images", 1, 12, 1, 1).make()
                    image_resolution = Slider("image_resolution", "Image Resolution", *resolutions, 64).make()
                    strength = Slider("strength", "Control Strength", 0.0, 2.0, 1.0, 0.01).make()
                    guess_mode = gr.Checkbox(label="Guess Mode", value=False)
                    settings = (app.detect_resolution, *app.options)
                    detector_options = {opt.name: opt.make() for opt in settings if opt is not None}
                    ddim_steps = Slider("ddim_steps", "Steps", 1, 100, 20, 1).make()
                    scale = Slider("scale", "Guidance Scale", 0.1, 30.0, 9.0, 0.1).make()
                    seed = gr.Slider(label="Seed", minimum=-1, maximum=2147483647, step=1, precision=0,
                                     randomize=True)
                    eta = gr.Number(label="eta (DDIM)", value=0.0)
                    a_prompt = gr.Textbox(label="Added Prompt", value=A_PROMPT)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=N_PROMPT)
            with gr.Column():
                result_gallery = gallery()
        inputs = [input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                  guess_mode, strength, scale, seed, eta]
        run_button.click(pipeline.process, inputs=inputs, inputs_kwargs=detector_options,
                         outputs=[result_gallery], api_name="process")
    return demo


def annotate_fn(tab: AnnotatorTab, detectors: Detectors) -> Callable[..., list[np.ndarray]]:
    def annotate(input_image: np.ndarray | None, resolution: int, **options: Any) -> list[np.ndarray]:
        if input_image is None:
            raise user_error("Upload an input image first.", "No input image")
        image = resize_image(prepare(input_image, int(resolution)), int(resolution))
        with torch.no_grad():
            return tab.detect(detectors.get(tab.detector), image, **options)

    return annotate


def build_annotator_demo(tabs: Sequence[AnnotatorTab], detectors: Detectors) -> gr.Blocks:
    """One tab per detector: picture, its settings and a resolution in, the detected maps out."""
    with gr.Blocks(title="ControlNet annotators", analytics_enabled=False) as demo:
        gr.Markdown("## ControlNet annotators")
        for tab in tabs:
            with gr.Tab(tab.title):
                with gr.Row():
                    with gr.Column():
                        input_image = image_input()
                        options = {option.name: option.make() for option in tab.options}
                        resolution = Slider("resolution", "resolution", 256, 1024, tab.resolution, 64).make()
                        run_button = gr.Button("Run", variant="primary")
                    with gr.Column():
                        result_gallery = gallery()
                run_button.click(annotate_fn(tab, detectors), inputs=[input_image, resolution],
                                 inputs_kwargs=options, outputs=[result_gallery], api_name=tab.name)
    return demo


def fail(message: str, advice: str | None = None) -> NoReturn:
    """End start-up as every command line does on a user's mistake: one line (plus advice), exit 1."""
    print("\n".join(error_lines(UserError(message, advice))), file=sys.stderr)
    sys.exit(EXIT_ERROR)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but torch sees no CUDA device; use --device cpu.")
    return torch.device(name)


def require_checkpoint(path: Path) -> None:
    if path.is_file():
        return
    source = CONTROLNET_V11_URL if path.name.startswith("control_v11") else CONTROLNET_URL
    fail(f"ControlNet checkpoint not found: {path}",
         f"download {path.name} from {source} and put it at {path} (or give its path with --ckpt); "
         f"ControlNet 1.1 files (control_v11*.pth, from {CONTROLNET_V11_URL}) hold only the control model: "
         "give them with --ckpt together with --base <a Stable Diffusion 1.5 checkpoint>")


def load_model(args: argparse.Namespace, default_checkpoint: str, device: torch.device) -> torch.nn.Module:
    """The ControlLDM of --config with --base and --ckpt (or random weights), in eval mode on `device`."""
    config_path = Path(args.config)
    if not config_path.is_file():
        fail(f"Model config not found: {config_path}", f"the configs ship with this repository in {MODELS}")
    ckpt = Path(args.ckpt) if args.ckpt else MODELS / default_checkpoint
    base = Path(args.base) if args.base else None
    if not args.random_weights:
        require_checkpoint(ckpt)
        if base is not None and not base.is_file():
            fail(f"Base checkpoint not found: {base}",
                 f"download a Stable Diffusion 1.5 checkpoint, e.g. {SD15_URL}, and give its path to --base")
    model = create_model(config_path)
    if args.random_weights:
        print("--random-weights: model and detectors have random weights; for tests and demos only.")
    else:
        # a base checkpoint fills the UNet, VAE and text encoder; the control-only file then the control
        # (in the mode's own layout: ControlNet 1.1, control-lora or LLLite)
        if base is not None:
            steps = [(base, lambda path: load_checkpoint(model, path, prefixes=BASE_PREFIXES)),
                     (ckpt, model.load_control)]
        else:
            steps = [(ckpt, lambda path: load_checkpoint(model, path))]
        for path, load in steps:
            try:
                report = load(path)
            except CLI_ERRORS as err:  # unreadable, unsafe or mismatched: say why and stop
                fail(f"Could not load {path}: {err}", err.advice if isinstance(err, UserError) else None)
            if report.missing:
                fail(f"{path} does not fill the model of {config_path}: {report}",
                     None if base else "a control-only (ControlNet 1.1) file also needs --base "
                                       "<a Stable Diffusion 1.5 checkpoint>")
            if report.unexpected:
                print(f"{path}: ignored {len(report.unexpected)} keys this model does not use, "
                      f"e.g. {report.unexpected[0]}")
    return model.to(device).eval()


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def speed_up(model: torch.nn.Module, precision: str, compile_mode: str | None) -> None:
    """--precision and --compile: the denoiser's weight dtype, and torch.compile (lazy: at the first image)."""
    model.set_denoiser_dtype(PRECISIONS[precision])
    if compile_mode:
        model.compile_denoiser(mode=compile_mode)


def quiet_and_low_vram(low_vram: bool) -> None:
    """The original's config.save_memory (edited in config.py or set by --low-vram), then share.py."""
    config.save_memory = config.save_memory or low_vram
    importlib.import_module("share")  # reads config.save_memory on import: quiet logs, sliced attention


def launch(demo: gr.Blocks, args: argparse.Namespace) -> None:
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


def main(app: ControlApp, argv: Sequence[str] | None = None) -> None:
    """Command line of a diffusion app: load the model, build the UI, serve it."""
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
    args = parser.parse_args(argv)
    quiet_and_low_vram(args.low_vram)
    device = resolve_device(args.device)
    model = load_model(args, app.checkpoint, device)
    speed_up(model, args.precision, args.compile)
    launch(build_demo(app, Pipeline(app, model, Detectors(device, args.random_weights))), args)


def annotator_main(tabs: Sequence[AnnotatorTab], argv: Sequence[str] | None = None) -> None:
    """Command line of the detectors-only app."""
    args = server_parser("ControlNet annotators (detectors only, no diffusion model)").parse_args(argv)
    quiet_and_low_vram(False)
    launch(build_annotator_demo(tabs, Detectors(resolve_device(args.device), args.random_weights)), args)

"""What every ControlNet app shares: the command line, model, detector and control-file loading, the `process`
pipeline, and the UI on Gradio 6. An app file only names its title, default checkpoint and unit 1 preprocessor.

The UI offers what users of the A1111 extension and ComfyUI expect: a sampler and its steps, and up to three
control units (multi-ControlNet), each with its own control file (the model's own, or a ControlNet, control-LoRA
or LLLite file from --control-dir), picture, preprocessor, strength, start/end window and control mode.
Per unit, the pipeline follows lllyasviel/ControlNet's gradio_*2image.py: HWC3, resize to a multiple of 64,
detect (at the detect resolution where the original does), hint in [0, 1]; then every enabled unit samples
together through cldm.pipeline.sample, and the VAE decodes. Guess mode is "ControlNet is more important".
"""

import argparse
import importlib
import logging
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import cv2
import gradio as gr
import numpy as np
import PIL.Image
import torch

import config
from annotator.util import HWC3, resize_image
from cldm import loader
from cldm.cli import CLI_ERRORS, EXIT_ERROR, error_lines
from cldm.control import ControlNetwork, ControlUnit
from cldm.model import create_model
from cldm.pipeline import sample
from gradio_apps.preprocessors import PREPROCESSORS, Option, Preprocessor, Slider
from ldm.checkpoint import UserError
from ldm.models.diffusion.ddpm import COMPILE_MODES
from ldm.models.diffusion.samplers import SAMPLERS

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CONTROLNET_URL = "https://huggingface.co/lllyasviel/ControlNet/tree/main/models"
CONTROLNET_V11_URL = "https://huggingface.co/lllyasviel/ControlNet-v1-1/tree/main"
SD15_URL = "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (v1-5-pruned.ckpt)"
A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality")
MAX_ASPECT = 8  # beyond this side ratio, resizing the short side to the resolution takes unbounded memory
MAX_UNITS = 3  # Pipeline.process names the pictures of units 2 and 3
MAX_UPLOAD = "50mb"  # a large photo or an 8K PNG; Gradio refuses bigger uploads before reading them
MAX_ETA = 1.0  # DDIM's eta: 0 deterministic, 1 as stochastic as DDPM; beyond it the noise overshoots
MAX_STRENGTH = 2.0
# The A1111 extension's control modes (labels as it shows them) -> ControlUnit.mode
CONTROL_MODES = {"Balanced": "balanced", "My prompt is more important": "prompt",
                 "ControlNet is more important": "control"}
CONTROL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")
OWN = ""  # a unit's control-file choice meaning the loaded model's own control network (--ckpt)


@dataclass(frozen=True)
class ControlApp:
    """What one diffusion app adds to the shared pipeline and UI."""

    title: str
    checkpoint: str  # default --ckpt, in models/
    preprocessor: str  # unit 1's default, a name of PREPROCESSORS
    sketch: bool = False  # draw on a canvas instead of uploading a picture

    def __post_init__(self):
        if self.preprocessor not in PREPROCESSORS:
            raise ValueError(f"unknown preprocessor {self.preprocessor!r}; choose one of {', '.join(PREPROCESSORS)}")


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


class ControlFiles:
    """The control files a unit may choose: those under `folder` (searched anew for each request, so files put
    there later count), each loaded on first use as a network on the model; the last MAX_UNITS stay loaded."""

    def __init__(self, folder: str | Path | None, model: torch.nn.Module, config_path: str | Path,
                 own_label: str) -> None:
        self.folder = None if folder is None else Path(folder)
        self.model = model
        self.config_path = config_path
        self.own_label = own_label
        self._loaded: OrderedDict[tuple[str, int], ControlNetwork] = OrderedDict()
        self._lock = threading.Lock()

    def shown_folder(self) -> str:
        """The folder as the page names it: relative to the working directory when inside it."""
        if self.folder is None:
            return "(none)"
        try:
            return str(self.folder.resolve().relative_to(Path.cwd())) + "/"
        except ValueError:
            return str(self.folder)

    def names(self) -> list[str]:
        """Paths relative to the folder of the files with a checkpoint's suffix."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                      if p.suffix in CONTROL_FILE_SUFFIXES and p.is_file())

    def choices(self) -> list[tuple[str, str]]:
        return [(self.own_label, OWN), *((name, name) for name in self.names())]

    def network(self, name: str, unit: int) -> ControlNetwork:
        """The network of the file `name` (a name of names(), nothing else: a request never opens other paths)."""
        if name not in self.names():
            raise user_error(f"Unit {unit}: no control file {name!r} in {self.folder}.", "Unknown control file")
        path = self.folder / name
        key = (name, path.stat().st_mtime_ns)
        with self._lock:
            if key not in self._loaded:
                try:
                    net = loader.load_control_network(path, self.model, self.config_path)
                except CLI_ERRORS as err:  # unreadable, no control weights, not fitting: say which and why
                    raise user_error(" ".join(error_lines(err)).removeprefix("error: "),
                                     f"Unit {unit}: cannot use the control file") from err
                self._loaded[key] = net
                while len(self._loaded) > MAX_UNITS:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]


def image_input(label: str = "Input image") -> gr.Image:
    """The upload box. An unreadable upload (a text file, a broken picture) becomes a message in the UI."""
    # RGBA keeps transparency for HWC3 to put on white; grayscale and palette pictures arrive as RGBA too
    image = gr.Image(label=label, sources=["upload", "clipboard"], type="numpy", image_mode="RGBA")
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


def check_number(name: str, value: Any, low: float, high: float) -> float:
    """`value` as a float within [low, high]; NaN, infinities and numbers out of range are refused by name
    (Gradio's own bounds checks let NaN through)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise user_error(f"{name} must be a finite number, got {value!r}.", "Invalid setting")
    if not low <= number <= high:
        raise user_error(f"{name} must be between {low:g} and {high:g}, got {number:g}.", "Invalid setting")
    return number


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


def crop_to_aspect(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre of `image` with the aspect ratio width:height (the A1111 extension's "Crop and Resize")."""
    h, w = image.shape[:2]
    if h * width > w * height:
        keep = max(1, round(w * height / width))
        top = (h - keep) // 2
        return image[top:top + keep]
    keep = max(1, round(h * width / height))
    left = (w - keep) // 2
    return image[:, left:left + keep]


def sketch_to_paper(value: dict | None) -> np.ndarray | None:
    """An ImageEditor value as black strokes on white: whatever a layer covers, plus dark background pixels
    (an uploaded scribble), so any brush colour counts as a stroke."""
    if value is None or value.get("composite") is None:
        return None
    drawn = HWC3(value["composite"]).min(axis=2) < 127
    for layer in value.get("layers") or []:
        drawn |= layer[:, :, 3] > 127
    if not drawn.any():  # an untouched canvas
        return None
    return np.repeat(np.where(drawn, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def new_canvas(width: int, height: int) -> np.ndarray:
    return np.full((int(height), int(width), 3), 255, dtype=np.uint8)


def native_resolution(model: torch.nn.Module) -> int:
    """The image size the model was trained at, in pixels."""
    return model.image_size * model.vae_scale_factor


def resolution_range(model: torch.nn.Module) -> tuple[int, int, int]:
    """(min, max, default) image resolution: half to 1.5x the model's training size, 256-768 for SD1.x."""
    native = native_resolution(model)
    low, high = max(64, native // 2), max(128, native * 3 // 2)
    return low, high, min(max(64 * round(native / 64), low), high)


def canvas_size(model: torch.nn.Module) -> tuple[int, int]:
    """(canvas side, brush size) for drawing a scribble: 512 and 6 px for SD; 4x a small model's resolution,
    with a brush that stays about 1.5 px wide once the drawing is shrunk to it."""
    native = native_resolution(model)
    side = min(512, max(256, 4 * native))
    return side, max(6, round(1.5 * side / native))


@dataclass
class UnitRequest:
    """What the UI sends for one control unit (its inputs are named unit<k>_<field>)."""

    index: int
    enabled: bool = False
    image: np.ndarray | None = None
    control_file: str = OWN
    preprocessor: str = "none"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # preprocessor -> its settings

    @classmethod
    def parse(cls, index: int, controls: dict[str, Any]) -> "UnitRequest":
        prefix = f"unit{index}_"
        mine = {k[len(prefix):]: v for k, v in controls.items() if k.startswith(prefix)}
        request = cls(index)
        for name in ("enabled", "image", "control_file", "preprocessor", "strength", "start", "end", "mode"):
            if name in mine:
                setattr(request, name, mine.pop(name))
        for name, value in mine.items():
            preprocessor, _, option = name.partition("__")
            request.options.setdefault(preprocessor, {})[option] = value
        return request

    def check(self) -> None:
        """Refuse settings no unit can take, naming the unit."""
        where = f"Unit {self.index}"
        self.strength = check_number(f"{where}: Control Strength", self.strength, 0.0, MAX_STRENGTH)
        self.start = check_number(f"{where}: Starting Control Step", self.start, 0.0, 1.0)
        self.end = check_number(f"{where}: Ending Control Step", self.end, 0.0, 1.0)
        if self.start >= self.end:
            raise user_error(f"{where}: the Starting Control Step ({self.start:g}) must come before the Ending "
                             f"Control Step ({self.end:g}).", "Invalid setting")
        if self.preprocessor not in PREPROCESSORS:
            raise user_error(f"{where}: unknown preprocessor {self.preprocessor!r}.", "Invalid setting")
        if self.mode not in CONTROL_MODES.values():
            raise user_error(f"{where}: unknown control mode {self.mode!r}.", "Invalid setting")


class Pipeline:
    """process(): the enabled units' hints, then one sampling run under all of them; bad input raises gr.Error."""

    def __init__(self, app: ControlApp, model: torch.nn.Module, detectors: Detectors,
                 control_files: ControlFiles) -> None:
        self.app = app
        self.model = model
        self.detectors = detectors
        self.control_files = control_files
        self.device = model.device

    def process(self, input_image: np.ndarray | dict | None, prompt: str, a_prompt: str, n_prompt: str,
                num_samples: int, image_resolution: int, sampler: str, steps: int, scale: float, seed: int,
                eta: float, progress: gr.Progress = gr.Progress(), unit2_image: np.ndarray | None = None,
                unit3_image: np.ndarray | None = None, **controls: Any) -> list[np.ndarray]:
        """[each enabled unit's control map] + num_samples images of the resized input's size.

        `controls`: each unit's settings as unit<k>_<field> (see UnitRequest); the pictures of units 2 and 3 are
        named here, so API clients may leave them out.
        """
        controls |= {"unit2_image": unit2_image, "unit3_image": unit3_image}
        scale = check_number("Guidance Scale", scale, 0.0, 100.0)
        eta = check_number("eta", 0.0 if eta is None else eta, 0.0, MAX_ETA)
        if sampler not in SAMPLERS:
            raise user_error(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.", "Invalid setting")
        if eta and sampler != "ddim":
            raise user_error(f"eta is DDIM's; the {SAMPLERS[sampler].label} sampler has none: set it to 0.",
                             "Invalid setting")
        resolution = int(image_resolution)
        main = sketch_to_paper(input_image) if self.app.sketch else input_image
        units = [UnitRequest.parse(k, controls) for k in range(1, MAX_UNITS + 1)]
        units = [u for u in units if u.enabled]
        for unit in units:
            unit.check()
        # the picture that sets the size: the input image, else the first unit's own one
        reference = main if main is not None else next((u.image for u in units if u.image is not None), None)
        if reference is not None:
            height, width = resize_image(prepare(reference, resolution), resolution).shape[:2]
        elif units:
            raise user_error("Draw a scribble first." if self.app.sketch else "Upload an input image first.",
                             "No input image")
        else:  # no control at all: the prompt alone, at the resolution
            height = width = 64 * max(1, round(resolution / 64))
        control_units, shown = [], []
        for unit in units:
            image = main if unit.index == 1 or unit.image is None else unit.image
            if image is None:
                raise user_error(f"Unit {unit.index}: upload its control image, or an input image above.",
                                 "No input image")
            preprocessor = PREPROCESSORS[unit.preprocessor]
            options = {o.name: o.value for o in preprocessor.settings} | unit.options.get(preprocessor.name, {})
            hint, preview = self.make_hint(preprocessor, image, (height, width), resolution, crop=image is not main,
                                           **options)
            control_units.append(self.control_unit(unit, hint))
            shown.append(preview)
        try:
            samples = sample(self.model, f"{prompt or ''}, {a_prompt or ''}", n_prompt or "", units=control_units,
                             sampler=sampler, steps=int(steps), cfg_scale=scale, seed=None if seed == -1 else int(seed),
                             num_images=int(num_samples), height=height, width=width, eta=eta,
                             low_vram=config.save_memory,
                             callback=lambda done, total: progress((done, total), desc="Sampling", unit="steps"))
        except torch.OutOfMemoryError as err:
            raise user_error("Out of GPU memory: use fewer Images, a lower Image Resolution, or --low-vram.",
                             "Out of memory") from err
        return [*shown, *samples.images]

    def make_hint(self, preprocessor: Preprocessor, image: np.ndarray, size: tuple[int, int], image_resolution: int,
                  crop: bool = False, detect_resolution: int | None = None, **options: Any
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(hint of `size`, the map to show) from an uploaded uint8 picture; `crop` first cuts it to the size's
        aspect ratio (a unit's own picture)."""
        height, width = size
        if preprocessor.detect_resolution is None:
            detect_resolution = None
        image = prepare(image, max(image_resolution, int(detect_resolution or 0)))
        if crop:
            image = crop_to_aspect(image, height, width)
        img = resize_image(image, image_resolution)
        # resized before detection, so a huge upload never reaches a detector at full size
        source = img if detect_resolution is None else resize_image(image, int(detect_resolution))
        detector = None if preprocessor.detector is None else self.detectors.get(preprocessor.detector)
        with torch.no_grad():
            detected = HWC3(preprocessor.detect(detector, source, **options))
        hint = preprocessor.refine(cv2.resize(detected, (width, height), interpolation=preprocessor.interpolation))
        return hint, preprocessor.preview(hint)

    def control_unit(self, unit: UnitRequest, hint: np.ndarray) -> ControlUnit:
        """The unit's network (the model's own, or its control file's) on the hint, weighted as it asks."""
        control = torch.from_numpy(hint.copy()).float().to(self.device).permute(2, 0, 1)[None] / 255.0
        settings = dict(strength=unit.strength, start=unit.start, end=unit.end, mode=unit.mode)
        if unit.control_file == OWN:
            return self.model.unit(control, **settings)
        # to the compute device each time: --low-vram parks the UNet (and a control-LoRA's tied tensors) between runs
        network = self.control_files.network(unit.control_file, unit.index).to(self.device)
        return ControlUnit(network, control, **settings)


def gallery() -> gr.Gallery:
    # PNG: line maps stay exact (WebP would smear them)
    return gr.Gallery(label="Output", show_label=False, elem_id="gallery", columns=2, height="auto",
                      format="png")


def sketch_input(model: torch.nn.Module) -> gr.Sketchpad:
    """Canvas size sliders, a button that opens a fresh white canvas, and the canvas itself, sized for the
    model (see canvas_size)."""
    side, brush = canvas_size(model)
    canvas_width = Slider("canvas_width", "Canvas Width", 64, 1024, side, 1).make()
    canvas_height = Slider("canvas_height", "Canvas Height", 64, 1024, side, 1).make()
    create_button = gr.Button("Open drawing canvas!")
    canvas = gr.Sketchpad(label="Scribble", type="numpy", image_mode="RGBA", canvas_size=(side, side),
                          brush=gr.Brush(default_size=brush, default_color="#000000", colors=["#000000"]),
                          elem_id="scribble")
    create_button.click(new_canvas, inputs=[canvas_width, canvas_height], outputs=[canvas],
                        api_name="new_canvas")
    return canvas


def unit_controls(index: int, app: ControlApp, control_files: ControlFiles) -> dict[str, gr.components.Component]:
    """One control unit's settings as the A1111 extension shows them, by input name (unit<k>_<field>)."""
    name = f"unit{index}_"
    controls: dict[str, gr.components.Component] = {
        name + "enabled": gr.Checkbox(label="Enable", value=index == 1, elem_id=f"{name}enabled")}
    if index > 1:
        controls[name + "image"] = image_input(f"Control image of unit {index} (empty: the input image above)")
    with gr.Row():
        control_file = controls[name + "control_file"] = gr.Dropdown(
            label="Model (control file)", choices=control_files.choices(), value=OWN, scale=4,
            info=f"the loaded model's own network, or a file in {control_files.shown_folder()}")
        refresh = gr.Button("↻", size="sm", scale=0, min_width=40, elem_id=f"{name}refresh")
        preprocessor = controls[name + "preprocessor"] = gr.Dropdown(
            label="Preprocessor", choices=[(p.label, p.name) for p in PREPROCESSORS.values()],
            value=app.preprocessor if index == 1 else "none", scale=4)
    groups = []
    for p in PREPROCESSORS.values():
        if not p.settings:
            continue
        with gr.Group(visible=p.name == preprocessor.value) as group:
            for option in p.settings:
                controls[f"{name}{p.name}__{option.name}"] = option.make()
        groups.append((p.name, group))
    # files put into the folder after the page was built become choices (Gradio accepts only listed ones)
    refresh.click(lambda: gr.Dropdown(choices=control_files.choices()), outputs=[control_file],
                  api_name=f"refresh_unit{index}", api_visibility="undocumented")
    preprocessor.change(lambda chosen: [gr.Group(visible=chosen == n) for n, _ in groups], inputs=[preprocessor],
                        outputs=[g for _, g in groups], api_visibility="private")
    controls[name + "strength"] = Slider("strength", "Control Strength", 0.0, MAX_STRENGTH, 1.0, 0.01).make()
    with gr.Row():
        controls[name + "start"] = Slider("start", "Starting Control Step", 0.0, 1.0, 0.0, 0.01).make()
        controls[name + "end"] = Slider("end", "Ending Control Step", 0.0, 1.0, 1.0, 0.01).make()
    controls[name + "mode"] = gr.Radio(label="Control Mode", choices=list(CONTROL_MODES.items()), value="balanced")
    return controls


def sampler_settings(name: str) -> tuple[gr.Slider, gr.Slider]:
    """A sampler's default steps; eta only for DDIM (0 for the others, which have none)."""
    ddim = name == "ddim"
    return gr.Slider(value=SAMPLERS[name].default_steps), gr.Slider(value=0.0, interactive=ddim)


def build_demo(app: ControlApp, pipeline: Pipeline, guidance_scale: float = 9.0) -> gr.Blocks:
    """Input, prompt and Run; sampler and steps; a tab per control unit; more options folded; gallery on the right.
    `guidance_scale`: the Guidance Scale it starts with (9, as the original apps)."""
    low, high, default = resolution_range(pipeline.model)
    with gr.Blocks(title=app.title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {app.title}")
        with gr.Row():
            with gr.Column():
                input_image = sketch_input(pipeline.model) if app.sketch else image_input()
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                run_button = gr.Button("Run", variant="primary", elem_id="run")
                with gr.Row():
                    sampler = gr.Dropdown(label="Sampler", choices=[(s.label, s.name) for s in SAMPLERS.values()],
                                          value="ddim")
                    steps = Slider("steps", "Steps", 1, 100, SAMPLERS["ddim"].default_steps, 1).make()
                controls: dict[str, gr.components.Component] = {}
                with gr.Tabs():
                    for index in range(1, MAX_UNITS + 1):
                        with gr.Tab(f"ControlNet Unit {index}"):
                            controls |= unit_controls(index, app, pipeline.control_files)
                with gr.Accordion("Advanced options", open=False):
                    num_samples = Slider("num_samples", "Images", 1, 12, 1, 1).make()
                    image_resolution = Slider("image_resolution", "Image Resolution", low, high, default, 64).make()
                    scale = Slider("scale", "Guidance Scale", 0.1, 30.0, guidance_scale, 0.1).make()
                    seed = gr.Slider(label="Seed", minimum=-1, maximum=2147483647, step=1, precision=0,
                                     randomize=True)
                    eta = Slider("eta", "eta (DDIM)", 0.0, MAX_ETA, 0.0, 0.01).make()
                    a_prompt = gr.Textbox(label="Added Prompt", value=A_PROMPT)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=N_PROMPT)
            with gr.Column():
                result_gallery = gallery()
        sampler.change(sampler_settings, inputs=[sampler], outputs=[steps, eta], api_visibility="private")
        inputs = [input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, sampler, steps, scale,
                  seed, eta]
        run_button.click(pipeline.process, inputs=inputs, inputs_kwargs=controls, outputs=[result_gallery],
                         api_name="process")
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
    if args.random_weights:
        log.warning("--random-weights: model and detectors have random weights; for tests and demos only.")
        return create_model(config_path).to(device).eval()
    require_checkpoint(ckpt)
    if base is not None and not base.is_file():
        fail(f"Base checkpoint not found: {base}",
             f"download a Stable Diffusion 1.5 checkpoint, e.g. {SD15_URL}, and give its path to --base")
    # a base checkpoint fills the UNet, VAE and text encoder; the control file (ControlNet, control-LoRA or LLLite,
    # in any of its layouts) then the control network
    try:
        model, _ = loader.load_model(config_path, [base, ckpt] if base is not None else [ckpt])
    except loader.MissingWeightsError as err:
        fail(str(err), err.advice if base else "a control-only file (e.g. ControlNet 1.1's) also needs --base "
                                                 "<a Stable Diffusion checkpoint>")
    except CLI_ERRORS as err:  # unreadable, unsafe or mismatched: say why and stop
        fail(str(err), err.advice if isinstance(err, UserError) else None)
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


def launch(demo: gr.Blocks, args: argparse.Namespace, block: bool = True) -> None:
    """Serve `demo` (uploads up to MAX_UPLOAD); block=False returns once it listens."""
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                        max_file_size=MAX_UPLOAD, prevent_thread_lock=not block)


def own_label(args: argparse.Namespace, default_checkpoint: str) -> str:
    """How the units' file choice names the loaded model's own control network."""
    if args.random_weights:
        return "the model's own (random weights)"
    return f"the model's own: {Path(args.ckpt or MODELS / default_checkpoint).name} (--ckpt)"


def make_pipeline(app: ControlApp, model: torch.nn.Module, args: argparse.Namespace,
                  device: str | torch.device) -> Pipeline:
    control_files = ControlFiles(args.control_dir, model, args.config, own_label(args, app.checkpoint))
    return Pipeline(app, model, Detectors(device, args.random_weights), control_files)


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
    parser.add_argument("--scale", type=float, default=9.0,
                        help="the Guidance Scale the page starts with (default 9, as the original apps; the demo's "
                             "small model wants 3)")
    parser.add_argument("--control-dir", default=str(MODELS),
                        help="folder (searched with its subfolders) of the control files each unit may choose: "
                             "ControlNet, control-LoRA and LLLite files (default: models/)")
    args = parser.parse_args(argv)
    quiet_and_low_vram(args.low_vram)
    device = resolve_device(args.device)
    model = load_model(args, app.checkpoint, device)
    speed_up(model, args.precision, args.compile)
    if not 0.1 <= args.scale <= 30.0:
        fail(f"--scale must be between 0.1 and 30, got {args.scale}")
    launch(build_demo(app, make_pipeline(app, model, args, device), args.scale), args)


def annotator_main(tabs: Sequence[AnnotatorTab], argv: Sequence[str] | None = None) -> None:
    """Command line of the detectors-only app."""
    args = server_parser("ControlNet annotators (detectors only, no diffusion model)").parse_args(argv)
    quiet_and_low_vram(False)
    launch(build_annotator_demo(tabs, Detectors(resolve_device(args.device), args.random_weights)), args)

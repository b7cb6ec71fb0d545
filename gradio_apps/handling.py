"""Request handling of the apps: one request of a diffusion app (Pipeline.process) and of the annotator app
(annotate_fn). Every value of a request is checked here, by the name the page shows (and its unit): the page hands
its values over unprocessed, so API clients get the same messages as the page.

Per unit, the pipeline follows lllyasviel/ControlNet's gradio_*2image.py: HWC3, resize to a multiple of 64, detect
(at the detect resolution where the original does), hint in [0, 1]; then every enabled unit samples together through
cldm.pipeline.sample, and the VAE decodes. Each image comes back with its seed and, in its PNG, the parameters A1111
writes (gradio_apps/parameters.py).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import gradio as gr
import numpy as np
import PIL.Image
import torch

from annotator.util import HWC3, resize_image
from cldm.control import ControlUnit
from cldm.controlnet_union import ALIASES, CONTROL_TYPES
from cldm.pipeline import sample
from gradio_apps.app_spec import AnnotatorTab, ControlApp
from gradio_apps.loading import OWN, ControlFiles, Detectors
from gradio_apps.messages import INVALID, user_error
from gradio_apps.parameters import Parameters, UnitParameters, number, with_parameters
from gradio_apps.preprocessors import PREPROCESSORS, Checkbox, Preprocessor, Slider
from ldm.models.diffusion.samplers import SAMPLERS

MAX_ASPECT = 8  # beyond this side ratio, resizing the short side to the resolution takes unbounded memory
MAX_UNITS = 3  # Pipeline.process names the pictures of units 2 and 3
MAX_ETA = 1.0  # DDIM's eta: 0 deterministic, 1 as stochastic as DDPM; beyond it the noise overshoots
# The A1111 extension's control modes (labels as it shows them) -> ControlUnit.mode
CONTROL_MODES = {"Balanced": "balanced", "My prompt is more important": "prompt",
                 "ControlNet is more important": "control"}
MODE_LABELS = {mode: label for label, mode in CONTROL_MODES.items()}
AUTO_TYPE = "auto"  # a ControlNet-Union unit's control type from its preprocessor (the model's own: its config's)
# the request's numeric settings, as the page shows them and as requests are checked
STEPS = Slider("steps", "Steps", 1, 100, SAMPLERS["ddim"].default_steps, 1)
IMAGES = Slider("num_samples", "Images", 1, 12, 1, 1)
GUIDANCE = Slider("scale", "Guidance Scale", 0.1, 30.0, 9.0, 0.1)
SEED = Slider("seed", "Seed", -1, 2 ** 31 - 1, -1, 1)  # -1: a random seed, shown with each image
ETA = Slider("eta", "eta (DDIM)", 0.0, MAX_ETA, 0.0, 0.01)
ENABLE = Checkbox("enabled", "Enable")
STRENGTH = Slider("strength", "Control Strength", 0.0, 2.0, 1.0, 0.01)
START = Slider("start", "Starting Control Step", 0.0, 1.0, 0.0, 0.01)
END = Slider("end", "Ending Control Step", 0.0, 1.0, 1.0, 0.01)
DENOISING = Slider("denoising_strength", "Denoising strength", 0.01, 1.0, 0.75, 0.01)  # img2img, A1111's default
MAX_SIZE_CONDITION = 8192  # SDXL's size conditioning, in pixels: beyond any size it was trained at

GalleryItem = tuple[np.ndarray | PIL.Image.Image, str]  # a picture and its caption


def native_resolution(model: torch.nn.Module) -> int:
    """The image size the model was trained at, in pixels."""
    return model.image_size * model.vae_scale_factor


def resolution_range(model: torch.nn.Module) -> tuple[int, int, int]:
    """(min, max, default) image resolution: half to 1.5x the model's training size, 256-768 for SD1.x."""
    native = native_resolution(model)
    low, high = max(64, native // 2), max(128, native * 3 // 2)
    return low, high, min(max(64 * round(native / 64), low), high)


def resolution_slider(model: torch.nn.Module) -> Slider:
    low, high, default = resolution_range(model)
    return Slider("image_resolution", "Image Resolution", low, high, default, 64)


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


@dataclass
class UnitRequest:
    """What a request says of one control unit (its values are named unit<k>_<field>), unchecked until check()."""

    index: int
    enabled: Any = False
    image: np.ndarray | None = None
    control_file: str = OWN
    preprocessor: str = "none"
    strength: Any = STRENGTH.value
    start: Any = START.value
    end: Any = END.value
    mode: str = "balanced"
    control_type: str = AUTO_TYPE  # a ControlNet-Union file's control type; auto: the preprocessor's
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # preprocessor -> its settings

    @classmethod
    def parse(cls, index: int, controls: dict[str, Any]) -> "UnitRequest":
        prefix = f"unit{index}_"
        mine = {k[len(prefix):]: v for k, v in controls.items() if k.startswith(prefix)}
        request = cls(index)
        for name in ("enabled", "image", "control_file", "preprocessor", "strength", "start", "end", "mode",
                     "control_type"):
            if name in mine:
                setattr(request, name, mine.pop(name))
        for name, value in mine.items():
            preprocessor, _, option = name.partition("__")
            request.options.setdefault(preprocessor, {})[option] = value
        return request

    @property
    def where(self) -> str:
        return f"Unit {self.index}: "

    def check(self) -> None:
        """Refuse settings no unit can take, naming the unit and the setting."""
        self.strength = STRENGTH.check(self.strength, self.where)
        self.start = START.check(self.start, self.where)
        self.end = END.check(self.end, self.where)
        if self.start >= self.end:
            raise user_error(f"{self.where}the {START.label} ({self.start:g}) must come before the {END.label} "
                             f"({self.end:g}).", INVALID)
        if self.preprocessor not in PREPROCESSORS:
            raise user_error(f"{self.where}unknown preprocessor {self.preprocessor!r}.", INVALID)
        if self.mode not in MODE_LABELS:
            raise user_error(f"{self.where}unknown control mode {self.mode!r}; choose one of "
                             f"{', '.join(MODE_LABELS)}.", INVALID)
        if self.control_type not in (AUTO_TYPE, *CONTROL_TYPES, *ALIASES):
            raise user_error(f"{self.where}unknown Control Type {self.control_type!r}; choose one of "
                             f"{', '.join((AUTO_TYPE, *CONTROL_TYPES))}.", INVALID)

    def settings(self, preprocessor: Preprocessor) -> dict[str, Any]:
        """The preprocessor's settings, checked: the request's values, else their defaults."""
        given = self.options.get(preprocessor.name, {})
        return {o.name: o.check(given.get(o.name, o.value), self.where) for o in preprocessor.settings}


@dataclass
class SizeRequest:
    """SDXL's size conditioning as a request gives it (sdxl_<field>; 0: the default), in pixels: the original size
    and target size (default: the image's), the crop's top-left corner (default 0, 0), and each again for the
    negative prompt (negative_<field>, default: as for the prompt)."""

    values: dict[str, Any] = field(default_factory=dict)

    FIELDS = {"original_width": "Original width", "original_height": "Original height", "crop_top": "Crop top",
              "crop_left": "Crop left", "target_width": "Target width", "target_height": "Target height"}
    PREFIX = "sdxl_"

    @classmethod
    def sliders(cls, negative: bool = False) -> list[Slider]:
        """The settings as the page shows them (0: the default)."""
        name = "negative_" if negative else ""
        return [Slider(f"{cls.PREFIX}{name}{key}", f"Negative {text.lower()}" if negative else text, 0,
                       MAX_SIZE_CONDITION, 0, 1) for key, text in cls.FIELDS.items()]

    @classmethod
    def parse(cls, controls: dict[str, Any]) -> "SizeRequest":
        return cls({k: controls.pop(k) for k in list(controls) if k.startswith(cls.PREFIX)})

    def check(self, vector_conditioned: bool) -> dict[str, int]:
        """The request's values checked by name (0 for those not given); refused where the model has no size
        conditioning."""
        sliders = {s.name: s for s in (*self.sliders(), *self.sliders(negative=True))}
        unknown = sorted(set(self.values) - set(sliders))
        if unknown:
            raise user_error(f"Unknown setting {unknown[0]!r}.", INVALID)
        checked = {key: slider.check(self.values.get(key, 0)) for key, slider in sliders.items()}
        given = [sliders[k].label for k, v in checked.items() if v]
        if given and not vector_conditioned:
            raise user_error(f"{given[0]}: size conditioning is SDXL's; this model has none.", INVALID)
        return {k.removeprefix(self.PREFIX): v for k, v in checked.items()}

    @staticmethod
    def conditioning(checked: dict[str, int], height: int, width: int) -> tuple[dict[str, tuple[int, int]],
                                                                               dict[str, str]]:
        """(sample()'s size arguments, (h, w) and (top, left) with the defaults filled in; the same as `Key: value`
        pairs for the images' parameters, the negative ones only where they differ)."""
        def pairs(name: str, fallback: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
            def pick(key: str, h: str, w: str) -> tuple[int, int]:
                given = (checked[f"{name}{h}"], checked[f"{name}{w}"])
                return given if any(given) else fallback[key]
            return {"original_size": pick("original_size", "original_height", "original_width"),
                    "crops_coords_top_left": pick("crops_coords_top_left", "crop_top", "crop_left"),
                    "target_size": pick("target_size", "target_height", "target_width")}

        positive = pairs("", {"original_size": (height, width), "crops_coords_top_left": (0, 0),
                              "target_size": (height, width)})
        negative = pairs("negative_", positive)
        text = {"Original size": "{1}x{0}".format(*positive["original_size"]),
                "Crop top": positive["crops_coords_top_left"][0], "Crop left": positive["crops_coords_top_left"][1],
                "Target size": "{1}x{0}".format(*positive["target_size"])}
        if negative != positive:
            text |= {"Negative original size": "{1}x{0}".format(*negative["original_size"]),
                     "Negative crop top": negative["crops_coords_top_left"][0],
                     "Negative crop left": negative["crops_coords_top_left"][1],
                     "Negative target size": "{1}x{0}".format(*negative["target_size"])}
        return positive | {f"negative_{k}": v for k, v in negative.items()}, text


def init_tensor(image: np.ndarray, height: int, width: int, resolution: int) -> torch.Tensor:
    """img2img's initial picture as 1x3xHxW in [0, 1]: cut to the images' aspect ratio and resized to their size
    (the A1111 extension's "Crop and Resize"; area averaging to shrink, Lanczos to enlarge, as resize_image)."""
    image = crop_to_aspect(prepare(image, resolution), height, width)
    shrink = height * width < image.shape[0] * image.shape[1]
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
    return torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None] / 255.0


class Pipeline:
    """process(): the enabled units' hints, then one sampling run under all of them; bad input raises gr.Error.

    low_vram: the text encoder and VAE leave the accelerator while the UNet samples (--low-vram).
    model_name: the model as the images' parameters name it (None: left out)."""

    def __init__(self, app: ControlApp, model: torch.nn.Module, detectors: Detectors,
                 control_files: ControlFiles, low_vram: bool = False, model_name: str | None = None) -> None:
        self.app = app
        self.model = model
        self.detectors = detectors
        self.control_files = control_files
        self.low_vram = low_vram
        self.model_name = model_name
        self.device = model.device

    def process(self, input_image: np.ndarray | dict | None, prompt: str, a_prompt: str, n_prompt: str,
                num_samples: int, image_resolution: int, sampler: str, steps: int, scale: float, seed: int,
                eta: float, progress: gr.Progress = gr.Progress(), unit2_image: np.ndarray | None = None,
                unit3_image: np.ndarray | None = None, init_image: np.ndarray | None = None,
                denoising_strength: float = DENOISING.value, **controls: Any) -> list[GalleryItem]:
        """[each enabled unit's control map] + num_samples images of the resized input's size, each captioned
        with its seed and carrying its parameters (a PIL image with A1111's `parameters` text).

        init_image: img2img's initial picture (None: from noise), denoised by `denoising_strength`.
        `controls`: each unit's settings as unit<k>_<field> (see UnitRequest) and, for SDXL, the size conditioning
        as sdxl_<field> (see SizeRequest); the pictures are named here, so API clients may leave them out.
        """
        controls |= {"unit2_image": unit2_image, "unit3_image": unit3_image}
        sizes = SizeRequest.parse(controls).check(self.model.vector_conditioned)
        if sampler not in SAMPLERS:
            raise user_error(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.", INVALID)
        steps, num_samples, seed = STEPS.check(steps), IMAGES.check(num_samples), SEED.check(seed)
        scale = GUIDANCE.check(scale)
        eta = ETA.check(0.0 if eta is None else eta)
        if eta and sampler != "ddim":
            raise user_error(f"eta is DDIM's; the {SAMPLERS[sampler].label} sampler has none: set it to 0.", INVALID)
        resolution = resolution_slider(self.model).check(image_resolution)
        if init_image is not None:
            denoising_strength = DENOISING.check(denoising_strength)
            if int(steps * denoising_strength) < 1:
                raise user_error(f"{DENOISING.label} {denoising_strength:g} of {steps} steps runs no step; raise "
                                 "either.", INVALID)
        main = sketch_to_paper(input_image) if self.app.sketch else input_image
        units = [UnitRequest.parse(k, controls) for k in range(1, MAX_UNITS + 1)]
        units = [u for u in units if ENABLE.check(u.enabled, u.where)]
        for unit in units:
            unit.check()
        # the picture that sets the size: the input image, else the first unit's own one, else the initial one
        pictures = [main, *(u.image for u in units), init_image]
        reference = next((picture for picture in pictures if picture is not None), None)
        if reference is not None:
            height, width = resize_image(prepare(reference, resolution), resolution).shape[:2]
        elif units:
            raise user_error("Draw a scribble first." if self.app.sketch else "Upload an input image first.",
                             "No input image")
        else:  # no control at all: the prompt alone, at the resolution
            height = width = 64 * max(1, round(resolution / 64))
        control_units, shown, unit_parameters = [], [], []
        for unit in units:
            image = main if unit.index == 1 or unit.image is None else unit.image
            if image is None:
                raise user_error(f"{unit.where}upload its control image, or an input image above.",
                                 "No input image")
            preprocessor = PREPROCESSORS[unit.preprocessor]
            options = unit.settings(preprocessor)
            hint, preview = self.make_hint(preprocessor, image, (height, width), resolution, crop=image is not main,
                                           **options)
            control_units.append(self.control_unit(unit, hint, preprocessor))
            shown.append((preview, f"Unit {unit.index}: {preprocessor.label}"))
            unit_parameters.append(self.unit_parameters(unit, preprocessor, options, resolution))
        full_prompt, negative = f"{prompt or ''}, {a_prompt or ''}", n_prompt or ""
        size_kwargs, size_text = SizeRequest.conditioning(sizes, height, width) if self.model.vector_conditioned \
            else ({}, {})
        img2img = {} if init_image is None else dict(
            init_image=init_tensor(init_image, height, width, resolution), denoising_strength=denoising_strength)
        try:
            samples = sample(self.model, full_prompt, negative, units=control_units, sampler=sampler, steps=steps,
                             cfg_scale=scale, seed=None if seed == -1 else seed, num_images=num_samples,
                             height=height, width=width, eta=eta, low_vram=self.low_vram, **img2img, **size_kwargs,
                             callback=lambda done, total: progress((done, total), desc="Sampling", unit="steps"))
        except torch.OutOfMemoryError as err:
            raise user_error("Out of GPU memory: use fewer Images, a lower Image Resolution, or --low-vram.",
                             "Out of memory") from err
        except ValueError as err:  # a sampler's own limits (e.g. its step counts)
            raise user_error(str(err), INVALID) from err
        parameters = Parameters(full_prompt, negative, steps, SAMPLERS[sampler].label, scale, width, height,
                                model=self.model_name, denoising_strength=img2img.get("denoising_strength"),
                                units=tuple(unit_parameters),
                                extra=({"Eta DDIM": number(eta)} if eta else {}) | size_text)
        return [*shown, *((with_parameters(image, parameters.text(s)), f"Seed: {s}")
                          for image, s in zip(samples.images, samples.seeds))]

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

    def control_unit(self, unit: UnitRequest, hint: np.ndarray, preprocessor: Preprocessor) -> ControlUnit:
        """The unit's network (the model's own, or its control file's) on the hint, weighted as it asks; a
        ControlNet-Union's unit names its control type (auto: the preprocessor's, or the model's own type)."""
        control = torch.from_numpy(hint.copy()).float().to(self.device).permute(2, 0, 1)[None] / 255.0
        settings = dict(strength=unit.strength, start=unit.start, end=unit.end, mode=unit.mode)
        own = unit.control_file == OWN
        if own and unit.control_type == AUTO_TYPE:
            return self.model.unit(control, **settings)
        if own:
            network = self.model.control_model
            settings["global_average_pooling"] = self.model.global_average_pooling
        else:  # to the compute device each time: --low-vram parks the UNet (and tied tensors) between runs
            network = self.control_files.network(unit.control_file, unit.index).to(self.device)
        if network.control_types():
            settings["control_type"] = preprocessor.control_type if unit.control_type == AUTO_TYPE \
                else unit.control_type
            if settings["control_type"] is None:
                raise user_error(f"{unit.where}choose the Control Type of its ControlNet-Union: the preprocessor "
                                 f"{preprocessor.name!r} does not say what the picture shows.", INVALID)
        elif unit.control_type != AUTO_TYPE:
            raise user_error(f"{unit.where}a Control Type applies to ControlNet-Union files; "
                             f"{unit.control_file if not own else 'the model'} takes none.", INVALID)
        try:
            return ControlUnit(network, control, **settings)
        except ValueError as err:  # e.g. ProMax's tile for a 6-type file
            raise user_error(f"{unit.where}{err}.", INVALID) from err

    def unit_parameters(self, unit: UnitRequest, preprocessor: Preprocessor, options: dict[str, Any],
                        resolution: int) -> UnitParameters:
        """The unit as the A1111 extension writes it: the detector's resolution and first two settings."""
        thresholds = [options[o.name] for o in preprocessor.options][:2]
        thresholds += [-1] * (2 - len(thresholds))
        if preprocessor.detect_resolution is not None:
            processor_res = options[preprocessor.detect_resolution.name]
        else:  # detected on the image at the image resolution, or (none) not at all
            processor_res = -1 if preprocessor.name == "none" else resolution
        return UnitParameters(preprocessor.a1111_module, self.control_files.model_name(unit.control_file),
                              unit.strength, unit.start, unit.end, MODE_LABELS[unit.mode], processor_res, *thresholds)


def annotate_fn(tab: AnnotatorTab, detectors: Detectors) -> Callable[..., list[np.ndarray]]:
    """The request of one annotator tab: the picture at the resolution, its detector's maps."""
    def annotate(input_image: np.ndarray | None, resolution: int, **options: Any) -> list[np.ndarray]:
        if input_image is None:
            raise user_error("Upload an input image first.", "No input image")
        resolution = tab.resolution_slider.check(resolution)
        options = {o.name: o.check(options.get(o.name, o.value)) for o in tab.options}
        image = resize_image(prepare(input_image, resolution), resolution)
        with torch.no_grad():
            return tab.detect(detectors.get(tab.detector), image, **options)

    return annotate

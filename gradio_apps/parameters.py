"""The parameters the apps write into each PNG they return, as AUTOMATIC1111's web UI writes them: a `parameters`
text chunk holding the prompt, a `Negative prompt:` line, then `Key: value` pairs (Steps, Sampler, CFG scale, Seed,
Size, Model, ...), with each control unit as the A1111 ControlNet extension writes it (`ControlNet 0: "Module: ...,
Model: name [hash], Weight: ..."`). A1111's PNG Info tab, its ControlNet extension and the tools that read A1111
images (civitai, image browsers) show them."""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes
HASH_OFFSET, HASH_BYTES = 0x100000, 0x10000


def model_hash(path: str | Path) -> str:
    """A1111's short model hash, as its ControlNet extension lists control models: the first 8 hex digits of the
    SHA-256 of 64 KiB read at 1 MiB into the file (cheap for any file size)."""
    with open(path, "rb") as f:
        f.seek(HASH_OFFSET)
        return hashlib.sha256(f.read(HASH_BYTES)).hexdigest()[:8]


def number(value: float) -> str:
    """A number as A1111's page hands it over: whole numbers without a decimal point (7, not 7.0)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def quote(value: Any) -> str:
    """A1111's quoting of a value: JSON-quoted when it holds a comma, colon or line break, else as it is."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


@dataclass(frozen=True)
class UnitParameters:
    """One enabled control unit, in the fields and order the A1111 ControlNet extension writes."""

    module: str  # the extension's preprocessor name (canny, depth_midas, ...)
    model: str  # `name [hash]`
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: str  # Balanced, My prompt is more important, ControlNet is more important
    processor_res: int = -1  # the resolution the detector ran at; -1 without one
    threshold_a: float = -1  # the preprocessor's first and second settings; -1 where it has none
    threshold_b: float = -1
    resize_mode: str = "Crop and Resize"
    pixel_perfect: bool = False

    def text(self) -> str:
        fields = {"Module": self.module, "Model": self.model, "Weight": number(self.weight),
                  "Resize Mode": self.resize_mode, "Processor Res": number(self.processor_res),
                  "Threshold A": number(self.threshold_a), "Threshold B": number(self.threshold_b),
                  "Guidance Start": number(self.guidance_start), "Guidance End": number(self.guidance_end),
                  "Pixel Perfect": str(self.pixel_perfect), "Control Mode": self.control_mode}
        return ", ".join(f"{key}: {value}" for key, value in fields.items())


@dataclass(frozen=True)
class Parameters:
    """What one request sampled with; text(seed) is one image's `parameters` chunk."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # the sampler's label, as A1111 names it (DDIM, Euler a, DPM++ 2M Karras, ...)
    cfg_scale: float
    width: int
    height: int
    model: str | None = None  # the base model's name; None leaves it out
    denoising_strength: float | None = None  # img2img only
    units: tuple[UnitParameters, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # further `Key: value` pairs, after the units

    def text(self, seed: int) -> str:
        pairs: dict[str, Any] = {"Steps": self.steps, "Sampler": self.sampler, "CFG scale": number(self.cfg_scale),
                                 "Seed": seed, "Size": f"{self.width}x{self.height}", "Model": self.model,
                                 "Denoising strength": None if self.denoising_strength is None
                                 else number(self.denoising_strength)}
        pairs |= {f"ControlNet {i}": unit.text() for i, unit in enumerate(self.units)}
        pairs |= self.extra
        settings = ", ".join(f"{key}: {quote(value)}" for key, value in pairs.items() if value is not None)
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{settings}".strip()


def with_parameters(image: np.ndarray, text: str) -> PIL.Image.Image:
    """The image as a PIL image carrying `text` as its `parameters` chunk (Gradio writes PIL text info into the
    PNGs it serves)."""
    picture = PIL.Image.fromarray(image)
    picture.info[PARAMETERS_KEY] = text
    return picture

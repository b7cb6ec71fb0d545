"""Images of any file and any size into the training item: one decoder for every reader, and one transform that
the target and its hint always share.

Decoding (PIL): EXIF orientation applied; grayscale repeated to RGB; 16-bit scaled to 8; alpha composited on
white (as annotator.util.HWC3 does for hints). Sizing (`Resize`): images as stored, stretched to a square,
resized and centre- or randomly cropped to a square, or to the nearest aspect-ratio bucket of about the same
area. The hint is first brought to its target's size (it must have the same aspect ratio), then both get the
same resize and the same crop, so hint pixels stay aligned with the target's.
"""
import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cldm.data.batch import HINT, ControlImageItem
from ldm.batch import CAPTION, IMAGE
from ldm.modules.encoders.conditioner import CROP, ORIGINAL_SIZE, TARGET_SIZE

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RESIZE_MODES = ("center_crop", "random_crop", "stretch", "buckets")
BUCKET_STEP = 64  # bucket sides are multiples of this (the VAE's 8 times the UNet's 8), as kohya's
MAX_BUCKET_RATIO = 4.0  # the most elongated bucket, long side over short side
ASPECT_TOLERANCE = 0.02  # hint and target aspect ratios may differ by this fraction (rounding of sizes)
EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadSampleError(ValueError):
    """A sample that cannot be read or used; the message names the file (and index line) and what is wrong."""


def set_max_image_pixels(pixels: int) -> None:
    """The most pixels (width x height) an image may claim to be decoded; larger ones are bad samples (a header
    claiming 50000x50000 is a decompression bomb). This is PIL's own process-wide limit (Image.MAX_IMAGE_PIXELS,
    89,478,485 unless set), which DataLoader workers inherit; --max_image_pixels sets it."""
    if pixels < 1:
        raise ValueError(f"--max_image_pixels must be positive, got {pixels}")
    Image.MAX_IMAGE_PIXELS = pixels


@contextlib.contextmanager
def _within_pixel_limit(name: str) -> Iterator[None]:
    """Opening an image over the limit of set_max_image_pixels raises BadSampleError naming it (PIL only warns up
    to twice its limit, and then raises an error of its own)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise BadSampleError(f"{name} claims {size}, over the limit of {Image.MAX_IMAGE_PIXELS:,} (a decompression "
                             "bomb?); if the image is real, raise the limit with --max_image_pixels") from None


def decode(source: str | Path | bytes | Image.Image, name: str | None = None) -> np.ndarray:
    """uint8 HxWx3 RGB from a file, encoded bytes or a PIL image; BadSampleError naming `name` if unreadable or
    over the pixel limit (set_max_image_pixels)."""
    name = name or str(source if not isinstance(source, (bytes, Image.Image)) else "image")
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            with _within_pixel_limit(name):
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return to_rgb(image)
    except BadSampleError:
        raise
    except FileNotFoundError:
        raise BadSampleError(f"{name} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"{name} is not a readable image ({err})") from None


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 HxWx3 RGB of any PIL image, upright as its EXIF orientation says."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PIL gives 16-bit PNGs as "I" or "I;16"): scale 0..65535 to 0..255
        gray = np.asarray(image, dtype=np.float64) / 257.0
        return np.repeat(np.round(gray).clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float64)
        gray = gray * 255.0 if gray.max(initial=0.0) <= 1.0 else gray
        return np.repeat(np.round(gray).clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:] / 255.0
        return np.round(rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def stored_size(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """(width, height) as `decode` will return the image, read from the header only."""
    name = name or str(source if not isinstance(source, bytes) else "image")
    try:
        with _within_pixel_limit(name), Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) \
                as image:
            w, h = image.size
            return (h, w) if image.getexif().get(EXIF_ORIENTATION) in _TRANSPOSED else (w, h)
    except BadSampleError:
        raise
    except FileNotFoundError:
        raise BadSampleError(f"{name} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"{name} is not a readable image ({err})") from None


def bucket_sizes(resolution: int, step: int = BUCKET_STEP, max_ratio: float = MAX_BUCKET_RATIO
                 ) -> list[tuple[int, int]]:
    """(width, height) buckets of at most resolution² pixels, sides multiples of `step`, from 1:max_ratio to
    max_ratio:1: for each width the tallest height that fits the area (kohya's scheme)."""
    area, buckets = resolution * resolution, set()
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + 1, step):
        h = min(area // w // step * step, int(resolution * math.sqrt(max_ratio)) // step * step)
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to that of `size` = (width, height)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


class Bucketing(Protocol):
    """A scheme of aspect-ratio buckets: for an image of (width, height), its bucket and the (width, height) it is
    scaled to before the centre crop to that bucket."""

    def fit(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]: ...


@dataclass(frozen=True)
class AreaBuckets:
    """`bucket_sizes(resolution)`; an image goes to the nearest in log aspect ratio, scaled to cover it."""

    resolution: int

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        return bucket_sizes(self.resolution)

    def fit(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        (w, h), (out_w, out_h) = size, nearest_bucket(size, self.sizes)
        scale = max(out_w / w, out_h / h)
        return (out_w, out_h), (max(out_w, round(w * scale)), max(out_h, round(h * scale)))


@dataclass(frozen=True)
class Resize:
    """How every image pair is brought to the training size.

    `resolution` None keeps images as stored (then all must share one size); otherwise `mode` says how:
    center_crop / random_crop: the short side scaled to `resolution`, then a resolution² crop;
    stretch: scaled to resolution² ignoring the aspect ratio (the original `--image_size`);
    buckets: scaled to cover the image's bucket and centre-cropped to it; the buckets are `bucketing`'s
    (kohya's, for a dataset config), by default `AreaBuckets(resolution)`.
    """

    resolution: int | None = None
    mode: str = "center_crop"
    bucketing: Bucketing | None = None

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {self.resolution}")
        if self.bucketing is not None and (self.mode != "buckets" or self.resolution is None):
            raise ValueError("a bucketing scheme needs mode 'buckets' and a resolution")

    @cached_property
    def buckets(self) -> Bucketing | None:
        """The bucketing scheme in use (mode buckets with a resolution), else None."""
        if self.mode != "buckets" or self.resolution is None:
            return None
        return self.bucketing or AreaBuckets(self.resolution)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the result for an input of `size`."""
        if self.resolution is None:
            return size
        if self.buckets is not None:
            return self.buckets.fit(size)[0]
        return self.resolution, self.resolution

    def _scaled(self, size: tuple[int, int], name: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(output, scaled) (width, height) of an image of `size`: it is scaled, then cropped to the output."""
        if self.resolution is None or self.mode == "stretch":
            out = self.output_size(size)
            return out, out
        if self.buckets is not None:
            try:
                return self.buckets.fit(size)
            except BadSampleError as err:
                raise BadSampleError(f"{name}: {err}") from None
        (w, h), side = size, self.resolution
        scale = side / min(w, h)  # the short side to the resolution, the long one covering it
        return (side, side), (max(side, round(w * scale)), max(side, round(h * scale)))

    def __call__(self, target: np.ndarray, hint: np.ndarray, rng: np.random.Generator | None = None,
                 names: tuple[str, str] = ("target", "hint")) -> tuple[np.ndarray, np.ndarray]:
        """The pair resized and cropped alike; `names` (target's, hint's) for the error of a misfit hint."""
        target, hint, _ = self.frame(target, hint, rng, names)
        return target, hint

    def frame(self, target: np.ndarray, hint: np.ndarray, rng: np.random.Generator | None = None,
              names: tuple[str, str] = ("target", "hint"), flip: bool = False
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The resized pair and SDXL's size conditioning of it, as kohya's SDXL training records it: the
        stored (h, w), the crop's (top, left) in the scaled image, and the output (h, w). `flip` mirrors both
        images left to right after the crop, and the crop's left with them (kohya's flip_aug)."""
        hint = fit_hint(hint, target.shape[:2], names)
        h, w = target.shape[:2]
        (out_w, out_h), (scaled_w, scaled_h) = self._scaled((w, h), names[0])
        x = y = 0
        if self.resolution is not None and self.mode == "stretch":
            target, hint = resize(target, out_w, out_h), resize(hint, out_w, out_h)
        elif self.resolution is not None:
            if self.mode == "random_crop":
                rng = rng or np.random.default_rng()
                x, y = int(rng.integers(scaled_w - out_w + 1)), int(rng.integers(scaled_h - out_h + 1))
            else:
                x, y = (scaled_w - out_w) // 2, (scaled_h - out_h) // 2
            target, hint = (resize(image, scaled_w, scaled_h)[y:y + out_h, x:x + out_w] for image in (target, hint))
        if flip:
            target, hint = np.ascontiguousarray(target[:, ::-1]), np.ascontiguousarray(hint[:, ::-1])
            x = scaled_w - x - out_w
        sizes = {ORIGINAL_SIZE: (h, w), CROP: (y, x), TARGET_SIZE: (out_h, out_w)}
        return target, hint, {k: np.array(v, dtype=np.float32) for k, v in sizes.items()}


def fit_hint(hint: np.ndarray, target_hw: tuple[int, int], names: tuple[str, str]) -> np.ndarray:
    """The hint at its target's size (as kohya's conditioning images are); refused if its aspect ratio differs,
    since such a hint cannot be aligned with the target."""
    if hint.shape[:2] == target_hw:
        return hint
    (th, tw), (hh, hw) = target_hw, hint.shape[:2]
    if abs(math.log((hw / hh) / (tw / th))) > ASPECT_TOLERANCE:
        raise BadSampleError(f"{names[1]} is {hw}x{hh} but its target {names[0]} is {tw}x{th}: a hint must show "
                             "the same view as its target (the same aspect ratio)")
    return resize(hint, tw, th)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging to shrink, bicubic to enlarge (OpenCV's advice for each)."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def to_item(target: np.ndarray, hint: np.ndarray, prompt: str,
            sizes: dict[str, np.ndarray] | None = None) -> ControlImageItem:
    """The training item of uint8 images: the target as float32 HWC in [-1, 1], the hint as float32 HWC in [0, 1],
    the caption, and the size conditioning of Resize.frame (SDXL reads it; other bases ignore it)."""
    return ControlImageItem({IMAGE: target.astype(np.float32) / 127.5 - 1.0, CAPTION: prompt,
                             HINT: hint.astype(np.float32) / 255.0, **(sizes or {})})

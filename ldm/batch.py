"""What the latent diffusion model reads from a training batch: the one definition of its keys.

A reader yields one item per sample, a dict of these keys; the DataLoader stacks items into a batch of the same
keys (arrays gain a leading batch dimension, captions become a list). An item carries either the image, which the
frozen VAE encodes as training runs (`ImageItem`), or a latent cache's posterior and text embeddings in its place
(`CachedItem`, written by tool_cache_latents.py). SDXL's size conditioning may come with either; without it the
model conditions on the image's own size, uncropped.

Each field is annotated with its layout (one name per dimension, digits fixed) and, for images, its value range;
`check_item` tests an item against them, so a reader's wrong, missing or misshapen key is named at the first batch.
"""
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, NotRequired, TypedDict, get_args, get_origin, get_type_hints

import numpy as np
import torch

from ldm.modules.encoders.conditioner import SIZE_KEYS

Array = np.ndarray | torch.Tensor

IMAGE = "jpg"  # the image to learn (the original LDM's name)
CAPTION = "txt"
MEAN, STD = "mean", "std"  # the VAE posterior of the image
TEXT_EMBEDDING = "txt_emb"  # the text encoder's output for the caption
TEXT_POOLED = "txt_pooled"  # SDXL: the pooled text of the vector conditioning


def empty_prompt(key: str) -> str:
    """The key of a cached text key's value for the empty prompt (prompt dropout puts it in the caption's place)."""
    return f"{key}_empty"


@dataclass(frozen=True)
class Layout:
    """An array field's dimensions (names, or digits for fixed sizes) in an item, and its value range if fixed."""

    dims: str
    low: float | None = None
    high: float | None = None

    def __str__(self) -> str:
        bounds = f" in [{self.low:g}, {self.high:g}]" if self.low is not None else ""
        return f"{' x '.join(self.dims.split())}{bounds}"


SIZE_FIELDS = {key: NotRequired[Annotated[Array, Layout("2")]] for key in SIZE_KEYS}  # (h, w) or (top, left)

ImageItem = TypedDict("ImageItem", {
    IMAGE: Annotated[Array, Layout("H W 3", -1.0, 1.0)],
    CAPTION: str,
    **SIZE_FIELDS,
})

CachedItem = TypedDict("CachedItem", {
    CAPTION: str,
    MEAN: Annotated[Array, Layout("C h w")],
    STD: Annotated[Array, Layout("C h w")],
    TEXT_EMBEDDING: Annotated[Array, Layout("L D")],
    empty_prompt(TEXT_EMBEDDING): Annotated[Array, Layout("L D")],
    TEXT_POOLED: NotRequired[Annotated[Array, Layout("P")]],
    empty_prompt(TEXT_POOLED): NotRequired[Annotated[Array, Layout("P")]],
    **SIZE_FIELDS,
})

RANGE_TOLERANCE = 1e-3  # resampling may overshoot a range by rounding, never by more


class BatchKeyError(ValueError):
    """An item that does not match its definition; the message names the key and the reader that yielded it."""


def check_item(item: object, kind: type, source: str) -> None:
    """BatchKeyError unless `item` is a `kind` (a TypedDict of this module's kind): every required key present,
    no unknown key, each value of its annotated type, layout and range; `source` names the reader."""
    name = kind.__name__
    if not isinstance(item, Mapping):
        raise BatchKeyError(f"{source} yields a {type(item).__name__}, not a {name} (a dict of "
                            f"{', '.join(sorted(kind.__required_keys__))})")
    missing = sorted(kind.__required_keys__ - item.keys())
    unknown = sorted(item.keys() - kind.__required_keys__ - kind.__optional_keys__)
    if missing or unknown:
        problems = [f"no key {key!r}" for key in missing] + [f"an unknown key {key!r}" for key in unknown]
        optional = f"; optional: {', '.join(sorted(kind.__optional_keys__))}" if kind.__optional_keys__ else ""
        raise BatchKeyError(f"{source} yields an item with {' and '.join(problems)} (a {name} has "
                            f"{', '.join(sorted(kind.__required_keys__))}{optional})")
    hints = get_type_hints(kind, include_extras=True)
    for key, value in item.items():
        expected, layout = hints[key], None
        if get_origin(expected) is NotRequired:
            expected = get_args(expected)[0]
        if get_origin(expected) is Annotated:
            expected, layout = get_args(expected)[:2]
        if not isinstance(value, expected):
            raise BatchKeyError(f"{source} yields {key!r} as a {type(value).__name__}; a {name}'s {key!r} is "
                                f"a {getattr(expected, '__name__', str(expected))}")
        if layout is not None:
            _check_layout(value, layout, key, name, source)


def _check_layout(value: Array, layout: Layout, key: str, kind: str, source: str) -> None:
    dims = layout.dims.split()
    shape = tuple(value.shape)
    fixed_ok = all(not d.isdigit() or int(d) == s for d, s in zip(dims, shape))
    if len(shape) != len(dims) or not fixed_ok:
        raise BatchKeyError(f"{source} yields {key!r} of shape {' x '.join(map(str, shape)) or 'scalar'}; a "
                            f"{kind}'s {key!r} is {layout}")
    if layout.low is None or 0 in shape:
        return
    low, high = float(value.min()), float(value.max())
    if not (low >= layout.low - RANGE_TOLERANCE and high <= layout.high + RANGE_TOLERANCE):
        raise BatchKeyError(f"{source} yields {key!r} with values from {low:g} to {high:g}; a {kind}'s {key!r} is "
                            f"{layout}")

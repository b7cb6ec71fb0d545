"""kohya's aspect-ratio buckets (sd-scripts' BucketManager and make_bucket_resolutions), for dataset configs with
`enable_bucket`: the same bucket sizes and the same choice of bucket, scaled size and centre crop per image.

Buckets: for widths from `min_bucket_reso` to `max_bucket_reso` in steps of `bucket_reso_steps`, the tallest
height (at most `max_bucket_reso`, a multiple of the step) whose area fits the resolution's; each also turned on
its side; plus the square of that area. An image goes to the bucket of nearest aspect ratio (its own size if that
is a bucket), scaled so one side fits the bucket exactly and the other covers it, then centre-cropped.
With `bucket_no_upscale`, an image is never enlarged: one larger than the resolution's area is shrunk to about
that area, and its bucket is its size rounded down to the step (min and max are then not used, as in kohya).
"""
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cldm.data.images import BadSampleError


@dataclass(frozen=True)
class KohyaBuckets:
    """kohya's bucket settings: `resolution` (width, height) gives the area; the rest are kohya's names."""

    resolution: tuple[int, int]
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        """The predefined (width, height) buckets, sorted (unused with bucket_no_upscale)."""
        step, low, high = self.bucket_reso_steps, self.min_bucket_reso, self.max_bucket_reso
        side = int(math.sqrt(self.max_area) // step) * step
        found = {(side, side)}
        for width in range(low, high + 1, step):
            height = min(high, int(self.max_area // width // step) * step)
            if height >= low:
                found.update({(width, height), (height, width)})
        return sorted(found)

    @cached_property
    def _lookup(self) -> tuple[frozenset[tuple[int, int]], np.ndarray]:
        """The buckets as a set and their aspect ratios, made once rather than per image."""
        return frozenset(self.sizes), np.array([w / h for w, h in self.sizes])

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.bucket_reso_steps

    def fit(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket, scaled size) of an image of `size` (width, height): the image is resized to the scaled size
        and centre-cropped to the bucket."""
        width, height = size
        ratio = width / height
        if not self.bucket_no_upscale:
            known, ratios = self._lookup
            bucket = size if size in known else self.sizes[int(np.abs(ratios - ratio).argmin())]
            scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width
            return bucket, (int(width * scale + 0.5), int(height * scale + 0.5))
        scaled = size
        if width * height > self.max_area:
            fit_width = math.sqrt(self.max_area * ratio)
            fit_height = self.max_area / fit_width
            by_width = self._round(fit_width)
            by_height = self._round(fit_height)
            width_error = abs(by_width / max(1, self._round(by_width / ratio)) - ratio)
            height_error = abs(self._round(by_height * ratio) / max(1, by_height) - ratio)
            scaled = (by_width, int(by_width / ratio + 0.5)) if width_error < height_error else \
                (int(by_height * ratio + 0.5), by_height)
        bucket = tuple(side - side % self.bucket_reso_steps for side in scaled)
        if min(bucket) == 0:
            raise BadSampleError(f"an image of {width}x{height} is smaller than bucket_reso_steps "
                                 f"{self.bucket_reso_steps} on a side, and bucket_no_upscale keeps it from growing")
        return bucket, scaled

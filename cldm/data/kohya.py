"""kohya's ControlNet layout (sd-scripts): image folders with same-basename caption files, and conditioning
folders whose images have the same basenames; one or more subsets, each with kohya's options.

    train/0001.jpg          the image (jpg, png, webp, ...; subfolders allowed)
    train/0001.txt          its caption (--caption_extension; .txt and .caption stand in for each other)
    conditioning/0001.png   its hint: same basename, any image extension, any size of the same aspect ratio

kohya's repeat folders: when the image folder holds folders named `N_name` (`10_canny`), each is a subset
whose images come N times per epoch; its hints are in the conditioning folder's folder of the same name, or in
the conditioning folder itself. Folders and images beside them are left out, with a warning, as kohya does.
A dataset config (cldm.data.kohya_config) gives the subsets and their options directly.

A hint of another size is resized to its image's size, as kohya's loader does; then both get the same resize
and crop. Captions must be UTF-8; a caption file's first line is the caption, as in kohya. An image without a
caption trains on an empty one, with a warning naming it (kohya's behaviour), or is refused by name with
`require_captions`. An image without a hint is refused by name, or left out with a warning when `skip_bad` is
set.
"""
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cldm.data.augment import ImageAugmentation
from cldm.data.base import EncodedSample, PairedImageDataset
from cldm.data.captions import CaptionOptions, caption_candidates, read_caption
from cldm.data.images import IMAGE_EXTENSIONS, BadSampleError, Resize, stored_size

log = logging.getLogger(__name__)

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")  # kohya's N_name folders (an underscore, so a year is no count)
LISTED = 10  # problems named one by one before the rest are counted


def image_files(folder: Path, exclude: Path | None = None) -> dict[Path, Path]:
    """Image files under `folder` (recursively, skipping `exclude`), keyed by their path relative to `folder`
    without the extension."""
    exclude = exclude.resolve() if exclude is not None else None
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            if exclude is not None and path.resolve().is_relative_to(exclude):
                continue
            found.setdefault(path.relative_to(folder).with_suffix(""), path)
    return found


@dataclass(frozen=True)
class KohyaSubset:
    """One of kohya's subsets: an image folder, its hints, where captions come from, and its per-sample options."""

    image_dir: Path
    conditioning_data_dir: Path
    caption_extension: str = ".txt"
    num_repeats: int = 1
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    augmentation: ImageAugmentation = field(default_factory=ImageAugmentation)


def folder_subsets(image_dir: str | Path, conditioning_data_dir: str | Path,
                   caption_extension: str = ".txt") -> list[KohyaSubset]:
    """The subsets of a kohya image folder: one per `N_name` folder it holds (N repeats), else the folder."""
    image_dir, conditioning_dir = Path(image_dir), Path(conditioning_data_dir)
    for name, folder in (("image folder", image_dir), ("conditioning_data_dir", conditioning_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} {folder} not found")
    inside = [p for p in sorted(image_dir.iterdir()) if p.resolve() != conditioning_dir.resolve()]
    repeats = {p: int(m.group(1)) for p in inside if p.is_dir() and (m := REPEAT_FOLDER.match(p.name))}
    if not repeats:
        return [KohyaSubset(image_dir, conditioning_dir, caption_extension)]
    subsets = []
    for path in inside:
        if repeats.get(path, 0) >= 1:
            hints = conditioning_dir / path.name
            subsets.append(KohyaSubset(path, hints if hints.is_dir() else conditioning_dir, caption_extension,
                                       repeats[path]))
        elif path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS:
            reason = "0 repeats" if path in repeats else "not an N_name repeat folder"
            log.warning("left out: %s (%s; %s holds N_name folders, as kohya's layout)", path, reason, image_dir)
    return subsets


class KohyaDataset(PairedImageDataset):
    """The images of kohya subsets with their captions and hints; sample i of an epoch is an image of a subset,
    each image appearing `num_repeats` times."""

    def __init__(self, subsets: Sequence[KohyaSubset], resize: Resize | None = None, skip_bad: bool = False,
                 require_captions: bool = False) -> None:
        super().__init__(resize)
        self.subsets = list(subsets)
        # (image, hint, caption file or None, caption, subset index) per distinct image
        self.samples: list[tuple[Path, Path, Path | None, str, int]] = []
        problems, uncaptioned, multiline, folders = [], [], 0, set()
        for number, subset in enumerate(self.subsets):
            for folder, name in ((subset.image_dir, "image_dir"), (subset.conditioning_data_dir,
                                                                   "conditioning_data_dir")):
                if not folder.is_dir():
                    raise FileNotFoundError(f"{name} {folder} not found")
            if subset.num_repeats < 1:
                log.warning("left out: subset %s (num_repeats %d, as kohya does)", subset.image_dir,
                            subset.num_repeats)
                continue
            pair = (subset.image_dir.resolve(), subset.conditioning_data_dir.resolve())
            if pair in folders:
                log.warning("left out: subset %s repeats an earlier one (kohya uses the first)", subset.image_dir)
                continue
            folders.add(pair)
            images = image_files(subset.image_dir, exclude=subset.conditioning_data_dir)
            if not images:
                raise FileNotFoundError(f"{subset.image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            hints = image_files(subset.conditioning_data_dir)
            for key, image in images.items():
                if key not in hints:
                    problems.append(f"{image} has no hint {subset.conditioning_data_dir / key}.* (same basename)")
                    continue
                found = next((c for c in caption_candidates(image, subset.caption_extension) if c.is_file()), None)
                caption = ""
                if found is None:
                    if require_captions:
                        problems.append(f"{image} has no caption file {image.with_suffix(subset.caption_extension)}")
                        continue
                    uncaptioned.append(image)
                else:
                    try:
                        caption, lines = read_caption(found, subset.captions.enable_wildcard)
                    except UnicodeDecodeError as e:
                        problems.append(f"{found}: caption is not UTF-8 (byte at offset {e.start})")
                        continue
                    multiline += lines > 1 and not subset.captions.enable_wildcard
                self.samples.append((image, hints[key], found, caption, number))
        if problems and not skip_bad:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BadSampleError(f"{problems[0]}{more}; fix them, or pass --skip_bad_samples to leave them out")
        for problem in problems:
            log.warning("left out: %s", problem)
        for image in uncaptioned[:LISTED]:
            log.warning("no caption file for %s: it trains on an empty caption (as in kohya; --require_captions "
                        "stops instead)", image)
        if len(uncaptioned) > LISTED:
            log.warning("%d more images without a caption file train on an empty caption", len(uncaptioned) - LISTED)
        if multiline:
            log.warning("%d caption files hold several lines: each trains on its first line, as kohya does "
                        "(enable_wildcard picks one line per step)", multiline)
        if not self.samples:
            raise BadSampleError(f"{', '.join(str(s.image_dir) for s in self.subsets)}: no image has a hint")
        # sample i of an epoch: each image num_repeats times, in subset order (the sampler shuffles)
        self.order = [j for j, sample in enumerate(self.samples) for _ in range(self.subsets[sample[4]].num_repeats)]
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.order)

    def encoded(self, idx: int) -> EncodedSample:
        image, hint, _, caption, _ = self.samples[self.order[idx]]
        try:
            return EncodedSample(image.read_bytes(), hint.read_bytes(), caption, str(image), str(hint))
        except OSError as err:
            raise BadSampleError(f"{err.filename} cannot be read: {err.strerror}") from None

    def target_size(self, idx: int) -> tuple[int, int]:
        sample = self.order[idx]
        if sample not in self._sizes:  # read once per image, not once per repeat
            self._sizes[sample] = stored_size(self.samples[sample][0])
        return self._sizes[sample]

    def caption(self, idx: int) -> str:
        return self.samples[self.order[idx]][3]

    def caption_source(self, idx: int) -> str:
        image, _, caption_file, _, _ = self.samples[self.order[idx]]
        return str(caption_file) if caption_file is not None else f"{image} (no caption file)"

    def subset(self, idx: int) -> KohyaSubset:
        return self.subsets[self.samples[self.order[idx]][4]]

    def augmentation(self, idx: int) -> ImageAugmentation:
        return self.subset(idx).augmentation

    def training_caption(self, idx: int, caption: str, rng: np.random.Generator) -> str:
        return self.subset(idx).captions(caption, rng)

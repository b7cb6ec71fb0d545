"""kohya's ControlNet layout (sd-scripts): an image folder with same-basename caption files, and a
conditioning folder whose images have the same basenames.

    train/0001.jpg          the image (jpg, png, webp, ...; subfolders allowed)
    train/0001.txt          its caption (--caption_extension, default .txt)
    conditioning/0001.png   its hint: same basename, any image extension, any size of the same aspect ratio

A hint of another size is resized to its image's size, as kohya's loader does; then both get the same resize
and crop. Captions must be UTF-8. An image without a hint or a caption is refused by name, or left out with a
warning when `skip_bad` is set.
"""
import logging
from pathlib import Path

from cldm.data.base import EncodedSample, PairedImageDataset
from cldm.data.images import IMAGE_EXTENSIONS, BadSampleError, Resize

log = logging.getLogger(__name__)


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


class KohyaDataset(PairedImageDataset):
    """Images of `image_dir` with their `caption_extension` captions, hints from `conditioning_data_dir`."""

    def __init__(self, image_dir: str | Path, conditioning_data_dir: str | Path, caption_extension: str = ".txt",
                 resize: Resize | None = None, skip_bad: bool = False) -> None:
        super().__init__(resize)
        self.image_dir, self.conditioning_dir = Path(image_dir), Path(conditioning_data_dir)
        for name, folder in (("image folder", self.image_dir), ("conditioning_data_dir", self.conditioning_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{name} {folder} not found")
        if not caption_extension.startswith("."):
            caption_extension = "." + caption_extension
        images = image_files(self.image_dir, exclude=self.conditioning_dir)
        hints = image_files(self.conditioning_dir)
        if not images:
            raise FileNotFoundError(f"{self.image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.samples: list[tuple[Path, Path, Path, str]] = []  # (image, hint, caption file, caption)
        problems = []
        for key, image in images.items():
            caption_file = image.with_suffix(caption_extension)
            if key not in hints:
                problems.append(f"{image} has no hint {self.conditioning_dir / key}.* (same basename)")
            elif not caption_file.is_file():
                problems.append(f"{image} has no caption file {caption_file}")
            else:
                try:
                    caption = caption_file.read_bytes().decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    problems.append(f"{caption_file}: caption is not UTF-8 (byte at offset {e.start})")
                    continue
                self.samples.append((image, hints[key], caption_file, caption))
        if problems and not skip_bad:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BadSampleError(f"{problems[0]}{more}; fix them, or pass --skip_bad_samples to leave them out")
        for problem in problems:
            log.warning("left out: %s", problem)
        if not self.samples:
            raise BadSampleError(f"{self.image_dir}: no image has both a hint and a caption")

    def __len__(self) -> int:
        return len(self.samples)

    def encoded(self, idx: int) -> EncodedSample:
        image, hint, _, caption = self.samples[idx]
        try:
            return EncodedSample(image.read_bytes(), hint.read_bytes(), caption, str(image), str(hint))
        except OSError as err:
            raise BadSampleError(f"{err.filename} cannot be read: {err.strerror}") from None

    def caption(self, idx: int) -> str:
        return self.samples[idx][3]

    def caption_source(self, idx: int) -> str:
        return str(self.samples[idx][2])

"""What every reader shares: a sample is a target image, a hint image and a caption, stored encoded; the base
decodes them, brings them to the training size with one `Resize` and returns the training item."""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np
import torch
from torch.utils.data import Dataset

from cldm.data.augment import ImageAugmentation, color_augment
from cldm.data.batch import ControlImageItem
from cldm.data.images import BadSampleError, Resize, decode, stored_size, to_item


def leaves_root(name: str) -> bool:
    """Whether a path named in a data set (an index line, a column) points outside its data root (absolute, or
    through `..`); readers read such paths only when allow_outside_root says so."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return posix.is_absolute() or windows.is_absolute() or bool(windows.drive) or ".." in windows.parts


@dataclass(frozen=True)
class EncodedSample:
    """One sample as stored: the target's and the hint's file bytes, the caption, and names for messages."""

    target: bytes
    hint: bytes
    caption: str
    target_name: str
    hint_name: str


class PairedImageDataset(Dataset, ABC):
    """A reader: item i is a ControlImageItem (cldm.data.batch): jpg = the target, HxWx3 float32 in [-1, 1],
    txt = the caption, hint = HxWx3 float32 in [0, 1], and SDXL's size conditioning of the resize.

    Subclasses say how many samples there are (`__len__`), how to read one as stored (`encoded`) and where its
    caption comes from (`caption_source`, for reports); a reader with per-sample variation (kohya's options,
    a caption column of lists) says so in `augmentation` and `training_caption`. With `resize.resolution` None
    all targets must share the first one's size; a sample of another size is refused with advice.
    """

    def __init__(self, resize: Resize | None = None) -> None:
        self.resize = resize or Resize()
        self._reference: tuple[tuple[int, int], str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def encoded(self, idx: int) -> EncodedSample:
        """Sample idx as stored; BadSampleError naming the file when it cannot be read."""

    @abstractmethod
    def caption_source(self, idx: int) -> str:
        """Where sample idx's caption comes from (a file, an index line, a row), for caption reports."""

    @abstractmethod
    def caption(self, idx: int) -> str:
        """Sample idx's caption, without reading its images."""

    def augmentation(self, idx: int) -> ImageAugmentation:
        """The image augmentations sample idx gets (none unless a reader's options say so)."""
        return ImageAugmentation()

    def training_caption(self, idx: int, caption: str, rng: np.random.Generator) -> str:
        """The caption sample idx trains on at this step, from its stored `caption` (as stored, by default)."""
        return caption

    def target_size(self, idx: int) -> tuple[int, int]:
        """(width, height) of sample idx's target as decoded, from its header."""
        sample = self.encoded(idx)
        return stored_size(sample.target, sample.target_name)

    def sizes(self) -> list[tuple[int, int]]:
        """Every target's (width, height), for aspect-ratio buckets."""
        return [self.target_size(i) for i in range(len(self))]

    def __getitem__(self, idx: int) -> ControlImageItem:
        sample = self.encoded(idx)
        target = decode(sample.target, sample.target_name)
        hint = decode(sample.hint, sample.hint_name)
        # numbers from torch's generator, which Lightning seeds per worker (seed_everything(workers=True))
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        augmentation = self.augmentation(idx)
        target, hint, sizes = self.resize.frame(target, hint, rng, (sample.target_name, sample.hint_name),
                                                flip=augmentation.flips(rng))
        if self.resize.resolution is None:
            self._check_common_size(target, sample.target_name)
        if augmentation.color_aug:
            target = color_augment(target, rng)
        return to_item(target, hint, self.training_caption(idx, sample.caption, rng), sizes)

    def _check_common_size(self, target: np.ndarray, name: str) -> None:
        if self._reference is None:
            first = self.encoded(0)
            self._reference = stored_size(first.target, first.target_name), first.target_name
        (w, h), first_name = self._reference
        if target.shape[:2] != (h, w):
            raise BadSampleError(
                f"{name} is {target.shape[1]}x{target.shape[0]}, but {first_name} is {w}x{h}: the images of a "
                "batch must share one size; pass --resolution N to resize and crop them all to N x N (or "
                "--image_size N to stretch them)")


class Selection(PairedImageDataset):
    """Some samples of a reader, in the reader's own item form (diffusers' --max_train_samples)."""

    def __init__(self, dataset: PairedImageDataset, indices: list[int]) -> None:
        super().__init__(dataset.resize)
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> ControlImageItem:
        return self.dataset[self.indices[idx]]

    def encoded(self, idx: int) -> EncodedSample:
        return self.dataset.encoded(self.indices[idx])

    def caption(self, idx: int) -> str:
        return self.dataset.caption(self.indices[idx])

    def caption_source(self, idx: int) -> str:
        return self.dataset.caption_source(self.indices[idx])

    def target_size(self, idx: int) -> tuple[int, int]:
        return self.dataset.target_size(self.indices[idx])


def select_samples(dataset: PairedImageDataset, count: int, seed: int = 0) -> Selection:
    """`count` samples of `dataset` drawn at random by `seed`, as diffusers' --max_train_samples shuffles with the
    seed and keeps the first; ValueError when it holds fewer."""
    if not 1 <= count <= len(dataset):
        raise ValueError(f"--max_train_samples must be from 1 to the {len(dataset)} samples of the data, got {count}")
    return Selection(dataset, sorted(np.random.default_rng(seed).permutation(len(dataset))[:count].tolist()))

"""Image helpers and weight loading shared by every detector."""

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn

CKPTS_ENV = "CONTROLNET_ANNOTATOR_CKPTS"
annotator_ckpts_path = str(Path(__file__).resolve().parent / "ckpts")


class MissingWeightsError(FileNotFoundError):
    """A detector's weight file is not on disk; the message says where to put it."""


def ckpts_dir() -> Path:
    """Folder holding detector weights: $CONTROLNET_ANNOTATOR_CKPTS or annotator/ckpts."""
    return Path(os.environ.get(CKPTS_ENV, annotator_ckpts_path))


def weights_path(filename: str, source: str) -> Path:
    """Path of a detector weight file, or a MissingWeightsError naming where to get it."""
    path = ckpts_dir() / filename
    if not path.is_file():
        raise MissingWeightsError(
            f"Detector weights not found: {path}\n"
            f"Download {filename} from {source} and put it in {path.parent} "
            f"(or point ${CKPTS_ENV} at the folder that holds it)."
        )
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict without executing pickled code (safetensors or weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"Could not load weights from {path} safely: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


class NetworkDetector:
    """Base of the detectors that run one network: the network's class, its weight file and where to get it.

    The weights come from `weights`, else `weights_file` in the ckpts folder (a MissingWeightsError names
    `weights_url` when it is not there), and load strictly; `random_init` keeps random weights (tests).
    """

    network: Callable[[], nn.Module]
    weights_file: str
    weights_url: str
    rename: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # file -> ours

    def __init__(
        self,
        device: str | torch.device = "cpu",
        weights: str | os.PathLike | None = None,
        random_init: bool = False,
    ) -> None:
        self.device = torch.device(device)
        cls = type(self)
        if random_init:
            self.model = cls.network()
        else:
            state = load_weights(weights or weights_path(cls.weights_file, cls.weights_url))
            # built on meta and filled by assignment: no time spent on an init the weights overwrite
            with torch.device("meta"):
                self.model = cls.network()
            self.model.load_state_dict(cls.rename(self.model, state) if cls.rename else state, strict=True,
                                       assign=True)
        self.model.to(self.device, torch.float32).eval()


def check_rgb(image: np.ndarray) -> None:
    """Refuse anything but an HxWx3 uint8 image, naming what came instead."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")


def HWC3(x: np.ndarray) -> np.ndarray:
    """Any uint8 image (HW, HW1, HW3, HW4) as HWC RGB; alpha is composited on white."""
    if x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {x.shape}")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def resize_image(input_image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize so the short side is `resolution`, both sides rounded to a multiple of 64."""
    H, W, _ = input_image.shape
    k = float(resolution) / min(H, W)
    H = max(64, int(np.round(H * k / 64.0)) * 64)
    W = max(64, int(np.round(W * k / 64.0)) * 64)
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(input_image, (W, H), interpolation=interpolation)

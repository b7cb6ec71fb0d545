"""Small helpers shared across ldm: config instantiation, parameter counts, text images."""

import importlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Any) -> Any:
    """Build `config.target(**config.params)`; the two placeholder strings of the original map to None."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"Expected key `target` to instantiate, got config with keys {list(config)}")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render captions as a batch of images in [-1, 1], shape (B, 3, H, W)."""
    txts = []
    font = ImageFont.load_default()
    chars_per_line = max(1, int(40 * (wh[0] / 256)))
    for caption in xc:
        txt = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(txt)
        lines = "\n".join(caption[start:start + chars_per_line] for start in range(0, len(caption), chars_per_line))
        draw.text((0, 0), lines, fill="black", font=font)
        txts.append(np.array(txt).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(txts), dtype=torch.float32)


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose unpickling would need more than tensors (possibly code execution)."""


def load_checkpoint_state_dict(path: str | os.PathLike, location: str | torch.device = "cpu"
                               ) -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pth/.pt/.safetensors file, unwrapped from {"state_dict": ...}, loaded safely.

    Pickles are read with torch.load(weights_only=True), which refuses to run code; safetensors has no code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device=str(location))
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    else:
        try:
            state = torch.load(path, map_location=location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"Refusing to load {path}: it contains pickled objects that are not plain tensors, and "
                f"unpickling them could execute code.\nIf you trust this file, convert it once to safetensors:\n"
                f"  python -c \"import torch, safetensors.torch as st; sd = torch.load('{path}', "
                f"weights_only=False); sd = sd.get('state_dict', sd); "
                f"st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
                f"'{path.with_suffix('.safetensors')}')\"\n(weights_only error: {err})") from err
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

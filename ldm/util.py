"""Small helpers shared across ldm: config instantiation and text images."""

import importlib
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


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor (sharded training), a plain tensor itself."""
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


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

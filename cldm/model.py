"""Build models from YAML configs and move weights between files and models, safely and atomically."""

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config, load_checkpoint_state_dict

# Keys that may be present or absent in published checkpoints without meaning anything is wrong: HF CLIP's
# constant position ids, and the noise levels sgm stores for SDXL (ours follow from the config's schedule).
OPTIONAL_KEY_SUFFIXES = ("embeddings.position_ids", "denoiser.sigmas")


def get_state_dict(d: dict) -> dict:
    return d.get("state_dict", d)


def load_state_dict(ckpt_path: str | os.PathLike, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pth/.safetensors checkpoint; pickles that would run code are refused."""
    state_dict = load_checkpoint_state_dict(ckpt_path, location=location)
    print(f"Loaded state_dict from [{ckpt_path}]")
    return state_dict


def create_model(config_path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Instantiate `model:` of a YAML config (on `device`, or the current default device)."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"Model config not found: {config_path}")
    config = OmegaConf.load(config_path)
    if "model" not in config:
        raise KeyError(f"{config_path} has no top-level `model:` section")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = instantiate_from_config(config.model)
    print(f"Loaded model config from [{config_path}]")
    return model if device is not None else model.cpu()


@dataclass
class LoadReport:
    """What a checkpoint load left unmatched, by key name."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        if self.ok:
            return "all keys matched"
        lines = [f"{len(self.missing)} missing, {len(self.unexpected)} unexpected keys"]
        lines += [f"  missing:    {k}" for k in self.missing[:20]]
        lines += [f"  unexpected: {k}" for k in self.unexpected[:20]]
        return "\n".join(lines)


def load_checkpoint(model: torch.nn.Module, state_dict_or_path: dict | str | os.PathLike,
                    strict: bool = False, prefixes: tuple[str, ...] | None = None) -> LoadReport:
    """Load weights into `model` and report missing and unexpected keys by name.

    `prefixes` limits "missing" to the given key prefixes (e.g. ("control_model.",) for a control-only file).
    Shape mismatches raise with the key and both shapes. With strict=True any unmatched key raises.
    """
    state_dict = (state_dict_or_path if isinstance(state_dict_or_path, dict)
                  else load_checkpoint_state_dict(state_dict_or_path))
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError("Checkpoint does not fit this model (shape mismatch):\n  " + "\n  ".join(mismatched[:20]))
    optional = lambda k: k.endswith(OPTIONAL_KEY_SUFFIXES)  # noqa: E731
    missing = [k for k in own if k not in state_dict and not optional(k)
               and (prefixes is None or k.startswith(prefixes))]
    unexpected = [k for k in state_dict if k not in own and not optional(k)]
    report = LoadReport(missing, unexpected)
    if strict and not report.ok:
        raise KeyError(f"Checkpoint does not match the model: {report}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return report


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False):
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on failure removed.

    An existing `path` is refused unless force=True, and is never touched if writing fails.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, force: bool = False) -> Path:
    """Write .safetensors or .ckpt/.pth by extension, through a temp file renamed into place."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_output(path, force) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
    return path

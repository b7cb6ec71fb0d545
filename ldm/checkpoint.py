"""Checkpoint files: safe loading, what a file is, load reports, atomic saving, and the state-dict key prefixes.

Every loader and writer of weights in the project goes through here. Pickles are read with
torch.load(weights_only=True), which refuses to run code; safetensors has no code. A file is recognised by its
first bytes, not its name, so a safetensors file named .ckpt loads, and a Git LFS pointer, an HTML page or a
text file saved under a checkpoint's name is named for what it is.
"""

import contextlib
import errno
import hashlib
import logging
import os
import pickle
import re
import shutil
import socket
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# State-dict key prefixes of a LatentDiffusion model (the original checkpoints' layout).
DENOISER_PREFIX = "model."  # DiffusionWrapper
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."  # SD1.x/2.x
CONDITIONER_PREFIX = "conditioner."  # SDXL (sgm's layout): the text encoders and size embedders
EMA_PREFIX = "model_ema."
ENCODER_PREFIXES = (VAE_PREFIX, TEXT_ENCODER_PREFIX, CONDITIONER_PREFIX)  # the frozen parts a latent cache replaces
BASE_PREFIXES = (DENOISER_PREFIX, *ENCODER_PREFIXES)  # everything of a Stable Diffusion checkpoint
# Keys that may be present or absent in published checkpoints without meaning anything is wrong: HF CLIP's
# constant position ids, and the noise levels sgm stores for SDXL (ours follow from the config's schedule).
OPTIONAL_KEY_SUFFIXES = ("embeddings.position_ids", "denoiser.sigmas")


class UserError(ValueError):
    """A mistake the user can fix, told in one line that names the file, key or argument (str(err)), plus an
    optional line of advice. Command lines print both and exit 1, without a traceback."""

    def __init__(self, message: str, advice: str | None = None):
        super().__init__(message)
        self.advice = advice


class CheckpointError(UserError):
    """A file that cannot be read as a checkpoint: not one, truncated, or not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle whose unpickling would need more than tensors (possibly code execution)."""


class DiskFullError(OSError):
    """No space left on a device while writing a file (the message names both)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


# What a file is, by its first bytes.
TORCH_ZIP, PICKLE, SAFETENSORS = "a PyTorch checkpoint", "a pickle", "a safetensors file"
LFS_POINTER = "a Git LFS pointer (the real file was never downloaded)"
HTML = "an HTML page (a download that saved an error or login page)"
SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself sets
UNRECOGNISED = "neither a PyTorch checkpoint nor a safetensors file"
NOT_CHECKPOINT_ADVICE = {
    LFS_POINTER: "fetch the real file with `git lfs pull`, or download it again",
    HTML: "download the file again",
}


def sniff(path: str | os.PathLike) -> str:
    """What the file at `path` holds, by its first bytes: TORCH_ZIP, PICKLE, SAFETENSORS, or a description."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return PICKLE
    if len(head) >= 9:
        header_len = struct.unpack("<Q", head[:8])[0]
        if 2 <= header_len < SAFETENSORS_MAX_HEADER and head[8:9] == b"{":  # (a truncated one included)
            return SAFETENSORS
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return LFS_POINTER
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:256]:
        return HTML
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as err:
        decoded = head[:err.start].decode("utf-8") if err.start > len(head) - 4 else None
    if decoded is not None and all(c.isprintable() or c in "\t\r\n" for c in decoded):
        first_line = decoded.strip().splitlines()[0][:40] if decoded.strip() else ""
        return f"a text file (starting {first_line!r})"
    return f"{UNRECOGNISED} (it starts with bytes {head[:8].hex(' ')})"


def load_state_dict(path: str | os.PathLike, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pth/.pt/.safetensors file, unwrapped from {"state_dict": ...}, loaded safely.

    The format is read from the content; a file that is not a checkpoint raises CheckpointError saying what
    it looks like, and a pickle that would run code raises UnsafeCheckpointError.
    """
    return state_dict_of(read_checkpoint(path, location), path)


def read_checkpoint(path: str | os.PathLike, location: str | torch.device = "cpu", mmap: bool = False) -> object:
    """The object saved in a checkpoint file (a safetensors file gives its dict of tensors), loaded safely.

    mmap=True maps a PyTorch zip file's tensors instead of reading them (cheap to inspect a large file).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    kind = sniff(path)
    if kind == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(location))
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    if kind not in (TORCH_ZIP, PICKLE):
        looks = kind if kind.startswith(UNRECOGNISED) else f"it looks like {kind}"
        raise CheckpointError(f"{path} is not a checkpoint: {looks}", NOT_CHECKPOINT_ADVICE.get(kind))
    try:
        if mmap and kind == TORCH_ZIP:
            return torch.load(path, map_location=location, weights_only=True, mmap=True)
        with open(path, "rb") as f:  # a file object: torch.load would pick a loader by a .safetensors name
            return torch.load(f, map_location=location, weights_only=True)
    except pickle.UnpicklingError as err:
        safe = path.with_suffix(".safetensors")
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it holds pickled objects other than tensors, and unpickling them could "
            f"run code",
            f"if you trust the file, convert it once to safetensors: python -c \"import torch, safetensors.torch "
            f"as st; sd = torch.load('{path}', weights_only=False); sd = sd.get('state_dict', sd); st.save_file("
            f"{{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, '{safe}')\"") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        if kind == TORCH_ZIP and "central directory" not in str(err) and isinstance(err, RuntimeError):
            raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint") from err
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from err


def state_dict_of(obj: object, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object, unwrapped from nested {"state_dict": ...}."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} does not hold a state dict (found {type(obj).__name__})")
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{source} is not a state dict: {len(odd)} of its keys are not names "
                              f"(e.g. {odd[0]!r}, of type {type(odd[0]).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if obj and not tensors:
        raise CheckpointError(f"{source} holds no tensors (keys such as {list(obj)[:3]})")
    return tensors


def nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or infinity."""
    return [k for k, v in state_dict.items()
            if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]


def require_finite(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse weights with NaN or infinity: training on them only spreads NaN, silently."""
    bad = nonfinite_keys(state_dict)
    if bad:
        raise CheckpointError(f"{source} has non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. {bad[0]}",
                              "a run that diverged saved it: use an earlier checkpoint")


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of a state dict (names, dtypes, shapes and values): equal weights, equal fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state_dict.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
        parts = [f"{len(self.missing)} missing keys ({', '.join(self.missing[:3])}{', ...' * (len(self.missing) > 3)})"
                 * bool(self.missing),
                 f"{len(self.unexpected)} unexpected keys ({', '.join(self.unexpected[:3])}"
                 f"{', ...' * (len(self.unexpected) > 3)})" * bool(self.unexpected)]
        return "; ".join(p for p in parts if p)


def load_checkpoint(model: torch.nn.Module, state_dict_or_path: Mapping | str | os.PathLike,
                    strict: bool = False, prefixes: tuple[str, ...] | None = None,
                    source: str | os.PathLike | None = None) -> LoadReport:
    """Load weights into `model` and report missing and unexpected keys by name.

    `prefixes` limits "missing" to the given key prefixes (e.g. (CONTROL_PREFIX,) for a control-only file).
    Shape mismatches raise with the key and both shapes. With strict=True any unmatched key raises. Errors name
    `source` (default: the path, or "checkpoint" for a state dict).
    """
    if source is None:
        source = "checkpoint" if isinstance(state_dict_or_path, Mapping) else str(state_dict_or_path)
    state_dict = (state_dict_or_path if isinstance(state_dict_or_path, Mapping)
                  else load_state_dict(state_dict_or_path))
    own = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} in file vs {tuple(own[k].shape)} in model"
                  for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise CheckpointError(f"{source} does not fit this model: {len(mismatched)} shapes differ "
                              f"({'; '.join(mismatched[:3])}{'; ...' * (len(mismatched) > 3)})")
    optional = lambda k: k.endswith(OPTIONAL_KEY_SUFFIXES)  # noqa: E731
    missing = [k for k in own if k not in state_dict and not optional(k)
               and (prefixes is None or k.startswith(prefixes))]
    unexpected = [k for k in state_dict if k not in own and not optional(k)]
    report = LoadReport(missing, unexpected)
    if strict and not report.ok:
        raise CheckpointError(f"{source} does not match the model: {report}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return report


# Temp files of atomic_output: `.NAME.PID-HOST.RANDOM.tmp` beside NAME. A temp file of this host whose process is
# gone is stale (its writer was killed); those of other hosts (a shared file system) are left alone.
TEMP_SUFFIX = ".tmp"
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temp files (or folders) that atomic writes of `path` left behind when their process was killed."""
    path = Path(path)
    stale = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-{re.escape(HOST)}\.[^.]+{re.escape(TEMP_SUFFIX)}$")
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                stale.append(entry)
    for entry in stale:
        log.info("Removed %s, left by an interrupted write of %s", entry, path)
    return stale


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{HOST}."


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def is_disk_full(err: BaseException, where: Path) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC itself, the message of a library that wraps it
    (safetensors), or a torch writer's bare "file write failed" on a device with (almost) no space left."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(err) or "os error 28" in str(err):
        return True
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on failure removed.

    An existing `path` is refused unless force=True, and is never touched if writing fails. A full disk is
    reported as DiskFullError naming the device and the file. Temp files of killed earlier writes are removed.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        try:
            yield tmp
        except Exception as err:
            if is_disk_full(err, path.parent):
                raise DiskFullError(f"no space left on {mount_point(path.parent)} while writing {path}") from err
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, force: bool = True) -> Path:
    """A UTF-8 text file written through a temp file renamed into place (see atomic_output)."""
    with atomic_output(path, force) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, force: bool = False) -> Path:
    """Write .safetensors or .ckpt/.pth by extension, through a temp file renamed into place."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_output(path, force) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, tmp)
        else:
            save_torch(tensors, tmp)
    return path


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """torch.save through a Python file object, so that a full disk raises OSError(ENOSPC), not a bare
    "file write failed"."""
    with open(path, "wb") as f:
        torch.save(obj, f)

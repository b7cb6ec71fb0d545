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
import warnings
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
    """The object saved in a checkpoint file (a safetensors file gives its dict of tensors), loaded safely; a
    sharded checkpoint folder gives Lightning's checkpoint dict with its weights whole (read_sharded_checkpoint).

    mmap=True maps a PyTorch zip file's tensors instead of reading them (cheap to inspect a large file).
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path, location)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file (nor a sharded checkpoint folder)")
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


# A sharded checkpoint is a folder written by torch.distributed.checkpoint (a file per rank and an index), as
# Lightning's model-parallel strategy saves it (tutorial_train --strategy fsdp), with Lightning's other state in
# meta.pt. Its weights are under "state_dict.", the optimizer's under "optimizer_0." (ModelParallelStrategy's keys).
SHARDED_INDEX = ".metadata"
SHARDED_META = "meta.pt"
SHARDED_WEIGHTS = "state_dict"
# What the index (a pickle) may name besides torch's dtypes: torch.distributed.checkpoint's metadata records, sizes
# and paths.
INDEX_GLOBALS = {"torch.distributed.checkpoint.metadata": None,
                 "torch.distributed.checkpoint.filesystem": {"_StorageInfo"}, "torch": {"Size"},
                 "torch.serialization": {"_get_layout"}, "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"}}


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / SHARDED_INDEX).is_file()


class ShardedIndexUnpickler(pickle.Unpickler):
    """Unpickles a sharded checkpoint's index, refusing every global but its metadata records (a pickle of other
    objects could run code, which torch.distributed.checkpoint's own reader would allow)."""

    def find_class(self, module: str, name: str) -> object:
        allowed = INDEX_GLOBALS.get(module, set())
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and (module not in INDEX_GLOBALS or (allowed is not None and name not in allowed)):
            raise pickle.UnpicklingError(f"a sharded checkpoint index does not name {module}.{name}")
        return super().find_class(module, name)


def read_sharded_checkpoint(path: str | os.PathLike, location: str | torch.device = "cpu") -> dict:
    """A sharded checkpoint folder as one Lightning checkpoint dict, read in this process alone (no process
    group): meta.pt's entries (step, loops, callbacks, training settings) and "state_dict" with
    every weight whole; on the "meta" device the weights' shapes alone, from the index. The optimizer's state is
    not read (read_sharded_tensors reads parts of it)."""
    path = Path(path)
    meta_file = path / SHARDED_META
    checkpoint = read_checkpoint(meta_file, location) if meta_file.is_file() else {}
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{meta_file} does not hold Lightning's checkpoint state")
    tensors = read_sharded_tensors(path, SHARDED_WEIGHTS + ".", location=location)
    if not tensors:
        entries = sorted({k.split(".")[0] for k in sharded_index(path).state_dict_metadata})
        raise CheckpointError(f"{path} is a sharded checkpoint without weights (no {SHARDED_WEIGHTS}.* entries in its "
                              f"index; it has {entries})")
    return {**checkpoint, SHARDED_WEIGHTS: tensors}


def sharded_index(path: Path) -> "torch.distributed.checkpoint.Metadata":
    """The index (torch.distributed.checkpoint's Metadata) of a sharded checkpoint folder, unpickled with an
    allow-list."""
    import torch.distributed.checkpoint as dcp

    with open(path / SHARDED_INDEX, "rb") as f:
        try:
            metadata = ShardedIndexUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise CheckpointError(f"{path} is not a readable sharded checkpoint: its index {SHARDED_INDEX} {err}"
                                  ) from err
    metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
    return metadata


def read_sharded_tensors(path: str | os.PathLike, prefix: str, suffix: str = "",
                         location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint folder whose entry names start with `prefix` and end with `suffix`,
    whole, by name without them (on the "meta" device their shapes alone); read in this process alone."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> dcp.Metadata:
            return sharded_index(path)

    reader = SafeReader(path)
    shapes = {k: m for k, m in reader.read_metadata().state_dict_metadata.items()
              if k.startswith(prefix) and k.endswith(suffix) and isinstance(m, dcp.metadata.TensorStorageMetadata)}
    entries = {k: torch.empty(m.size, dtype=m.properties.dtype, device=location) for k, m in shapes.items()}
    if entries and torch.device(location).type != "meta":
        with warnings.catch_warnings():  # that it reads in this one process, which is what is asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(entries, storage_reader=reader, no_dist=True)
    return {k[len(prefix):len(k) - len(suffix)]: v for k, v in entries.items()}


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


# Temps of atomic writes: `.NAME.PID-HOST.RANDOM.tmp` beside NAME (a file or a folder), and `.NAME.PID-HOST.RANDOM
# .old.tmp` for a folder NAME moved aside while a new one takes its place. A temp of this host whose process is gone
# is stale (its writer was killed): the next write into the folder removes it, or puts a folder moved aside back
# when nothing took its place. Temps of live processes and of other hosts (a shared file system) are left alone.
TEMP_SUFFIX = ".tmp"
DISPLACED = ".old"
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
_TEMP_NAME = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+)-{re.escape(HOST)}\.[A-Za-z0-9_]+"
                        rf"(?P<displaced>{re.escape(DISPLACED)})?{re.escape(TEMP_SUFFIX)}$")
_swept: set[Path] = set()  # folders whose stale temps this process has removed (once per folder is enough)
# errno values of a write that failed midway for a reason the user can fix, with the words of its message
WRITE_ERRORS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for the file system or the file size limit (ulimit -f)",
                errno.EIO: "input/output error (a failing disk or a network file system)"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_temps(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """Temps in `folder` of writers of this host that are still running, with their process ids."""
    folder = Path(folder)
    matches = [(entry, _TEMP_NAME.match(entry.name)) for entry in folder.iterdir()] if folder.is_dir() else []
    return [(entry, int(m["pid"])) for entry, m in matches if m and _pid_alive(int(m["pid"]))]


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temps that killed writes left in `folder` (of any name); a folder moved aside by a swap that
    was killed before the new one took its place is put back instead. Returns what was removed."""
    folder = Path(folder)
    stale = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = _TEMP_NAME.match(entry.name)
        if not match or int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"])):
            continue
        try:  # (another process may be sweeping the same folder)
            if match["displaced"] and not os.path.lexists(folder / match["name"]):
                os.replace(entry, folder / match["name"])
                log.warning("Put %s back: a write that replaced it was killed before the new one took its place",
                            folder / match["name"])
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except FileNotFoundError:
            continue
        stale.append(entry)
    for entry in stale:
        log.info("Removed %s, left by an interrupted write", entry)
    _swept.add(folder.resolve())
    return stale


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{HOST}."


def prepare_folder(folder: str | os.PathLike) -> Path:
    """Make `folder` if needed and remove the stale temps in it, the first time this process writes there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() not in _swept:
        remove_stale_temps(folder)
    return folder


def new_temp(path: str | os.PathLike, folder: bool = False) -> Path:
    """A new temp file (or folder) beside `path`, named as its own (process and host included), with the
    permissions open() (or mkdir) would give it."""
    path = Path(path)
    prepare_folder(path.parent)
    if folder:
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp gives 0700
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
        os.close(fd)
    return Path(tmp)


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would change it for every thread for a moment)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def move_into_place(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished file or folder `new` onto `path`. A file replaces a file in one rename; a folder in
    the place of a folder is first moved aside (a temp a killed swap leaves is restored or removed by the next write),
    and removed once the new one is in."""
    new, path = Path(new), Path(path)
    if not new.is_dir() or new.is_symlink():
        os.chmod(new, 0o666 & ~_umask())  # mkstemp gives 0600; a symlink (a test's /dev/full) is never reached
        os.replace(new, path)
        return
    if not os.path.lexists(path):
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=DISPLACED + TEMP_SUFFIX))
    os.replace(path, aside)  # (a folder onto an empty folder: one rename)
    os.replace(new, path)
    shutil.rmtree(aside)


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_errno(err: BaseException, written: Path | None = None) -> int | None:
    """The errno of a failed write, when it is one a user can fix (WRITE_ERRORS): an OSError's own, the "os error
    N" of a library that wraps it (safetensors), or, for a writer that only says "file write failed" or gives
    a short count (torch, numpy), the error a one-byte write at the end of `written` gets now."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code is None and written is not None and isinstance(err, (OSError, RuntimeError)) and written.is_file():
        try:
            fd = os.open(written, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
        except OSError as probe:
            code = probe.errno
    return code if code in WRITE_ERRORS else None


class WriteError(OSError):
    """A write that failed for a reason the user can fix (a full disk, a quota, a size limit, an I/O error): the
    message names the file being written and the reason."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class DiskFullError(WriteError):
    """No space left on a device while writing a file (the message names both)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


def write_error(err: BaseException, path: Path, written: Path | None = None) -> WriteError | None:
    """`err` as a WriteError naming `path`, when it is a write error a user can fix (see write_errno); else None."""
    code = write_errno(err, written)
    if code is None and "No space left on device" in str(err):
        code = errno.ENOSPC
    if code is None and isinstance(err, (OSError, RuntimeError)):  # a torch writer's bare "file write failed"
        try:
            code = errno.ENOSPC if shutil.disk_usage(path.parent).free < 1 << 20 else None
        except OSError:
            pass
    if code == errno.ENOSPC:
        return DiskFullError(f"no space left on {mount_point(path.parent)} while writing {path}")
    return WriteError(code, f"could not write {path}: {WRITE_ERRORS[code]}") if code is not None else None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False, folder: bool = False) -> Iterator[str]:
    """Yield a temp path beside `path` (an empty folder with folder=True); on success it is moved onto `path`
    (move_into_place), on failure removed, so `path` is either the old or the whole new output.

    An existing `path` is refused unless force=True, and is never touched if writing fails. A write error the user
    can fix (a full disk, a quota, a size limit, an I/O error) is raised as WriteError naming `path`; the temps of
    killed earlier writes into the same folder are removed.
    """
    path = Path(path)
    prepare_folder(path.parent)  # first: a folder a killed swap moved aside is back before `path` is checked
    if path.is_dir() and not folder:
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not path.is_dir() and folder:
        raise NotADirectoryError(f"{path} is a file; give the path of a folder to write")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    tmp = new_temp(path, folder)
    try:
        try:
            yield str(tmp)
        except Exception as err:
            translated = write_error(err, path, None if folder else tmp)
            if translated is not None:
                raise translated from err
            raise
        move_into_place(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = True) -> Path:
    """A file written through a temp file renamed into place (see atomic_output)."""
    with atomic_output(path, force) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, force: bool = True) -> Path:
    """A UTF-8 text file written through a temp file renamed into place (see atomic_output)."""
    return write_bytes(path, text.encode("utf-8"), force)


# Where a PyTorch checkpoint records strings besides its tensors (a safetensors file: its header's metadata): a
# top-level key beside "state_dict", as Lightning checkpoints hold their other state.
METADATA = "metadata"


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, force: bool = False,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write .safetensors or .ckpt/.pth by extension, through a temp file renamed into place. `metadata` (strings,
    read back by read_metadata) goes into a safetensors file's header, or a PyTorch file's METADATA beside its
    "state_dict"."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_output(path, force) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        else:
            save_torch({"state_dict": tensors, METADATA: dict(metadata)} if metadata else tensors, tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The strings a checkpoint file records besides its tensors (save_state_dict's `metadata`, a Lightning
    checkpoint's METADATA): a safetensors header's metadata, a PyTorch file's METADATA; {} when it records none."""
    path = Path(path)
    if not path.is_file():
        return {}
    kind = sniff(path)
    if kind == SAFETENSORS:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    if kind not in (TORCH_ZIP, PICKLE):
        return {}
    found = read_checkpoint(path, mmap=True)  # its tensors mapped, not read
    recorded = found.get(METADATA) if isinstance(found, dict) else None
    if not isinstance(recorded, dict):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(k, str) and isinstance(v, str)}


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """torch.save through a Python file object, so that a full disk raises OSError(ENOSPC), not a bare
    "file write failed"."""
    with open(path, "wb") as f:
        torch.save(obj, f)

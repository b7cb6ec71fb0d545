"""Model loading for the apps: the served model from --config, --base and --ckpt (or random weights), the control
files a unit may choose, and the detectors, each built on first use. Start-up mistakes raise UserError (the command
line prints one line); a request's mistakes raise a message for the page."""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from cldm import loader
from cldm.cli import CLI_ERRORS, error_lines
from cldm.control import ControlNetwork
from cldm.model import create_model
from gradio_apps.messages import user_error
from gradio_apps.parameters import model_hash
from ldm.checkpoint import UserError
from ldm.modules.attention import set_attention_slicing

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CONTROLNET_URL = "https://huggingface.co/lllyasviel/ControlNet/tree/main/models"
CONTROLNET_V11_URL = "https://huggingface.co/lllyasviel/ControlNet-v1-1/tree/main"
SD15_URL = "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (v1-5-pruned.ckpt)"
CONTROL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")
OWN = ""  # a unit's control-file choice meaning the loaded model's own control network (--ckpt)
MAX_LOADED = 3  # control files kept loaded: one per unit
LOW_VRAM_SLICE = 1024  # queries per attention slice under --low-vram, as the original's sliced attention
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelFiles:
    """The files the served model comes from, as the command line names them."""

    config: Path
    checkpoint: Path  # --ckpt: a full ControlNet checkpoint, or a control-only one with `base`
    base: Path | None = None
    random_weights: bool = False  # neither file is read

    def name(self) -> str | None:
        """The model as A1111 names it in an image's parameters: the base checkpoint's file name without suffix."""
        return None if self.random_weights else (self.base or self.checkpoint).stem

    def own_control(self) -> Path | None:
        """The file of the model's own control network (None: random weights)."""
        return None if self.random_weights else self.checkpoint


class Detectors:
    """Detectors built on first use, one per class: an app starts without their weight files."""

    def __init__(self, device: str | torch.device = "cpu", random_init: bool = False) -> None:
        self.device = torch.device(device)
        self.random_init = random_init
        self._built: dict[Callable[..., Any], Any] = {}
        self._lock = threading.Lock()

    def get(self, factory: Callable[..., Any]) -> Any:
        with self._lock:
            if factory not in self._built:
                try:
                    self._built[factory] = factory(device=self.device, random_init=self.random_init)
                except (FileNotFoundError, RuntimeError) as err:  # missing, unsafe or mismatched weights
                    raise user_error(str(err), "Cannot load the detector", duration=None) from err
            return self._built[factory]


class ControlFiles:
    """The control files a unit may choose: those under `folder` (searched anew for each request, so files put
    there later count), each loaded on first use as a network on the model; the last MAX_LOADED stay loaded.
    `own`: the file of the model's own network (None: random weights), for its label and parameters."""

    def __init__(self, folder: str | Path | None, model: torch.nn.Module, config_path: str | Path,
                 own: Path | None = None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.model = model
        self.config_path = config_path
        self.own = own
        self._loaded: OrderedDict[tuple[str, int], ControlNetwork] = OrderedDict()
        self._lock = threading.Lock()

    def shown_folder(self) -> str:
        """The folder as the page names it: relative to the working directory when inside it."""
        if self.folder is None:
            return "(none)"
        try:
            return str(self.folder.resolve().relative_to(Path.cwd())) + "/"
        except ValueError:
            return str(self.folder)

    def own_label(self) -> str:
        """How the units' file choice names the loaded model's own control network."""
        return "the model's own (random weights)" if self.own is None else f"the model's own: {self.own.name} (--ckpt)"

    def names(self) -> list[str]:
        """Paths relative to the folder of the files with a checkpoint's suffix."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                      if p.suffix in CONTROL_FILE_SUFFIXES and p.is_file())

    def choices(self) -> list[tuple[str, str]]:
        return [(self.own_label(), OWN), *((name, name) for name in self.names())]

    def model_name(self, choice: str) -> str:
        """The choice as the A1111 extension names a control model in parameters: `stem [hash]`."""
        path = self.own if choice == OWN else self.folder / choice
        return "random weights" if path is None else f"{path.stem} [{model_hash(path)}]"

    def control_types(self, choice: str) -> tuple[str, ...]:
        """The control types a unit of this choice names (a ControlNet-Union's; () for other kinds), for the page:
        a file that cannot be loaded shows none here, and its unit's request says why."""
        if choice == OWN:
            return self.model.control_model.control_types()
        try:
            return self.network(choice, 0).control_types()
        except gr.Error:
            return ()

    def network(self, name: str, unit: int) -> ControlNetwork:
        """The network of the file `name` (a name of names(), nothing else: a request never opens other paths)."""
        if name not in self.names():
            raise user_error(f"Unit {unit}: no control file {name!r} in the control folder.", "Unknown control file")
        path = self.folder / name
        key = (name, path.stat().st_mtime_ns)
        with self._lock:
            if key not in self._loaded:
                try:
                    net = loader.load_control_network(path, self.model, self.config_path)
                except CLI_ERRORS as err:  # unreadable, no control weights, not fitting: say which and why
                    message = " ".join(error_lines(err)).removeprefix("error: ").replace(str(path), name)
                    raise user_error(message, f"Unit {unit}: cannot use the control file") from err
                self._loaded[key] = net
                while len(self._loaded) > MAX_LOADED:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]


def require_checkpoint(path: Path) -> None:
    if path.is_file():
        return
    source = CONTROLNET_V11_URL if path.name.startswith("control_v11") else CONTROLNET_URL
    raise UserError(f"ControlNet checkpoint not found: {path}",
                    f"download {path.name} from {source} and put it at {path} (or give its path with --ckpt); "
                    f"ControlNet 1.1 files (control_v11*.pth, from {CONTROLNET_V11_URL}) hold only the control "
                    "model: give them with --ckpt together with --base <a Stable Diffusion 1.5 checkpoint>")


def load_model(files: ModelFiles, device: torch.device) -> torch.nn.Module:
    """The ControlLDM of files.config with its base and control files (or random weights) through the one model
    loader, in eval mode on `device`; a missing, unreadable or unfitting file raises UserError naming it."""
    if not files.config.is_file():
        raise UserError(f"Model config not found: {files.config}", f"the configs ship with this repository in {MODELS}")
    if files.random_weights:
        log.warning("--random-weights: model and detectors have random weights; for tests and demos only.")
        return create_model(files.config).to(device).eval()
    require_checkpoint(files.checkpoint)
    if files.base is not None and not files.base.is_file():
        raise UserError(f"Base checkpoint not found: {files.base}",
                        f"download a Stable Diffusion 1.5 checkpoint, e.g. {SD15_URL}, and give its path to --base")
    # a base checkpoint fills the UNet, VAE and text encoder; the control file (of the config's mode, in any of its
    # layouts) then the control network
    try:
        model, _ = loader.load_model(files.config, [files.base, files.checkpoint] if files.base else [files.checkpoint])
    except loader.MissingWeightsError as err:
        raise UserError(str(err), err.advice if files.base else "a control-only file (e.g. ControlNet 1.1's) also "
                                                               "needs --base <a Stable Diffusion checkpoint>") from err
    return model.to(device).eval()


def speed_up(model: torch.nn.Module, precision: str, compile_mode: str | None, low_vram: bool = False) -> None:
    """--precision, --compile and --low-vram's sliced attention: the denoiser's weight dtype, torch.compile (lazy:
    at the first image), and attention in slices of LOW_VRAM_SLICE queries."""
    model.set_denoiser_dtype(PRECISIONS[precision])
    set_attention_slicing(model, LOW_VRAM_SLICE if low_vram else None)
    if compile_mode:
        model.compile_denoiser(mode=compile_mode)

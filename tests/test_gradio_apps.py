"""The Gradio apps: every app builds on a tiny random model with the original's controls; the canny app,
served on 127.0.0.1 by its script, answers `process` through gradio_client with the detected map plus N
images and answers bad inputs with a message while it keeps serving; headless Chromium renders its page;
a missing checkpoint or detector weight file gives a message that says where to get it."""

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from annotator.hed import HEDdetector
from annotator.util import CKPTS_ENV, HWC3, resize_image
from cldm.control import ControlUnit
from cldm.pipeline import sample
from conftest import randomize_zero_convs
from gradio_apps import app_builder
from gradio_apps.app_builder import A_PROMPT, N_PROMPT, Detectors, Pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "models" / "cldm_tiny.yaml"
CONTROL_APPS = ["canny2image", "hough2image", "hed2image", "scribble2image", "scribble2image_interactive",
                "fake_scribble2image", "pose2image", "seg2image", "depth2image", "normal2image"]
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def picture(h: int, w: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    """Shapes on a gradient: edges for Canny to find."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(40, 200, w, dtype=np.uint8)[None, :, None]
    for _ in range(4):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, (cx, cy), max(1, min(h, w) // 4), color, -1)
    if channels is None:
        return img[:, :, 0]
    if channels == 4:
        return np.dstack([img, np.full((h, w), 255, np.uint8)])
    return img


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def component(demo: gr.Blocks, label: str) -> dict:
    """Props of the one component of `demo` with this label."""
    found = [c["props"] for c in demo.config["components"] if c.get("props", {}).get("label") == label]
    assert len(found) == 1, f"{label!r}: {len(found)} components"
    return found[0]


def test_every_app_builds_with_the_original_controls(tiny_model):
    detectors = Detectors("cpu", random_init=True)
    for name in CONTROL_APPS:
        app = importlib.import_module(f"gradio_apps.gradio_{name}").APP
        demo = app_builder.build_demo(app, Pipeline(app, tiny_model, detectors))
        assert "process" in [fn.api_name for fn in demo.fns.values()], name
    tabs = importlib.import_module("gradio_apps.gradio_annotator").TABS
    annotator = app_builder.build_annotator_demo(tabs, detectors)
    names = {fn.api_name for fn in annotator.fns.values()}
    assert {"canny", "hed", "mlsd", "midas", "openpose", "uniformer"} <= names

    canny = importlib.import_module("gradio_apps.gradio_canny2image").APP
    demo = app_builder.build_demo(canny, Pipeline(canny, tiny_model, detectors))
    expected = {"Images": (1, 12, 1), "Control Strength": (0, 2, 1), "Steps": (1, 100, 20),
                "Guidance Scale": (0.1, 30, 9), "Canny low threshold": (1, 255, 100),
                "Canny high threshold": (1, 255, 200)}
    for label, (lo, hi, value) in expected.items():
        props = component(demo, label)
        assert (props["minimum"], props["maximum"], props["value"]) == (lo, hi, value), label
    assert (component(demo, "Seed")["minimum"], component(demo, "Seed")["maximum"]) == (-1, 2147483647)
    assert component(demo, "Added Prompt")["value"] == A_PROMPT
    assert component(demo, "Negative Prompt")["value"] == N_PROMPT
    assert component(demo, "Guess Mode")["value"] is False
    # resolution 256-768 (default 512) for SD1.x, from the model's training size; 64 for the tiny model
    assert app_builder.resolution_range(SimpleNamespace(image_size=64, vae_scale_factor=8)) == (256, 768, 512)
    assert app_builder.resolution_range(tiny_model)[:1] == (64,)


def test_pipeline_guess_mode_is_a_control_unit_and_leaves_the_model_alone(tiny_model):
    randomize_zero_convs(tiny_model)
    app = importlib.import_module("gradio_apps.gradio_canny2image").APP
    pipeline = Pipeline(app, tiny_model, Detectors("cpu", random_init=True))
    before = list(tiny_model.control_scales)
    images = {}
    for guess in (True, False):
        out = pipeline.process(picture(70, 40), "a house", A_PROMPT, N_PROMPT, 2, 64, 2, guess, 0.5, 9.0, 3, 0.0,
                               low_threshold=100, high_threshold=200)
        assert [o.shape for o in out] == [(128, 64, 3)] * 3 and all(o.dtype == np.uint8 for o in out)
        images[guess] = np.stack(out[1:])
    assert tiny_model.control_scales == before  # no request changes the model
    hint, _ = pipeline.make_hint(picture(70, 40), 64, low_threshold=100, high_threshold=200)
    hint = torch.from_numpy(hint).float().permute(2, 0, 1)[None] / 255.0
    guess = ControlUnit(tiny_model.control_model, hint, strength=0.5, mode="control")
    expected = sample(tiny_model, f"a house, {A_PROMPT}", N_PROMPT, units=[guess], steps=2, cfg_scale=9.0, seed=3,
                      num_images=2)
    assert np.array_equal(images[True], expected.images)
    assert not np.array_equal(images[True], images[False])


def test_precision_and_compile_options(tiny_model):
    randomize_zero_convs(tiny_model)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900])
    cond = {"c_concat": [torch.rand(2, 3, 64, 64, generator=gen)],
            "c_crossattn": [tiny_model.get_learned_conditioning(["a house", "a tree"])]}
    with torch.no_grad():
        eps32 = tiny_model.apply_model(x, t, cond)
        app_builder.speed_up(tiny_model, "bf16", None)
        eps16 = tiny_model.apply_model(x, t, cond)
    assert {p.dtype for p in tiny_model.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_model.control_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_model.first_stage_model.parameters()} == {torch.float32}
    assert eps16.dtype == torch.float32 and (eps16 - eps32).abs().max() < 0.05 * eps32.abs().max()
    app = importlib.import_module("gradio_apps.gradio_canny2image").APP
    out = Pipeline(app, tiny_model, Detectors("cpu", random_init=True)).process(
        picture(64, 64), "a house", A_PROMPT, N_PROMPT, 1, 64, 2, False, 1.0, 9.0, 3, 0.0,
        low_threshold=100, high_threshold=200)
    assert [o.shape for o in out] == [(64, 64, 3)] * 2
    app_builder.speed_up(tiny_model, "fp32", "reduce-overhead")  # lazy: compiles at the first image
    assert tiny_model.model.diffusion_model._compiled_call_impl is not None
    assert tiny_model.control_model._compiled_call_impl is not None


def test_missing_detector_weights_is_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    with pytest.raises(gr.Error, match="ControlNetHED.pth"):
        Detectors("cpu").get(HEDdetector)


def test_missing_checkpoint_exits_1_with_where_to_get_it(tmp_path):
    ckpt = tmp_path / "control_sd15_canny.pth"
    run = subprocess.run([sys.executable, "gradio_apps/gradio_canny2image.py", "--ckpt", str(ckpt),
                          "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert f"error: ControlNet checkpoint not found: {ckpt}\n" in run.stderr
    assert "huggingface.co/lllyasviel/ControlNet" in run.stderr
    assert "Traceback" not in run.stderr


def test_base_checkpoint_plus_control_only_file(tiny_model, tmp_path, capsys):
    state = tiny_model.state_dict()
    base = {k: v for k, v in state.items() if not k.startswith("control_model.")}
    control = {k: v for k, v in state.items() if k.startswith("control_model.")}
    torch.save(base, tmp_path / "base.ckpt")
    torch.save(control, tmp_path / "control_v11p_sd15_canny.pth")
    args = SimpleNamespace(config=str(TINY_CONFIG), ckpt=str(tmp_path / "control_v11p_sd15_canny.pth"),
                           base=str(tmp_path / "base.ckpt"), random_weights=False)
    cpu = torch.device("cpu")
    loaded = app_builder.load_model(args, "control_sd15_canny.pth", cpu).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # the control-only file alone leaves the UNet, VAE and text encoder empty: refused, with the way out
    with pytest.raises(SystemExit) as exit_info:
        app_builder.load_model(SimpleNamespace(**{**vars(args), "base": None}), "control_sd15_canny.pth", cpu)
    assert exit_info.value.code == 1
    assert "--base" in capsys.readouterr().err


@pytest.fixture(scope="module")
def canny_url(tmp_path_factory):
    """The canny app script serving a tiny random model on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("canny_app") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "gradio_apps/gradio_canny2image.py", "--random-weights",
             "--config", str(TINY_CONFIG), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with code {server.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer in time:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="module")
def client(canny_url, tmp_path_factory):
    return Client(canny_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def run_process(client: Client, image: Path | None, num_samples: int = 2) -> list[np.ndarray]:
    out = client.predict(None if image is None else handle_file(image), "a house", num_samples=num_samples,
                         image_resolution=64, ddim_steps=2, seed=12345, low_threshold=100, high_threshold=200,
                         api_name="/process")
    return [np.array(Image.open(item["image"])) for item in out]


def test_process_returns_detected_map_and_samples(client, tmp_path):
    img = picture(60, 100)
    maps = run_process(client, write_png(tmp_path / "in.png", img), num_samples=2)
    assert len(maps) == 1 + 2
    assert all(m.shape[:2] == (64, 128) for m in maps)  # short side 64, long side rounded to 64
    expected = 255 - HWC3(cv2.Canny(resize_image(img, 64), 100, 200))
    np.testing.assert_array_equal(HWC3(maps[0]), expected)


def test_bad_inputs_give_messages_and_the_server_keeps_answering(client, tmp_path):
    with pytest.raises(AppError, match="Upload an input image"):
        run_process(client, None)
    (tmp_path / "notes.txt").write_text("not a picture\n")
    with pytest.raises(AppError, match="Could not read notes.txt as an image"):
        run_process(client, tmp_path / "notes.txt")
    with pytest.raises(AppError, match="sides may differ at most"):
        run_process(client, write_png(tmp_path / "strip.png", picture(10, 200)))

    def sizes(name: str, image: np.ndarray) -> list[tuple[int, int]]:
        return [m.shape[:2] for m in run_process(client, write_png(tmp_path / name, image), num_samples=1)]

    # converted or resized, not refused: grayscale, RGBA, a single pixel, and 5000x5000
    assert sizes("gray.png", picture(60, 100, None)) == [(64, 128)] * 2
    assert sizes("rgba.png", picture(60, 100, 4)) == [(64, 128)] * 2
    assert sizes("pixel.png", picture(1, 1)) == [(64, 64)] * 2
    assert sizes("big.png", picture(5000, 5000)) == [(64, 64)] * 2
    assert sizes("again.png", picture(64, 64)) == [(64, 64)] * 2


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_headless_chromium_renders_the_app(canny_url, tmp_path):
    shot = tmp_path / "canny_app.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1280,900", "--virtual-time-budget=10000", canny_url],
        capture_output=True, timeout=90, check=True)
    page = cv2.imread(str(shot))
    assert page is not None and page.shape == (900, 1280, 3)
    # a rendered Gradio page: text, borders and the orange Run button, not a blank or single-colour page
    assert len(np.unique(page.reshape(-1, 3), axis=0)) > 50
    assert (page.min(axis=2) < 200).mean() > 0.01
    orange = (page[:, :, 2] > 200) & (page[:, :, 1] > 80) & (page[:, :, 1] < 150) & (page[:, :, 0] < 80)
    assert orange.sum() > 2000

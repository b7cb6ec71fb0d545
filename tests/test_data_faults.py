"""Readers and writers under faults: paths that leave the data root, decompression bombs, broken symlinks, killed
and concurrent writers, permissions and write errors other than a full disk."""
import errno
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import tool_cache_latents
from cldm.cli import run_tool
from cldm.data import ShardDataset, open_dataset
from cldm.data.loading import SkippedSamples
from cldm.model import CONTROL_PREFIX, create_model, save_state_dict
from conftest import ROOT, dead_pid
from ldm.checkpoint import HOST
from tool_make_dataset import main as make_dataset
from tool_make_fill50k import make_fill50k
from tutorial_train import main as train

TINY = str(ROOT / "models" / "cldm_tiny.yaml")

PIXELS = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)


def write_png(path, image=PIXELS):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def outside_parquet(tmp_path):
    """A parquet data set whose image column names a file outside its folder (relative with `..`, absolute)."""
    import datasets
    secret = write_png(tmp_path / "outside" / "secret.png")
    root = tmp_path / "set"
    write_png(root / "0.png")
    write_png(root / "hints" / "0.png")
    rows = {"image": ["0.png", "../outside/secret.png", str(secret)],
            "conditioning_image": ["hints/0.png"] * 3, "text": ["inside", "up and out", "absolute"]}
    root.mkdir(exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root


def test_hf_paths_leaving_the_root_are_refused_unless_allowed(outside_parquet, tmp_path, caplog):
    with pytest.raises(ValueError, match=rf"^{outside_parquet} row 1 column 'image': '../outside/secret.png' points "
                                         rf"outside the data root {outside_parquet}; pass --allow_outside_root"):
        open_dataset(outside_parquet, cache_dir=str(tmp_path / "cache"))
    reader = open_dataset(outside_parquet, allow_outside_root=True, cache_dir=str(tmp_path / "cache"))
    assert "2 image paths outside it are read" in caplog.text
    np.testing.assert_array_equal(reader[2]["jpg"], reader[0]["jpg"])


def test_imagefolder_metadata_leaving_the_root_is_one_line_naming_the_file_and_path(tmp_path):
    write_png(tmp_path / "outside" / "secret.png")
    root = tmp_path / "set"
    write_png(root / "hints" / "0.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "../outside/secret.png", "text": "x",
                                                     "conditioning_image_file_name": "hints/0.png"}) + "\n")
    with pytest.raises(ValueError) as refused:
        open_dataset(root, cache_dir=str(tmp_path / "cache"))
    message = str(refused.value)
    assert message.startswith(f"{root / 'metadata.jsonl'}: ") and "'../outside/secret.png'" in message
    assert "\n" not in message


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with no pixels behind it (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def photos(tmp_path):
    """Four captioned images, a decompression bomb, a symlink loop and a dangling symlink named like images."""
    root = tmp_path / "photos"
    for i in range(4):
        write_png(root / f"{i}.png", np.roll(np.repeat(PIXELS, 3, axis=0).repeat(3, axis=1), i * 7, axis=0))
        (root / f"{i}.txt").write_text(f"photo {i}")
    (root / "bomb.png").write_bytes(png_header(50000, 50000))
    (root / "bomb.txt").write_text("a bomb")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    os.symlink("gone.png", root / "dangling.png")
    return root


def test_bombs_and_broken_symlinks_are_skipped_and_listed(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the test's option changes it back
    out = tmp_path / "set"
    argv = [str(photos), "--out", str(out), "--detector", "canny", "--detect_resolution", "64", "--min_size", "32"]
    make_dataset(argv + ["--workers", "2"])  # the bomb reaches a DataLoader worker first
    report = json.loads((out / "report.json").read_text())
    reasons = {Path(item["file"]).name: item["reason"] for item in report["skipped"]}
    assert report["images"] == 8 and report["made"] == 4
    assert reasons["bomb.png"] == (f"{photos / 'bomb.png'} claims 2,500,000,000 pixels, over the limit of 89,478,485 "
                                   "(a decompression bomb?); if the image is real, raise the limit with "
                                   "--max_image_pixels")
    assert reasons["loop_a.png"] == f"{photos / 'loop_a.png'} is a symlink loop" and "loop_b.png" in reasons
    assert reasons["dangling.png"] == f"{photos / 'dangling.png'} is a dangling symlink to gone.png"

    make_dataset(argv + ["--workers", "0", "--max_image_pixels", str(3 * 10**9)])
    reasons = {Path(item["file"]).name: item["reason"]
               for item in json.loads((out / "report.json").read_text())["skipped"]}
    assert "decompression bomb" not in reasons["bomb.png"]  # read now; this one is only a header


def test_a_bomb_in_a_kohya_folder_is_skipped_in_training(photos, tmp_path):
    hints = tmp_path / "hints"
    hints.mkdir()
    for image in [*photos.glob("[0-9].png"), photos / "bomb.png"]:
        shutil.copy(image, hints / image.name)
    for link in ("loop_a.png", "loop_b.png", "dangling.png"):
        (photos / link).unlink()
    trainer = train(["--config", TINY, "--resume_path", "none", "--sd_locked", "False", "--data_root", str(photos),
                     "--conditioning_data_dir", str(hints), "--skip_bad_samples", "--resolution", "32",
                     "--batch_size", "5", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                     "--sample_steps", "1", "--logger_freq", "1000", "--accelerator", "cpu", "--devices", "1"])
    skipped = next(c for c in trainer.callbacks if isinstance(c, SkippedSamples))
    assert trainer.global_step == 1 and skipped.total == 1


def test_tutorial_train_applies_the_readers_guard_options(outside_parquet, tmp_path, monkeypatch):
    """--require_captions, --max_image_pixels and --allow_outside_root given to tutorial_train reach its reader."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # --max_image_pixels changes it
    root = tmp_path / "kohya"
    for i in range(4):
        side = 64 if i == 3 else 32  # 4,096 pixels against 1,024
        for folder in ("images", "hints"):
            write_png(root / folder / f"{i}.png", cv2.resize(PIXELS, (side, side)))
        if i:
            (root / "images" / f"{i}.txt").write_text(f"photo {i}")
    run = ["--config", TINY, "--resume_path", "none", "--sd_locked", "False", "--resolution", "32", "--max_steps", "1",
           "--sample_steps", "1", "--logger_freq", "1000", "--accelerator", "cpu", "--devices", "1"]
    kohya = ["--data_root", str(root / "images"), "--conditioning_data_dir", str(root / "hints")]
    with pytest.raises(ValueError, match=r"images/0\.png has no caption file"):
        train([*run, *kohya, "--require_captions", "--output_dir", str(tmp_path / "captions")])
    trainer = train([*run, *kohya, "--batch_size", "4", "--max_image_pixels", "2000", "--skip_bad_samples",
                     "--output_dir", str(tmp_path / "pixels")])
    skipped = next(c for c in trainer.callbacks if isinstance(c, SkippedSamples))
    assert skipped.total == 1  # 3.png, over the limit
    with pytest.raises(ValueError, match="points outside the data root"):
        train([*run, "--data_root", str(outside_parquet), "--batch_size", "3", "--output_dir", str(tmp_path / "hf")])
    trainer = train([*run, "--data_root", str(outside_parquet), "--batch_size", "3", "--allow_outside_root",
                     "--output_dir", str(tmp_path / "hf_allowed")])
    assert trainer.global_step == 1


def test_convert_reads_kohya_folders_and_other_column_names(photos, outside_parquet, tmp_path):
    hints = tmp_path / "hints"
    hints.mkdir()
    for i in range(4):
        shutil.copy(photos / f"{i}.png", hints / f"{i}.png")
    for name in ("bomb.png", "bomb.txt", "loop_a.png", "loop_b.png", "dangling.png"):
        (photos / name).unlink()
    make_dataset(["--convert", str(photos), "--conditioning_data_dir", str(hints), "--format", "shards", "--out",
                  str(tmp_path / "kohya_shards")])
    assert sorted(item["txt"] for item in ShardDataset(tmp_path / "kohya_shards", shuffle=False)) == \
        [f"photo {i}" for i in range(4)]

    import datasets
    table = datasets.load_dataset("parquet", data_files=[str(p) for p in outside_parquet.glob("*.parquet")],
                                  cache_dir=str(tmp_path / "cache"))["train"].select([0])
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    table.rename_columns({"image": "photo", "conditioning_image": "edges", "text": "prompt"}).to_parquet(
        str(renamed / "train-00000-of-00001.parquet"))
    shutil.copytree(outside_parquet / "hints", renamed / "hints")
    shutil.copy(outside_parquet / "0.png", renamed / "0.png")
    make_dataset(["--convert", str(renamed), "--image_column", "photo", "--conditioning_image_column", "edges",
                  "--caption_column", "prompt", "--format", "shards", "--out", str(tmp_path / "hf_shards")])
    assert [item["txt"] for item in ShardDataset(tmp_path / "hf_shards", shuffle=False)] == ["inside"]

    with pytest.raises(ValueError, match="points outside the data root"):  # not copied into shards
        make_dataset(["--convert", str(outside_parquet), "--format", "shards", "--out", str(tmp_path / "secret")])
    assert not (tmp_path / "secret").exists()
    with pytest.raises(SystemExit):  # a reader option without --convert would do nothing
        make_dataset([str(photos), "--out", str(tmp_path / "x"), "--detector", "canny", "--image_column", "photo"])


def limited(size: int):
    """preexec_fn of a process whose files may grow to `size` bytes (`ulimit -f`): writes beyond get EFBIG."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def run_limited(args: list, size: int, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          preexec_fn=limited(size), timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line(run: subprocess.CompletedProcess, written) -> None:
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == \
        f"error: could not write {written}: file too large for the file system or the file size limit (ulimit -f)"


def test_a_file_size_limit_is_one_line_naming_the_output_and_leaves_nothing_partial(photos, tmp_path):
    from test_tools_add_control import sd_checkpoint
    save_state_dict(sd_checkpoint(TINY), tmp_path / "sd.ckpt")
    for out in ("out.safetensors", "out.ckpt"):
        run = run_limited([ROOT / "tool_add_control.py", "sd.ckpt", out, "--config", TINY], 1 << 20, tmp_path)
        assert_one_line(run, out)
    control = {k: v for k, v in create_model(TINY).state_dict().items() if k.startswith(CONTROL_PREFIX)}
    save_state_dict(control, tmp_path / "control.safetensors")
    run = run_limited([ROOT / "tool_convert_diffusers.py", "to-diffusers", "control.safetensors", "diffusers",
                       "--config", TINY], 1 << 20, tmp_path)
    assert_one_line(run, Path("diffusers") / "diffusion_pytorch_model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.safetensors", "photos", "sd.ckpt"]

    for name in ("bomb.png", "loop_a.png", "loop_b.png", "dangling.png"):
        (photos / name).unlink()
    build = [ROOT / "tool_make_dataset.py", "photos", "--detector", "canny", "--workers", "0", "--min_size", "32"]
    run = run_limited([*build, "--out", "set"], 1024, tmp_path)
    assert_one_line(run, Path("set") / "target" / "0.png")
    assert not [p for p in (tmp_path / "set").rglob("*") if p.is_file()]
    make_dataset([str(photos), "--out", str(tmp_path / "shards.work"), "--detector", "canny", "--min_size", "32"])
    run = run_limited([*build, "--out", "shards", "--format", "shards"], 16 << 10, tmp_path)  # a chunk is larger
    assert_one_line(run, "shards")
    assert not (tmp_path / "shards").exists() and not list(tmp_path.glob(".shards.*"))


@pytest.mark.parametrize("code, words", [(errno.EDQUOT, "disk quota exceeded"),
                                         (errno.EIO, "input/output error (a failing disk or a network file system)")])
def test_a_quota_or_io_error_while_saving_a_checkpoint_is_one_line(photos, tmp_path, monkeypatch, capsys, code,
                                                                    words):
    import cldm.training

    def failing(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cldm.training, "save_torch", failing)
    out, data = tmp_path / "run", make_fill50k(tmp_path / "set", n=2, size=32)
    rc = run_tool(train, ["--config", TINY, "--resume_path", "none", "--sd_locked", "False", "--data_root", str(data),
                          "--max_steps", "1",
                          "--batch_size", "2", "--output_dir", str(out), "--logger_freq", "100", "--accelerator",
                          "cpu", "--devices", "1"])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: could not write {out / 'checkpoints' / 'last.ckpt'}: {words}"
    assert list((out / "checkpoints").iterdir()) == []


def test_outputs_get_the_permissions_open_would_give(photos, tmp_path):
    """Under umask 022 a training job of another account can read every output: files 0644, folders 0755
    (mkstemp and mkdtemp, renamed into place, would give 0600 and 0700)."""
    for name in ("bomb.png", "loop_a.png", "loop_b.png", "dangling.png"):
        (photos / name).unlink()
    umask = os.umask(0o022)
    try:
        fill = make_fill50k(tmp_path / "fill", n=2, size=32)
        make_dataset([str(photos), "--out", str(tmp_path / "set"), "--detector", "canny", "--min_size", "32",
                      "--workers", "0"])
        make_dataset(["--convert", str(fill), "--format", "shards", "--out", str(tmp_path / "shards")])
        tool_cache_latents.main(["--config", TINY, "--ckpt", "none", "--data_root", str(fill), "--out",
                                 str(tmp_path / "cache")])
    finally:
        os.umask(umask)
    outputs = [tmp_path / name for name in ("fill", "set", "shards", "cache")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for out in outputs for p in [out, *out.rglob("*")]}
    assert {p: m for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)} == {}
    assert {"prompt.json", "report.json", "index.json", "meta.json"} <= {p.name for p in modes}


def test_a_killed_shard_writers_temps_go_with_the_next_run(photos, tmp_path):
    """A kill -9 in the middle of writing shards, or of swapping them in, leaves temps that the next run removes
    (or puts back, for shards moved aside and not yet replaced); a live run's are left alone."""
    fill = make_fill50k(tmp_path / "fill", n=2, size=32)
    convert = ["--convert", str(fill), "--format", "shards", "--out", str(tmp_path / "shards")]
    make_dataset(convert)
    dead, alive = f"{dead_pid()}-{HOST}", f"{os.getppid()}-{HOST}"
    for name in (f".shards.{dead}.abcd1234.tmp", f".shards.{dead}.efgh5678.old.tmp", f".shards.{alive}.ijkl9012.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "chunk-0-0.bin").write_bytes(b"a shard")
    rerun = subprocess.run([sys.executable, ROOT / "tool_make_dataset.py", *convert, "--force"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fill", "photos", "shards", f".shards.{alive}"
                                                                                                 ".ijkl9012.tmp"])
    assert len(ShardDataset(tmp_path / "shards")) == 2


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dataloader_workers_die_with_a_killed_tool(tmp_path):
    """kill -9 of tool_make_dataset while its workers hold decoded images larger than a pipe holds: without the
    parent-death signal they stay, blocked writing to a pipe nobody reads, each holding its memory."""
    root = tmp_path / "large"
    gradient = np.linspace(0, 255, 1536, dtype=np.uint8)
    for i in range(12):
        write_png(root / f"{i}.png", np.dstack([np.add.outer(gradient, gradient * 0) + i] * 3))
        (root / f"{i}.txt").write_text("large")
    tool = subprocess.Popen([sys.executable, ROOT / "tool_make_dataset.py", root, "--out", tmp_path / "set",
                             "--detector", "canny", "--workers", "2"], cwd=tmp_path, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(children(tool.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = children(tool.pid)
    assert len(workers) >= 2, "the tool's workers never started"
    time.sleep(3)  # they decode and queue their images
    tool.kill()
    tool.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [w for w in workers if alive(w)]
    for worker in survivors:
        os.kill(worker, signal.SIGKILL)
    assert survivors == []

"""Readers and writers under faults: paths that leave the data root, decompression bombs, broken symlinks, killed
and concurrent writers, permissions and write errors other than a full disk."""
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cldm.data import ShardDataset, open_dataset
from cldm.data.loading import SkippedSamples
from conftest import ROOT
from tool_make_dataset import main as make_dataset
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

"""tool_make_dataset.py: an image folder -> a training set with annotator hints; resumable, bad files listed,
the source folder untouched, and the output trains (Fill50K layout and shards)."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from annotator.canny import CannyDetector
from annotator.hints import HINTS
from cldm.cli import run_tool
from cldm.data import Fill50KDataset, ShardDataset
from cldm.data.images import decode
from conftest import ROOT
from tool_make_dataset import main

N = 200


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N images of odd sizes, modes and formats in nested folders with .txt captions; one corrupt, one tiny."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:160, :160]
    for i in range(N):
        h, w = int(rng.integers(64, 120)), int(rng.integers(64, 160))
        cx, cy, r = rng.integers(20, 60), rng.integers(20, 60), rng.integers(10, 30)
        image = np.where(((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[:h, :w, None], rng.integers(0, 256, 3),
                         rng.integers(0, 256, 3)).astype(np.uint8)
        folder = root / f"part{i % 3}"
        folder.mkdir(exist_ok=True)
        kind = i % 4
        if kind == 0:
            Image.fromarray(image).save(folder / f"{i}.jpg", quality=95)
        elif kind == 1:
            Image.fromarray(image[:, :, 0]).save(folder / f"{i}.png")
        elif kind == 2:
            rgba = np.dstack([image, np.full((h, w), 255, np.uint8)])
            Image.fromarray(rgba).save(folder / f"{i}.webp", lossless=True)
        else:
            Image.fromarray(image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo {i}\n")
    (root / "part0" / "0.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "part1" / "1.png")
    return root


def test_builds_resumes_lists_bad_files_and_trains(photos, tmp_path, capsys):
    before = digest(photos)
    out = tmp_path / "canny"
    argv = [str(photos), "--out", str(out), "--detector", "canny", "--detect_resolution", "128", "--workers", "0",
            "--low_threshold", "50"]
    main(argv)
    assert "200 images: 198 made, 0 already done, 2 skipped" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    reasons = {item["file"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {str(photos / "part0" / "0.jpg"), str(photos / "part1" / "1.png")}
    assert "not a readable image" in reasons[str(photos / "part0" / "0.jpg")]
    assert "32x32, under --min_size 64" in reasons[str(photos / "part1" / "1.png")]

    dataset = Fill50KDataset(out)
    assert len(dataset) == 198
    line = json.loads((out / "prompt.json").read_text().splitlines()[0])
    image = decode(photos / line["target"].removeprefix("target/"))
    expected = HINTS["canny"].make(CannyDetector(), image, 128, low_threshold=50)
    np.testing.assert_array_equal(decode(out / line["source"]), expected)
    assert line["prompt"] == f"photo {line['target'].split('/')[-1].split('.')[0]}"

    files = digest(out)
    main(argv)  # resumed: nothing left to do
    assert "0 made, 198 already done, 2 skipped" in capsys.readouterr().out
    assert {k: v for k, v in digest(out).items() if k != "report.json"} == \
        {k: v for k, v in files.items() if k != "report.json"}
    assert digest(photos) == before  # the source folder is never modified

    from tutorial_train import main as train
    trainer = train(["--config", str(ROOT / "models" / "cldm_tiny.yaml"), "--resume_path", "none", "--data_root",
                     str(out), "--resolution", "32", "--batch_size", "2", "--max_steps", "2", "--output_dir",
                     str(tmp_path / "run"), "--sample_steps", "1", "--accelerator", "cpu", "--devices", "1",
                     "--sd_locked", "False"])  # a random UNet's zero output layer must train for anything to learn
    assert trainer.global_step == 2


def test_interrupted_build_resumes(photos, tmp_path, monkeypatch):
    import cldm.data.build as build
    out, calls = tmp_path / "part", []
    write = build.write_bytes

    def dying(path, data):
        calls.append(path)
        if len(calls) == 21:  # the 11th image's target: 10 images done
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(build, "write_bytes", dying)
    argv = [str(photos), "--out", str(out), "--detector", "canny", "--detect_resolution", "64", "--workers", "0"]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert len(list((out / "source").rglob("*.png"))) == 10 and not (out / "prompt.json").exists()
    monkeypatch.undo()
    main(argv)
    assert json.loads((out / "report.json").read_text())["done_before"] == 10
    assert len(Fill50KDataset(out)) == 198


def test_network_detector_fixed_prompt_and_shards(photos, tmp_path):
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted((photos / "part2").glob("*.png"))[:6]:
        (subset / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "shards"
    main([str(subset), "--out", str(out), "--detector", "hed", "--random_weights", "--detect_resolution", "64",
          "--prompt", "a photo", "--format", "shards", "--workers", "0"])
    stream = ShardDataset(out, shuffle=False)
    assert len(stream) == 6 and {stream[i]["txt"] for i in range(6)} == {"a photo"}
    assert (tmp_path / "shards.work" / "prompt.json").is_file()


def test_user_errors_are_one_line(photos, tmp_path, capsys):
    for argv, message in (
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--detector", "canny"], "image folder"),
        ([str(photos), "--out", str(photos / "inside"), "--detector", "canny"], "inside the image folder"),
    ):
        assert run_tool(main, argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("error: ")
    with pytest.raises(SystemExit) as exit_info:
        main([str(photos), "--out", str(tmp_path / "o"), "--detector", "hed", "--low_threshold", "3"])
    assert exit_info.value.code == 2
    assert "--low_threshold is an option of canny, not of hed" in capsys.readouterr().err

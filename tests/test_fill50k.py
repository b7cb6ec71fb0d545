"""Fill50K generator (tool_make_fill50k.py) and reader (tutorial_dataset.py) on tiny generated sets."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cldm.data.circles import COLORS, MIN_CONTRAST, make_fill50k, sample_circle
from cldm.data.images import BadSampleError, Resize
from conftest import ROOT, dead_pid
from ldm.checkpoint import HOST
from tutorial_dataset import MyDataset

N, SIZE = 8, 64
RGB = dict(COLORS)
PROMPT = re.compile(r"([a-z ]+) circle with ([a-z ]+) background")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k") / "data", n=N, size=SIZE, seed=0)


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def records(root, name="prompt.json"):
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    reference = all_files(data)
    # A pool of workers must give the very same bytes as one process.
    assert all_files(make_fill50k(tmp_path / "again", N, SIZE, seed=0, workers=2)) == reference
    other = all_files(make_fill50k(tmp_path / "other", N, SIZE, seed=1))
    assert other.keys() == reference.keys()
    assert other["prompt.json"] != reference["prompt.json"]
    assert all(other[k] != reference[k] for k in reference if k.startswith("target/"))


def test_layout_and_json_lines(data):
    assert sorted(p.name for p in data.iterdir()) == ["meta.jsonl", "prompt.json", "source", "target"]
    assert (data / "prompt.json").read_text().endswith("}\n")
    items = records(data)
    assert len(items) == N
    for i, item in enumerate(items):
        assert item == {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": item["prompt"]}
        assert list(item) == ["source", "target", "prompt"]
        fill, background = PROMPT.fullmatch(item["prompt"]).groups()
        assert fill in RGB and background in RGB
        for key in ("source", "target"):
            assert (data / item[key]).is_file()


def test_pixels_match_prompt_and_geometry(data):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i, (item, meta) in enumerate(zip(records(data), records(data, "meta.jsonl"), strict=True)):
        assert meta == {"source": item["source"], **{k: v for k, v in
                        sample_circle(np.random.default_rng([0, i]), SIZE).items() if k != "prompt"}}
        fill, background = (np.array(RGB[name]) for name in PROMPT.fullmatch(item["prompt"]).groups())
        (cx, cy), r, t = meta["center"], meta["radius"], meta["thickness"]
        dist = np.hypot(xx - cx, yy - cy)

        target = read_rgb(data / item["target"])
        assert (target[dist <= r - 1] == fill).all()
        assert (target[dist >= r + 1] == background).all()
        assert {tuple(c) for c in target.reshape(-1, 3)} == {tuple(fill), tuple(background)}

        source = read_rgb(data / item["source"])
        line = source.any(-1)
        assert (source[line] == 255).all()  # a white line on black
        assert np.abs(dist[line] - r).max() <= t / 2 + 1
        for x, y in ((cx - r, cy), (cx + r, cy), (cx, cy - r), (cx, cy + r)):
            assert line[y, x]


@pytest.mark.parametrize("size", [16, 64, 512])
def test_sample_circle_inside_and_contrasting(size):
    for i in range(200):
        c = sample_circle(np.random.default_rng([3, i]), size)
        (cx, cy), r, t = c["center"], c["radius"], c["thickness"]
        assert round(0.1 * size) <= r <= round(0.4 * size)
        assert r + t // 2 <= min(cx, cy) and max(cx, cy) + r + t // 2 <= size - 1
        assert np.linalg.norm(np.subtract(c["color"], c["background"])) >= MIN_CONTRAST
        assert c["prompt"] == f"{c['color_name']} circle with {c['background_name']} background"


def test_dataset_shapes_ranges_and_rgb_order(data):
    dataset = MyDataset(data)
    assert len(dataset) == N
    for item, record, meta in zip(dataset, records(data), records(data, "meta.jsonl"), strict=True):
        assert item["txt"] == record["prompt"]
        for key, low in (("jpg", -1.0), ("hint", 0.0)):
            assert item[key].shape == (SIZE, SIZE, 3) and item[key].dtype == np.float32
            assert item[key].min() >= low and item[key].max() <= 1.0
        cx, cy = meta["center"]
        fill = np.array(RGB[PROMPT.fullmatch(record["prompt"]).group(1)], np.float32)
        np.testing.assert_allclose(item["jpg"][cy, cx], fill / 127.5 - 1.0, atol=1e-6)
    small = MyDataset(data, size=32)[0]
    assert small["jpg"].shape == small["hint"].shape == (32, 32, 3)


def test_dataset_reads_rgb(tmp_path):
    # Pure red on disk (OpenCV writes BGR) must come back as red.
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 2] = 255
    for folder in ("source", "target"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "0.png"), image)
    (tmp_path / "prompt.json").write_text(json.dumps(
        {"source": "source/0.png", "target": "target/0.png", "prompt": "red"}) + "\n")
    item = MyDataset(tmp_path)[0]
    np.testing.assert_array_equal(item["hint"][0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(item["jpg"][0, 0], [1.0, -1.0, -1.0])


def test_dataset_errors_name_the_file(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        MyDataset(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "prompt.json"))):
        MyDataset(tmp_path)

    broken = shutil.copytree(data, tmp_path / "broken")
    lines = (broken / "prompt.json").read_text().splitlines()
    (broken / "target" / "2.png").unlink()
    (broken / "source" / "4.png").write_bytes(b"not a png")
    dataset = MyDataset(broken)
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(broken / 'target' / '2.png'))} not found.*line 3"):
        dataset[2]
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(broken / 'source' / '4.png'))}.*line 5.*not a readab"):
        dataset[4]

    lines[3] = '{"source": "source/3.png",'
    (broken / "prompt.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"prompt\.json, line 4: not valid JSON"):
        MyDataset(broken)


def test_refuses_non_empty_folder_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, str(ROOT / "tool_make_fill50k.py"), "--out", str(out), "--n", "2",
                          "--size", "32"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "--force" in run.stderr and str(out) in run.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    make_fill50k(out, n=2, size=32, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert len(records(out)) == 2


def test_tutorial_dataset_test_script(data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tutorial_dataset_test.py", str(data)])
    runpy.run_path(str(ROOT / "tutorial_dataset_test.py"), run_name="__main__")
    assert capsys.readouterr().out.splitlines() == [
        str(N), records(data)[0]["prompt"], f"({SIZE}, {SIZE}, 3)", f"({SIZE}, {SIZE}, 3)"]


def replace_line(root, line_no, new: bytes):
    lines = (root / "prompt.json").read_bytes().splitlines()
    lines[line_no - 1] = new
    (root / "prompt.json").write_bytes(b"\n".join(lines) + b"\n")


LINE_2 = b'{"source": "source/1.png", "target": "target/1.png", "prompt": %s}'


@pytest.mark.parametrize("line, message", [
    (LINE_2 % b'"caf\xe9"',
     r"line 2: not UTF-8 \(byte 0xe9 at column 68\)"),
    (LINE_2 % b'7', r'line 2: "prompt" must be a string, got a number'),
    (LINE_2 % b'null', r'line 2: "prompt" must be a string, got null'),
    (LINE_2 % b'["a"]', r'line 2: "prompt" must be a string, got a list'),
    (b'{"source": 1, "target": "target/1.png", "prompt": "a"}', r'line 2: "source" must be a string, got a number'),
])
def test_index_errors_name_file_and_line(data, tmp_path, line, message):
    root = shutil.copytree(data, tmp_path / "d")
    replace_line(root, 2, line)
    with pytest.raises(ValueError, match=re.escape(str(root / "prompt.json")) + ", " + message):
        MyDataset(root)


def test_training_names_a_non_utf8_index_in_one_line(data, tmp_path):
    root = shutil.copytree(data, tmp_path / "d")
    replace_line(root, 3, b'{"source": "source/2.png", "target": "target/2.png", "prompt": "\xff"}')
    run = subprocess.run([sys.executable, str(ROOT / "tutorial_train.py"), "--config",
                          str(ROOT / "models" / "cldm_tiny.yaml"), "--resume_path", "none", "--data_root",
                          str(root), "--output_dir", str(tmp_path / "out"),
                          "--accelerator", "cpu", "--max_steps", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == \
        f"error: {root / 'prompt.json'}, line 3: not UTF-8 (byte 0xff at column 65); save the index as UTF-8"
    assert "Traceback" not in run.stderr


def test_size_mismatches_named_with_advice(data, tmp_path):
    root = shutil.copytree(data, tmp_path / "d")
    cv2.imwrite(str(root / "source" / "1.png"), np.zeros((SIZE, SIZE // 2, 3), np.uint8))  # another aspect ratio
    cv2.imwrite(str(root / "source" / "2.png"), np.zeros((SIZE // 2, SIZE // 2, 3), np.uint8))  # same, smaller
    for folder in ("source", "target"):  # a whole sample of another size
        cv2.imwrite(str(root / folder / "3.png"), np.zeros((48, 48, 3), np.uint8))
    dataset = MyDataset(root)
    with pytest.raises(BadSampleError, match=rf"source/1.png \(named on line 2 .*\) is {SIZE // 2}x{SIZE} but its "
                                             rf"target .*target/1.png .* is {SIZE}x{SIZE}"):
        dataset[1]
    assert dataset[2]["hint"].shape == (SIZE, SIZE, 3)  # resized to its target's size
    with pytest.raises(BadSampleError, match=rf"target/3.png \(named on line 4 .*\) is 48x48, but .*target/0.png "
                                             rf".* is {SIZE}x{SIZE}: .*--resolution N"):
        dataset[3]
    assert MyDataset(root, resize=Resize(32))[3]["jpg"].shape == (32, 32, 3)


def test_paths_outside_the_root_need_an_option(data, tmp_path, caplog):
    root = shutil.copytree(data, tmp_path / "d")
    shutil.copy(root / "source" / "0.png", tmp_path / "outside.png")
    replace_line(root, 1, json.dumps({"source": "../outside.png", "target": "target/0.png", "prompt": "p"}).encode())
    replace_line(root, 2, json.dumps({"source": str(tmp_path / "outside.png"), "target": "target/1.png",
                                      "prompt": "p"}).encode())
    with pytest.raises(ValueError, match=r"line 1: source '\.\./outside\.png' points outside the data root .*"
                                         r"--allow_outside_root"):
        MyDataset(root)
    with caplog.at_level("WARNING"):
        dataset = MyDataset(root, allow_outside_root=True)
    assert "2 entries read images outside" in caplog.text
    np.testing.assert_array_equal(dataset[0]["hint"], dataset[1]["hint"])


def test_interrupted_force_leaves_the_old_set(tmp_path, monkeypatch):
    from cldm.data import circles
    out = make_fill50k(tmp_path / "out", n=6, size=32, seed=0)
    (out / "keep.txt").write_text("mine")
    before = all_files(out)
    write_sample = circles._write_sample

    def interrupted(job):
        if job[2] == 3:
            raise KeyboardInterrupt
        return write_sample(job)

    monkeypatch.setattr(circles, "_write_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_fill50k(out, n=6, size=32, seed=1, force=True)
    assert all_files(out) == before  # the old set, whole, and nothing left of the new one

    killed = out / f".fill50k.{dead_pid()}-{HOST}.abcd1234.tmp"  # what a kill -9 would leave behind
    (killed / "source").mkdir(parents=True)
    monkeypatch.undo()
    make_fill50k(out, n=4, size=32, seed=1, force=True)
    after = all_files(out)
    assert after["keep.txt"] == b"mine" and not killed.exists()
    assert sorted(k for k in after if k.startswith("source/")) == [f"source/{i}.png" for i in range(4)]
    assert after == {**all_files(make_fill50k(tmp_path / "fresh", n=4, size=32, seed=1)), "keep.txt": b"mine"}


def test_a_second_run_leaves_a_running_ones_staging_alone(tmp_path):
    """A run still writing into --out (its hidden folder names a live process of this host) is neither deleted
    nor raced: the second run refuses by name, even with --force, and the first one's files stay."""
    out = tmp_path / "out"
    running = out / f".fill50k.{os.getppid()}-{HOST}.abcd1234.tmp"
    (running / "source").mkdir(parents=True)
    (running / "source" / "0.png").write_bytes(b"being written")
    with pytest.raises(FileExistsError, match=rf"another run \(process {os.getppid()}\) is writing a data set into"):
        make_fill50k(out, n=2, size=32, seed=0, force=True)
    assert (running / "source" / "0.png").read_bytes() == b"being written"

"""Streaming shards on several nodes: every sample once per epoch across ranks (two processes launched by
torchrun as two nodes of one process each); a run killed mid-epoch resumes where it stopped, for the stream and
for every map-style reader."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from cldm.data import Fill50KDataset
from cldm.data.shards import write_shards
from conftest import ROOT
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")
N, BATCH = 16, 2

# Runs tutorial_train with training_step recording each batch's captions (one file per rank), and
# hard-killing the process (os._exit, like kill -9) at the start of step DIE_AT when set.
DRIVER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from ldm.models.diffusion.ddpm import LatentDiffusion
    import tutorial_train

    step = LatentDiffusion.training_step

    def recording_step(self, batch, batch_idx):
        if self.global_step == int(os.environ.get("DIE_AT", -1)):
            os._exit(9)
        with open(os.environ["SEEN"] + f".{{self.global_rank}}", "a") as f:
            f.write(json.dumps({{"step": self.global_step, "epoch": self.current_epoch, "batch": batch_idx,
                                "txt": list(batch["txt"])}}) + "\\n")
        return step(self, batch, batch_idx)

    LatentDiffusion.training_step = recording_step
    tutorial_train.main(sys.argv[1:])
""")


@pytest.fixture(scope="module")
def fill50k(tmp_path_factory):
    """N samples with distinct captions "sample i" in Fill50K's layout."""
    root = make_fill50k(tmp_path_factory.mktemp("fill") / "fill", n=N, size=32, seed=0)
    lines = [json.loads(line) for line in (root / "prompt.json").read_text().splitlines()]
    (root / "prompt.json").write_text("".join(json.dumps({**r, "prompt": f"sample {i}"}) + "\n"
                                              for i, r in enumerate(lines)))
    return root


@pytest.fixture(scope="module")
def shards(fill50k, tmp_path_factory):
    """The N samples as shards in several chunks."""
    return write_shards(Fill50KDataset(fill50k), tmp_path_factory.mktemp("stream") / "shards", chunk_bytes="4KB")


@pytest.fixture(scope="module")
def readers(fill50k, shards, tmp_path_factory) -> dict[str, list[str]]:
    """The N samples in each format, as --data_root and its options."""
    base = tmp_path_factory.mktemp("formats")
    lines = [json.loads(line) for line in (fill50k / "prompt.json").read_text().splitlines()]
    (base / "kohya" / "hints").mkdir(parents=True)
    with open(base / "metadata.jsonl", "w") as metadata:
        for i, line in enumerate(lines):
            shutil.copy(fill50k / line["target"], base / "kohya" / f"{i}.png")
            shutil.copy(fill50k / line["source"], base / "kohya" / "hints" / f"{i}.png")
            (base / "kohya" / f"{i}.txt").write_text(line["prompt"])
            metadata.write(json.dumps({"file_name": f"kohya/{i}.png", "conditioning_image_file_name":
                                       f"kohya/hints/{i}.png", "text": line["prompt"]}) + "\n")
    return {"fill50k": [str(fill50k)],
            "kohya": [str(base / "kohya"), "--conditioning_data_dir", str(base / "kohya" / "hints")],
            "hf": [str(base)], "shards": [str(shards)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT)))
    return path


def train_args(data, out, *extra):
    """A new run starts from random weights, whose UNet output layer must train (sd_locked False) to learn."""
    start = [] if "--resume" in extra else ["--resume_path", "none"]
    return ["--config", TINY, *start, "--sd_locked", "False", "--data_root", str(data), "--batch_size", str(BATCH),
            "--output_dir", str(out), "--sample_steps", "1", "--logger_freq", "1000", "--accelerator", "cpu",
            "--devices", "1", "--seed", "0", *extra]


def records(seen_file, rank=0) -> list[dict]:
    return [json.loads(line) for line in open(f"{seen_file}.{rank}")]


def seen_by_step(seen_file, ranks=(0,)) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for rank in ranks:
        for line in open(f"{seen_file}.{rank}"):
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["txt"])
    return steps


def assert_each_once(captions: list[str]) -> None:
    counts = Counter(captions)
    assert sorted(counts) == sorted(f"sample {i}" for i in range(N)), counts
    assert set(counts.values()) == {1}, counts


@pytest.mark.ddp
def test_two_nodes_see_every_sample_once_per_epoch(shards, tmp_path):
    port, script = free_port(), driver(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEN": str(tmp_path / "seen")}
    steps_per_epoch = N // (2 * BATCH)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
         *train_args(shards, tmp_path / "run", "--num_nodes", "2", "--strategy", "ddp",
                     "--max_steps", str(2 * steps_per_epoch))],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    steps = seen_by_step(tmp_path / "seen", ranks=(0, 1))
    assert sorted(steps) == list(range(2 * steps_per_epoch))
    per_rank = [set(t for s in seen_by_step(tmp_path / "seen", (r,)).values() for t in s) for r in (0, 1)]
    assert per_rank[0] and per_rank[1]  # both ranks trained
    for epoch in range(2):
        assert_each_once([t for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
                          for t in steps[s]])


@pytest.mark.ddp
def test_killed_mid_epoch_resumes_the_stream(shards, tmp_path):
    script, out = driver(tmp_path), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps_per_epoch = N // BATCH
    first = subprocess.run([sys.executable, str(script), *train_args(shards, out, "--max_steps", "100",
                                                                     "--checkpoint_every", "3")],
                           env={**env, "SEEN": str(tmp_path / "first"), "DIE_AT": "5"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 9, first.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()  # saved at step 3; steps 3 and 4 ran after it

    resume = ["--max_steps", str(steps_per_epoch), "--resume", str(out / "checkpoints" / "last.ckpt"), "--force"]
    second = subprocess.run([sys.executable, str(script), *train_args(shards, out, *resume)],
                            env={**env, "SEEN": str(tmp_path / "second")}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    before, after = seen_by_step(tmp_path / "first"), seen_by_step(tmp_path / "second")
    assert sorted(after) == list(range(3, steps_per_epoch))
    assert_each_once([t for s in range(3) for t in before[s]] + [t for s in after.values() for t in s])


@pytest.mark.parametrize("reader, checkpoint_every, die_at, options", [
    ("fill50k", 10, 12, ["--num_workers", "2"]),  # killed in the second epoch, workers fetching ahead
    ("kohya", 8, 10, ["--resolution", "64", "--resize", "buckets"]),  # saved at the end of the first epoch
    ("hf", 5, 7, ["--resolution", "32", "--resize", "random_crop"]),
    ("shards", 8, 10, []),  # the stream, saved at the end of the first epoch
])
def test_killed_mid_epoch_resumes_every_reader_exactly(readers, reader, checkpoint_every, die_at, options,
                                                                  tmp_path):
    """The resumed run trains on the very batches an uninterrupted run would (those the killed run trained on
    after its checkpoint included), each sample once per epoch, and Lightning counts no empty epoch."""
    script, out = driver(tmp_path), tmp_path / "run"
    data, *data_options = readers[reader]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    per_epoch = N // BATCH
    first = subprocess.run([sys.executable, str(script), *train_args(data, out, *data_options, *options, "--max_steps",
                                                                      "100", "--checkpoint_every",
                                                                      str(checkpoint_every))],
                           env={**env, "SEEN": str(tmp_path / "first"), "DIE_AT": str(die_at)}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 9, first.stderr[-3000:]
    resume = ["--max_steps", str(3 * per_epoch), "--resume", str(out / "checkpoints" / "last.ckpt"), "--force"]
    second = subprocess.run([sys.executable, str(script), *train_args(data, out, *data_options, *options, *resume)],
                            env={**env, "SEEN": str(tmp_path / "second")}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]

    before, after = records(tmp_path / "first"), records(tmp_path / "second")
    assert [r["step"] for r in after] == list(range(checkpoint_every, 3 * per_epoch))
    assert [(r["epoch"], r["batch"]) for r in after] == [divmod(r["step"], per_epoch) for r in after]
    replayed = {r["step"]: r["txt"] for r in after if r["step"] < die_at}
    assert replayed == {r["step"]: r["txt"] for r in before if r["step"] >= checkpoint_every}
    trained = [r for r in before if r["step"] < checkpoint_every] + after
    for epoch in range(3):
        assert_each_once([t for r in trained if r["step"] // per_epoch == epoch for t in r["txt"]])

"""Safe loading, recognising what a file is, reporting unmatched keys, and atomic saving (ldm.checkpoint)."""

import errno
import os
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ldm.checkpoint as ckpt
from cldm.model import load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, dead_pid, write_temps_to_dev_full
from ldm.checkpoint import CheckpointError, DiskFullError, UnsafeCheckpointError


class _RunsCode:
    """Unpickling this object would call os.system; a safe loader must never do it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_in_one_line_plus_advice(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_state_dict(evil)
    assert not marker.exists()
    assert "\n" not in str(refused.value) and str(evil) in str(refused.value) and "could run code" in str(refused.value)
    assert "\n" not in refused.value.advice and "safetensors" in refused.value.advice
    raw = tmp_path / "evil.pth"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(raw)
    assert not marker.exists()


GARBAGE = {
    "lfs.ckpt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4c2e\nsize 7703807346\n",
                 "looks like a Git LFS pointer", "git lfs pull"),
    "page.ckpt": (b"\n<!DOCTYPE html>\n<html><head><title>404</title></head></html>\n", "looks like an HTML page",
                  "download"),
    "notes.pth": (b"model weights go here\n", "looks like a text file (starting 'model weights go here')", None),
    "random.ckpt": (bytes(range(7, 250)) * 8, "neither a PyTorch checkpoint nor a safetensors file", None),
    "empty.safetensors": (b"", "looks like an empty file", None),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_named_for_what_it_is_not_called_unsafe(tmp_path, name):
    content, looks, advice = GARBAGE[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(err.value).startswith(f"{path} is not a checkpoint: ") and looks in str(err.value)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    assert (advice is None and err.value.advice is None) or advice in err.value.advice


def test_content_decides_the_format_not_the_name(tmp_path):
    weights = {"a": torch.arange(6.0).reshape(2, 3)}
    save_state_dict(weights, tmp_path / "w.safetensors")
    os.rename(tmp_path / "w.safetensors", tmp_path / "w.ckpt")
    assert torch.equal(load_state_dict(tmp_path / "w.ckpt")["a"], weights["a"])
    save_state_dict(weights, tmp_path / "t.ckpt")
    os.rename(tmp_path / "t.ckpt", tmp_path / "t.safetensors")
    assert torch.equal(load_state_dict(tmp_path / "t.safetensors")["a"], weights["a"])
    with zipfile.ZipFile(tmp_path / "archive.ckpt", "w") as z:
        z.writestr("fill50k/prompt.json", "{}")
    with pytest.raises(CheckpointError, match="is a zip archive but not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "archive.ckpt")


def test_a_state_dict_needs_names_and_tensors(tmp_path):
    torch.save({101: torch.ones(1), "a": torch.ones(1)}, tmp_path / "int_keys.ckpt")
    with pytest.raises(CheckpointError, match=r"int_keys.ckpt is not a state dict: 1 of its keys are not names "
                                              r"\(e.g. 101, of type int\)"):
        load_state_dict(tmp_path / "int_keys.ckpt")
    torch.save({"lr": 0.1, "steps": [1, 2]}, tmp_path / "no_tensors.ckpt")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_state_dict(tmp_path / "no_tensors.ckpt")
    torch.save([torch.ones(1)], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.ckpt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
def test_round_trip_and_unwrapping(tmp_path, tiny_model, suffix):
    path = save_state_dict(tiny_model.state_dict(), tmp_path / f"m{suffix}")
    loaded = load_state_dict(path)
    assert loaded.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_model.state_dict().items())
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "global_step": 7}, wrapped)
    assert load_state_dict(wrapped).keys() == loaded.keys()


def test_save_refuses_to_overwrite_without_force_and_to_write_over_a_folder(tmp_path):
    path = tmp_path / "out.safetensors"
    save_state_dict({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_state_dict({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    save_state_dict({"a": torch.zeros(2)}, path, force=True)
    assert torch.equal(load_state_dict(path)["a"], torch.zeros(2))
    (tmp_path / "folder.ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.ckpt is a folder"):
        save_state_dict({"a": torch.zeros(2)}, tmp_path / "folder.ckpt", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.ckpt", "out.safetensors"]


def test_full_disk_is_named_and_the_old_file_kept(tmp_path, monkeypatch):
    """The temp file is /dev/full (every write fails with ENOSPC, as on a full disk)."""
    path = save_state_dict({"a": torch.ones(3)}, tmp_path / "model.ckpt")
    before = path.read_bytes()
    write_temps_to_dev_full(monkeypatch)
    with pytest.raises(DiskFullError) as err:
        save_state_dict({"a": torch.zeros(1000)}, path, force=True)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == f"no space left on {ckpt.mount_point(tmp_path)} while writing {path}"
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]


FILL_A_TMPFS = """
import sys, torch
sys.path.insert(0, {root!r})
from ldm.checkpoint import DiskFullError, save_state_dict
for name in ("x.safetensors", "x.ckpt"):
    try:
        save_state_dict({{"a": torch.ones(1 << 20)}}, "/mnt/" + name)
    except DiskFullError as err:
        print(err)
"""


@pytest.mark.skipif(subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0,
                    reason="an extra check on a real full filesystem needs unprivileged mount namespaces")
def test_full_tmpfs_is_named_for_both_formats(tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(FILL_A_TMPFS.format(root=str(ROOT)))
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none /mnt && "
                          f"{sys.executable} {script} && ls -a /mnt"], capture_output=True, text=True)
    assert run.stdout.split() == ["no", "space", "left", "on", "/mnt", "while", "writing", "/mnt/x.safetensors",
                                  "no", "space", "left", "on", "/mnt", "while", "writing", "/mnt/x.ckpt", ".", ".."]


def test_temp_files_of_killed_writes_are_removed_on_the_next_write(tmp_path):
    path = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{dead.stdout.strip()}-{ckpt.HOST}"
    stale = tmp_path / f".last.ckpt.{dead}.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    stale_dir = tmp_path / f".last.ckpt.{dead}.efgh5678.tmp"
    stale_dir.mkdir()
    alive = tmp_path / f".last.ckpt.{os.getppid()}-{ckpt.HOST}.ijkl9012.tmp"  # a writer that is still running
    alive.write_bytes(b"being written")
    other_host = tmp_path / f".last.ckpt.{dead}x.mnop3456.tmp"  # another machine's, on a shared file system
    other_host.write_bytes(b"being written elsewhere")
    foreign = tmp_path / ".last.ckpt.notours.tmp"
    foreign.write_bytes(b"someone else's")
    save_state_dict({"a": torch.ones(1)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", alive.name, other_host.name,
                                                                 foreign.name])


def test_a_killed_saves_temp_of_another_name_goes_with_the_next_write_into_its_folder(tmp_path):
    """A run killed while saving step-000300.ckpt and resumed with another --checkpoint_every never saves that
    name again: its checkpoint-sized temp must go all the same."""
    dead = f"{dead_pid()}-{ckpt.HOST}"
    stale = tmp_path / f".step-000300.ckpt.{dead}.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".step-000200.ckpt.{os.getppid()}-{ckpt.HOST}.ijkl9012.tmp"
    alive.write_bytes(b"being written")
    save_state_dict({"a": torch.ones(1)}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", alive.name])


def test_folder_outputs_swap_whole_with_open_permissions_and_survive_a_killed_swap(tmp_path):
    out = tmp_path / "shards"
    with ckpt.atomic_output(out, folder=True) as tmp:
        (Path(tmp) / "index.json").write_text("old")
    with pytest.raises(FileExistsError, match="force"):
        with ckpt.atomic_output(out, folder=True):
            pass
    umask = os.umask(0o022)
    try:
        with ckpt.atomic_output(out, force=True, folder=True) as tmp:
            (Path(tmp) / "index.json").write_text("new")
        with ckpt.atomic_output(tmp_path / "file.json") as tmp:
            Path(tmp).write_text("{}")
    finally:
        os.umask(umask)
    assert (out / "index.json").read_text() == "new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json", "shards"]

    # killed between moving the old folder aside and moving the new one in: the next write puts the old back
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(out, moved / f".shards.{dead_pid()}-{ckpt.HOST}.abcd1234.old.tmp")
    (moved / f".shards.{dead_pid()}-{ckpt.HOST}.efgh5678.tmp").mkdir()  # the new one, never moved in
    with pytest.raises(FileExistsError, match="force"):
        with ckpt.atomic_output(moved / "shards", folder=True):
            pass
    assert os.listdir(moved) == ["shards"] and (moved / "shards" / "index.json").read_text() == "new"


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    path = save_state_dict({"a": torch.ones(1000)}, tmp_path / "full.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cut.ckpt is not a readable checkpoint \(truncated or corrupt\?\)"):
        load_state_dict(cut)
    st = save_state_dict({"a": torch.ones(1000)}, tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_state_dict(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        load_state_dict(tmp_path / "nothere.ckpt")


def test_nonfinite_weights_are_refused_by_name():
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("-inf")]),
               "step": torch.tensor(3)}
    assert ckpt.nonfinite_keys(weights) == ["b", "c"]
    with pytest.raises(CheckpointError, match=r"x.ckpt has non-finite weights \(NaN or inf\) in 2 tensors, e.g. b"):
        ckpt.require_finite(weights, "x.ckpt")
    ckpt.require_finite({"a": torch.ones(3)}, "x.ckpt")


def test_weights_fingerprint_follows_the_values(tiny_model):
    state = tiny_model.first_stage_model.state_dict()
    before = ckpt.weights_fingerprint(state)
    assert ckpt.weights_fingerprint(dict(state)) == before
    assert ckpt.weights_fingerprint({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}) != before
    assert ckpt.weights_fingerprint({"renamed." + k: v for k, v in state.items()}) != before
    with torch.no_grad():
        next(tiny_model.first_stage_model.parameters()).view(-1)[0] += 1e-6
    assert ckpt.weights_fingerprint(tiny_model.first_stage_model.state_dict()) != before


def test_load_report_names_keys_and_tolerates_position_ids(tiny_model):
    sd = dict(tiny_model.state_dict())
    pos_key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    sd[pos_key] = torch.arange(77)[None]
    report = load_checkpoint(tiny_model, sd, strict=True)
    assert report.ok
    dropped = "control_model.zero_convs.0.0.weight"
    sd.pop(dropped)
    sd["model_ema.decay"] = torch.tensor(0.999)
    report = load_checkpoint(tiny_model, sd)
    assert report.missing == [dropped] and report.unexpected == ["model_ema.decay"]
    assert str(report) == f"1 missing keys ({dropped}); 1 unexpected keys (model_ema.decay)"
    with pytest.raises(CheckpointError, match="zero_convs"):
        load_checkpoint(tiny_model, sd, strict=True)
    control_only = {k: v for k, v in tiny_model.state_dict().items() if k.startswith("control_model.")}
    assert load_checkpoint(tiny_model, control_only, prefixes=("control_model.",)).ok


def test_shape_mismatch_names_the_key(tiny_model):
    sd = {"control_model.zero_convs.0.0.weight": torch.zeros(5, 5, 1, 1)}
    with pytest.raises(CheckpointError, match=r"zero_convs.0.0.weight: \(5, 5, 1, 1\) in file vs"):
        load_checkpoint(tiny_model, sd)


def test_init_from_ckpt_reports_through_logging(tiny_model, tmp_path, caplog):
    weights = {k: v for k, v in tiny_model.first_stage_model.state_dict().items()}
    path = save_state_dict({"encoder.conv_in.weight": weights["encoder.conv_in.weight"], "extra": torch.ones(1)},
                           tmp_path / "vae.ckpt")
    with caplog.at_level("INFO"):
        report = tiny_model.first_stage_model.init_from_ckpt(str(path))
    assert report.unexpected == ["extra"] and "encoder.conv_in.bias" in report.missing
    assert f"Restored AutoencoderKL from {path}: {len(report.missing)} missing keys" in caplog.text

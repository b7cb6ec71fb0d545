"""Safe loading, reporting of unmatched keys, and atomic saving."""

import os
import pickle

import pytest
import torch

from cldm.model import load_checkpoint, load_state_dict, save_state_dict
from ldm.util import UnsafeCheckpointError


class _RunsCode:
    """Unpickling this object would call os.system; a safe loader must never do it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_state_dict(evil)
    assert not marker.exists()
    raw = tmp_path / "evil.pth"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        load_state_dict(raw)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
def test_round_trip_and_unwrapping(tmp_path, tiny_model, suffix):
    path = save_state_dict(tiny_model.state_dict(), tmp_path / f"m{suffix}")
    loaded = load_state_dict(path)
    assert loaded.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_model.state_dict().items())
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "global_step": 7}, wrapped)
    assert load_state_dict(wrapped).keys() == loaded.keys()


def test_save_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "out.safetensors"
    save_state_dict({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_state_dict({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    save_state_dict({"a": torch.zeros(2)}, path, force=True)
    assert torch.equal(load_state_dict(path)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    path = save_state_dict({"a": torch.ones(1000)}, tmp_path / "full.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.ckpt"):
        load_state_dict(cut)
    st = save_state_dict({"a": torch.ones(1000)}, tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_state_dict(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        load_state_dict(tmp_path / "nothere.ckpt")


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
    assert dropped in str(report)
    with pytest.raises(KeyError, match="zero_convs"):
        load_checkpoint(tiny_model, sd, strict=True)
    control_only = {k: v for k, v in tiny_model.state_dict().items() if k.startswith("control_model.")}
    assert load_checkpoint(tiny_model, control_only, prefixes=("control_model.",)).ok


def test_shape_mismatch_names_the_key(tiny_model):
    sd = {"control_model.zero_convs.0.0.weight": torch.zeros(5, 5, 1, 1)}
    with pytest.raises(ValueError, match=r"zero_convs.0.0.weight.*\(5, 5, 1, 1\)"):
        load_checkpoint(tiny_model, sd)

"""tool_add_control / tool_add_control_sd21 / tool_transfer_control on tiny configs with random weights."""

import runpy
import subprocess
import sys

import pytest
import torch

import tool_add_control
import tool_transfer_control
from cldm.cli import run_tool
from cldm.model import CONTROL_PREFIX, create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained
from ldm.checkpoint import UNET_PREFIX

TINY, TINY_V21 = ROOT / "models" / "cldm_tiny.yaml", ROOT / "models" / "cldm_tiny_v21.yaml"
NEW_LAYERS = tuple(CONTROL_PREFIX + name for name in ("zero_convs.", "middle_block_out.", "input_hint_block."))


def sd_checkpoint(config) -> dict[str, torch.Tensor]:
    """An SD-style checkpoint: no control_model.* nor logvar (as SD1.5), plus EMA and position_ids keys."""
    model = model_as_trained(config)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(CONTROL_PREFIX) and k != "logvar"}
    sd["model_ema.x"] = torch.ones(3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's keys and shapes, and its SD checkpoint saved as .ckpt and .safetensors."""
    tmp = tmp_path_factory.mktemp("sd")
    sd = sd_checkpoint(TINY)
    for suffix in (".ckpt", ".safetensors"):
        save_state_dict(sd, tmp / f"sd{suffix}")
    shapes = {k: v.shape for k, v in create_model(TINY).state_dict().items()}
    return sd, shapes, tmp


def run(tool, args, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the tool's command line, run in-process."""
    rc = run_tool(tool.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("src_suffix, out_suffix", [(".ckpt", ".safetensors"), (".safetensors", ".ckpt")])
def test_add_control_copies_the_unet_and_zeroes_the_new_convs(tiny, tmp_path, capsys, caplog, src_suffix,
                                                              out_suffix):
    sd, shapes, src_dir = tiny
    out_path = tmp_path / f"control_ini{out_suffix}"
    with caplog.at_level("INFO"):
        rc, _, err = run(tool_add_control, [src_dir / f"sd{src_suffix}", out_path, "--config", TINY], capsys)
    assert rc == 0, err
    result = load_state_dict(out_path)
    assert result.keys() == shapes.keys()
    assert load_checkpoint(create_model(TINY), result, strict=True).ok
    copied = [k for k in result
              if k.startswith(CONTROL_PREFIX) and UNET_PREFIX + k.removeprefix(CONTROL_PREFIX) in shapes]
    assert len(copied) > 50
    for k in copied:
        assert torch.equal(result[k], sd[UNET_PREFIX + k.removeprefix(CONTROL_PREFIX)]), k
    for k in result:
        if not k.startswith(CONTROL_PREFIX) and k != "logvar":
            assert torch.equal(result[k], sd[k]), k
    zero = [k for k in result if k.startswith((*NEW_LAYERS[:2], "control_model.input_hint_block.14."))]
    assert {"control_model.zero_convs.0.0.bias", "control_model.middle_block_out.0.weight",
            "control_model.input_hint_block.14.weight"} <= set(zero)
    assert all(not result[k].any() for k in zero)
    assert result["control_model.input_hint_block.0.weight"].std() > 0
    added = {line.removeprefix("These weights are newly added: ") for line in caplog.messages
             if line.startswith("These weights are newly added: ")}
    assert added == {k for k in result if k.startswith(NEW_LAYERS)} | {"logvar"}


def test_existing_output_is_refused_and_kept_without_force(tiny, tmp_path, capsys):
    _, _, src_dir = tiny
    out_path = tmp_path / "control_ini.ckpt"
    out_path.write_bytes(b"an earlier result")
    rc, _, err = run(tool_add_control, [src_dir / "sd.ckpt", out_path, "--config", TINY], capsys)
    assert rc == 1 and "--force" in err and str(out_path) in err
    assert out_path.read_bytes() == b"an earlier result"
    rc, _, err = run(tool_add_control, [src_dir / "sd.ckpt", out_path, "--config", TINY, "--force"], capsys)
    assert rc == 0, err
    assert "control_model.zero_convs.0.0.weight" in load_state_dict(out_path)
    assert [p.name for p in tmp_path.iterdir()] == ["control_ini.ckpt"]


def test_sd2_checkpoint_into_sd1_config_names_keys_and_shapes(tmp_path, capsys):
    src = save_state_dict(sd_checkpoint(TINY_V21), tmp_path / "sd21.safetensors")
    rc, _, err = run(tool_add_control, [src, tmp_path / "out.ckpt", "--config", TINY], capsys)
    assert rc == 1 and not (tmp_path / "out.ckpt").exists()
    error, hint = err.splitlines()
    assert error.startswith("error: ")
    assert hint == (f"hint: --config {TINY} builds on SD1.x: is the checkpoint an SD1.x one? (SD1.x, SD2.x and "
                    "SDXL each have their configs)")
    assert "keys missing (cond_stage_model.transformer." in err
    assert "shapes differ (model.diffusion_model." in err and " in file vs " in err


def test_truncated_and_missing_inputs_give_clear_errors(tiny, tmp_path, capsys):
    _, _, src_dir = tiny
    for suffix in (".ckpt", ".safetensors"):
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes((src_dir / f"sd{suffix}").read_bytes()[:500])
        rc, _, err = run(tool_add_control, [cut, tmp_path / "out.ckpt", "--config", TINY], capsys)
        assert rc == 1 and "truncated or corrupt" in err and str(cut) in err
    missing = tmp_path / "nothere.ckpt"
    rc, _, err = run(tool_add_control, [missing, tmp_path / "out.ckpt", "--config", TINY], capsys)
    assert rc == 1 and "nothere.ckpt" in err
    assert not (tmp_path / "out.ckpt").exists()


def run_script(name, args, monkeypatch) -> int | str | None:
    """Run a tool as `python name args` would, in this process; return its exit code."""
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    return exited.value.code


def test_sd21_script_defaults_to_the_sd21_config(tmp_path, capsys, caplog, monkeypatch):
    assert run_script("tool_add_control_sd21.py", ["--help"], monkeypatch) == 0
    assert "cldm_v21.yaml" in capsys.readouterr().out
    src = save_state_dict(sd_checkpoint(TINY_V21), tmp_path / "sd21.ckpt")
    out_path = tmp_path / "control_sd21_ini.safetensors"
    with caplog.at_level("INFO"):
        assert run_script("tool_add_control_sd21.py", [src, out_path, "--config", TINY_V21], monkeypatch) == 0
    assert "These weights are newly added: control_model.zero_convs.0.0.weight" in caplog.messages
    assert load_state_dict(out_path).keys() == create_model(TINY_V21).state_dict().keys()


def test_command_line_exit_code_and_message(tmp_path):
    cmd = [sys.executable, ROOT / "tool_add_control.py", tmp_path / "nothere.ckpt", tmp_path / "x.ckpt"]
    missing = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"error: Checkpoint not found: {tmp_path / 'nothere.ckpt'}"


@pytest.mark.parametrize("control_only, dtype", [(False, torch.float32), (True, torch.float16)])
def test_transfer_adds_the_community_offset_to_the_control_copy(tiny, tmp_path, capsys, control_only, dtype):
    _, shapes, _ = tiny
    gen = torch.Generator().manual_seed(0)
    rand = lambda keys: {k: torch.randn(shapes[k], generator=gen) for k in keys}  # noqa: E731
    sd_keys = [k for k in shapes if not k.startswith(CONTROL_PREFIX)]
    base, target = rand(sd_keys), rand(sd_keys)
    control = {k: v.to(dtype) for k, v in rand(k for k in shapes if k.startswith(CONTROL_PREFIX)).items()}
    if not control_only:  # a ControlNet 1.0 file is the whole ControlLDM trained on the base
        control |= base
    target.pop("logvar")
    paths = {name: save_state_dict(sd, tmp_path / f"{name}.safetensors")
             for name, sd in (("control", control), ("base", base), ("target", target))}
    out_path = tmp_path / "community_control.ckpt"
    args = ["--control", paths["control"], "--base", paths["base"], "--target", paths["target"],
            "--out", out_path, "--config", TINY]
    rc, _, err = run(tool_transfer_control, args, capsys)
    assert rc == 0, err
    result = load_state_dict(out_path)
    assert result.keys() == shapes.keys()
    for k, v in result.items():
        twin = UNET_PREFIX + k.removeprefix(CONTROL_PREFIX)
        if k.startswith(CONTROL_PREFIX) and twin in shapes:
            expected = (control[k].float() + (target[twin] - base[twin])).to(dtype)
        elif k.startswith(CONTROL_PREFIX):
            expected = control[k]
        else:
            expected = target.get(k, torch.zeros(shapes[k]))  # logvar, which the target lacks, starts at zero
        assert v.dtype == expected.dtype and torch.equal(v, expected), k


def test_transfer_refuses_a_file_without_control_weights(tiny, tmp_path, capsys):
    _, _, src_dir = tiny
    sd = src_dir / "sd.ckpt"
    args = ["--control", sd, "--base", sd, "--target", sd, "--out", tmp_path / "o.ckpt", "--config", TINY]
    rc, _, err = run(tool_transfer_control, args, capsys)
    assert rc == 1 and f"{sd} does not fit" in err and "keys missing (control_model." in err
    assert not (tmp_path / "o.ckpt").exists()

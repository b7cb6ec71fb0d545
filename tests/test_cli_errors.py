"""Every entry point answers a user's mistake the same way: one line `error: ...` naming the file, key or argument
(plus at most one `hint: ...` line) on stderr, exit status 1, no traceback; usage errors exit 2, as argparse does.

One row of CASES per mistake. To add one: make its bad input in `bad` (a file under `bad.dir`), then add a Case
with the script, its arguments and the words its error (and hint) must contain. Each case runs the script as
`python SCRIPT ARGS` would, in this process (the modules are imported once for all cases).
"""

import os
import pickle
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cldm.model import save_state_dict
from conftest import ROOT, model_as_trained
from tool_make_fill50k import make_fill50k

TINY, TINY_V21 = ROOT / "models" / "cldm_tiny.yaml", ROOT / "models" / "cldm_tiny_v21.yaml"
TINY_LORA = ROOT / "models" / "cldm_tiny_lora.yaml"
TINY_T2I = ROOT / "models" / "cldm_tiny_t2i.yaml"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> SimpleNamespace:
    """The bad inputs, and a few good ones to combine them with, in one folder (`bad.dir`)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    model = model_as_trained(TINY)
    state = model.state_dict()
    sd = {k: v for k, v in state.items() if not k.startswith("control_model.")}
    nan = dict(state, **{"control_model.zero_convs.0.0.weight": torch.full_like(
        state["control_model.zero_convs.0.0.weight"], float("nan"))})
    (d / "out_dir").mkdir()
    (d / "exists.ckpt").write_bytes(b"an earlier result")
    (d / "lfs.ckpt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c2e\nsize 7703807346\n")
    (d / "page.ckpt").write_text("<!DOCTYPE html><html><body>Access denied</body></html>\n")
    (d / "notes.ckpt").write_text("e is for epoch\n")  # torch.load once read the "e" (101) as a pickle opcode
    (d / "random.ckpt").write_bytes(bytes(range(7, 250)) * 4)
    torch.save({101: torch.ones(1)}, d / "int_keys.ckpt")
    (d / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": _RunsCode()}, protocol=2))
    save_state_dict(state, d / "cut.ckpt")
    (d / "cut.ckpt").write_bytes((d / "cut.ckpt").read_bytes()[:4000])
    save_state_dict(state, d / "initial.ckpt")
    save_state_dict(nan, d / "nan.ckpt")
    save_state_dict(sd, d / "sd.ckpt")
    torch.save({"state_dict": sd, "global_step": 840000}, d / "sd_wrapped.ckpt")  # as v1-5-pruned.ckpt is
    save_state_dict({k: v for k, v in state.items() if k.startswith("control_model.")}, d / "control.safetensors")
    save_state_dict({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.bias": torch.zeros(1)},
                    d / "vae.safetensors")  # weights, but of no control kind
    save_state_dict(model_as_trained(TINY_T2I).control_state_dict(), d / "t2i.safetensors")
    data = make_fill50k(d / "fill50k", n=4, size=32, seed=0)
    from tutorial_train import main as train
    train(["--config", str(TINY), "--resume_path", str(d / "initial.ckpt"), "--data_root", str(data),
           "--batch_size", "2", "--max_steps", "1", "--logger_freq", "100", "--accelerator", "cpu", "--devices", "1",
           "--output_dir", str(d / "run")])
    for name, text in (("list", "[1, 2]"), ("nulls", '{"block_out_channels": null, "down_block_types": null}'),
                       ("broken", '{"in_channels": 4,'), ("latin1", '{"_name_or_path": "caf\xe9"}')):
        (d / f"diffusers_{name}").mkdir()
        (d / f"diffusers_{name}" / "config.json").write_bytes(text.encode("latin-1"))
    (d / "demo_out").mkdir()
    (d / "demo_out" / "metrics.json").write_text("{}")
    return SimpleNamespace(dir=d, data=data, lightning=d / "run" / "checkpoints" / "last.ckpt")


@dataclass(frozen=True)
class Case:
    script: str  # relative to the repository root
    args: Callable[[SimpleNamespace], list]
    error: str  # words the error line must contain; {dir} is bad.dir
    hint: str | None = None  # words the hint line must contain (None: a hint line may follow or not)
    code: int = 1

    def __str__(self) -> str:
        return self.script


def train(*args) -> Callable[[SimpleNamespace], list]:
    """tutorial_train.py arguments on the tiny config and data; a callable gives arguments from `bad`."""
    return lambda b: ["--config", TINY, "--data_root", b.data, "--output_dir", b.dir / "train_out", "--max_steps",
                      "1", "--accelerator", "cpu", "--devices", "1", *(a(b) if callable(a) else a for a in args)]


def add(source: str, out: str = "out.ckpt") -> Callable[[SimpleNamespace], list]:
    return lambda b: [b.dir / source, b.dir / out, "--config", TINY]


CASES = {
    # tool_add_control: what the issue found, and the usual mistakes
    "add: LFS pointer": Case("tool_add_control.py", add("lfs.ckpt"), "{dir}/lfs.ckpt is not a checkpoint: it looks "
                             "like a Git LFS pointer", "git lfs pull"),
    "add: HTML page": Case("tool_add_control.py", add("page.ckpt"), "looks like an HTML page", "download"),
    "add: text file": Case("tool_add_control.py", add("notes.ckpt"), "{dir}/notes.ckpt is not a checkpoint: it looks "
                           "like a text file (starting 'e is for epoch')"),
    "add: random bytes": Case("tool_add_control.py", add("random.ckpt"),
                              "neither a PyTorch checkpoint nor a safetensors file"),
    "add: non-string key": Case("tool_add_control.py", add("int_keys.ckpt"),
                                "{dir}/int_keys.ckpt is not a state dict: 1 of its keys are not names"),
    "add: refused pickle": Case("tool_add_control.py", add("evil.ckpt"), "Refusing to load {dir}/evil.ckpt",
                                "convert it once to safetensors"),
    "add: truncated": Case("tool_add_control.py", add("cut.ckpt"), "{dir}/cut.ckpt is not a readable checkpoint "
                           "(truncated or corrupt?)"),
    "add: NaN weights": Case("tool_add_control.py", add("nan.ckpt"), "{dir}/nan.ckpt has non-finite weights (NaN or "
                             "inf) in 1 tensors, e.g. control_model.zero_convs.0.0.weight", "earlier checkpoint"),
    "add: missing input": Case("tool_add_control.py", add("nothere.ckpt"), "Checkpoint not found: {dir}/nothere.ckpt"),
    "add: existing output": Case("tool_add_control.py", add("sd.ckpt", "exists.ckpt"),
                                 "{dir}/exists.ckpt already exists; pass --force"),
    "add: output is a folder": Case("tool_add_control.py", add("sd.ckpt", "out_dir"), "{dir}/out_dir is a folder"),
    "add: wrong config": Case("tool_add_control.py", lambda b: [b.dir / "sd.ckpt", b.dir / "o.ckpt", "--config",
                                                                TINY_V21], "does not fit",
                              "builds on SD2.x: is the checkpoint an SD2.x one?"),
    "add sd21: LFS pointer": Case("tool_add_control_sd21.py", add("lfs.ckpt"), "looks like a Git LFS pointer"),
    "add sdxl: HTML page": Case("tool_add_control_sdxl.py", add("page.ckpt"), "looks like an HTML page"),
    "add: usage": Case("tool_add_control.py", lambda b: [], "the following arguments are required", code=2),
    # tool_transfer_control
    "transfer: text file": Case("tool_transfer_control.py", lambda b: [
        "--control", b.dir / "notes.ckpt", "--base", b.dir / "sd.ckpt", "--target", b.dir / "sd.ckpt", "--out",
        b.dir / "t.ckpt", "--config", TINY], "{dir}/notes.ckpt is not a checkpoint"),
    "transfer: non-string key": Case("tool_transfer_control.py", lambda b: [
        "--control", b.dir / "initial.ckpt", "--base", b.dir / "int_keys.ckpt", "--target", b.dir / "sd.ckpt",
        "--out", b.dir / "t.ckpt", "--config", TINY], "{dir}/int_keys.ckpt is not a state dict"),
    # tool_convert_diffusers
    "to-diffusers: text file": Case("tool_convert_diffusers.py", lambda b: [
        "to-diffusers", b.dir / "notes.ckpt", b.dir / "diffusers_out", "--config", TINY], "is not a checkpoint"),
    "to-diffusers: output is a file": Case("tool_convert_diffusers.py", lambda b: [
        "to-diffusers", b.dir / "initial.ckpt", b.dir / "exists.ckpt", "--config", TINY],
        "{dir}/exists.ckpt is a file; to-diffusers writes a folder"),
    "from-diffusers: a list": Case("tool_convert_diffusers.py", lambda b: [
        "from-diffusers", b.dir / "diffusers_list", b.dir / "c.ckpt", "--config", TINY],
        "{dir}/diffusers_list/config.json holds a JSON list, not the object of a diffusers config.json"),
    "from-diffusers: null fields": Case("tool_convert_diffusers.py", lambda b: [
        "from-diffusers", b.dir / "diffusers_nulls", b.dir / "c.ckpt", "--config", TINY],
        "{dir}/diffusers_nulls/config.json: block_out_channels is null, expected a list; down_block_types is null, "
        "expected a list"),
    "from-diffusers: invalid JSON": Case("tool_convert_diffusers.py", lambda b: [
        "from-diffusers", b.dir / "diffusers_broken", b.dir / "c.ckpt", "--config", TINY],
        "{dir}/diffusers_broken/config.json is not valid JSON"),
    "from-diffusers: not UTF-8": Case("tool_convert_diffusers.py", lambda b: [
        "from-diffusers", b.dir / "diffusers_latin1", b.dir / "c.ckpt", "--config", TINY],
        "{dir}/diffusers_latin1/config.json is not UTF-8 text"),
    "from-diffusers: output is a folder": Case("tool_convert_diffusers.py", lambda b: [
        "from-diffusers", b.dir / "diffusers_list", b.dir / "out_dir", "--config", TINY],
        "{dir}/out_dir is a folder"),
    # tool_fuse_control_lora, tool_cache_latents, tool_make_fill50k, tool_eval_control, tool_train_tiny_base
    "fuse: HTML base": Case("tool_fuse_control_lora.py", lambda b: [
        b.dir / "control.safetensors", b.dir / "fused.ckpt", "--base", b.dir / "page.ckpt", "--config", TINY_LORA],
        "{dir}/page.ckpt is not a checkpoint: it looks like an HTML page"),
    "cache: LFS pointer": Case("tool_cache_latents.py", lambda b: [
        "--config", TINY, "--ckpt", b.dir / "lfs.ckpt", "--data_root", b.data, "--out", b.dir / "cache"],
        "{dir}/lfs.ckpt is not a checkpoint"),
    "cache: NaN weights": Case("tool_cache_latents.py", lambda b: [
        "--config", TINY, "--ckpt", b.dir / "nan.ckpt", "--data_root", b.data, "--out", b.dir / "cache"],
        "{dir}/nan.ckpt has non-finite weights"),
    "dataset: no image folder": Case("tool_make_dataset.py", lambda b: [
        b.dir / "nowhere", "--out", b.dir / "made", "--detector", "canny"], "{dir}/nowhere"),
    "fill50k: output is a file": Case("tool_make_fill50k.py", lambda b: ["--out", b.dir / "exists.ckpt", "--n", "2"],
                                      "{dir}/exists.ckpt exists and is not a folder"),
    "eval: text file": Case("tool_eval_control.py", lambda b: [
        "--config", TINY, "--ckpt", b.dir / "notes.ckpt", "--data_root", b.data, "--n", "1"], "is not a checkpoint"),
    "eval: a file of no control kind": Case("tool_eval_control.py", lambda b: [
        "--config", TINY, "--ckpt", b.dir / "sd.ckpt", b.dir / "vae.safetensors", "--data_root", b.data, "--n", "1"],
        "{dir}/vae.safetensors holds no control weights: expected a full ControlNet"),
    "eval: another mode's file": Case("tool_eval_control.py", lambda b: [
        "--config", TINY, "--ckpt", b.dir / "sd.ckpt", b.dir / "t2i.safetensors", "--data_root", b.data, "--n", "1"],
        "{dir}/t2i.safetensors is a t2i-adapter file (diffusers layout), but the model of this config takes "
        "controlnet files", "_lora.yaml, *_lllite.yaml"),
    "tiny base: random bytes": Case("tool_train_tiny_base.py", lambda b: [
        "--check", b.dir / "random.ckpt", "--report", b.dir / "r.json"], "{dir}/random.ckpt is not a checkpoint"),
    # tutorial_train: initial weights
    "train: LFS pointer": Case("tutorial_train.py", train("--resume_path", lambda b: b.dir / "lfs.ckpt"),
                               "{dir}/lfs.ckpt is not a checkpoint: it looks like a Git LFS pointer"),
    "train: NaN weights": Case("tutorial_train.py", train("--resume_path", lambda b: b.dir / "nan.ckpt"),
                               "{dir}/nan.ckpt has non-finite weights (NaN or inf)", "earlier checkpoint"),
    "train: missing initial": Case("tutorial_train.py", train("--resume_path", lambda b: b.dir / "nothere.ckpt"),
                                   "Initial checkpoint not found: {dir}/nothere.ckpt"),
    "train: SD checkpoint as initial": Case("tutorial_train.py", train("--resume_path", lambda b: b.dir / "sd.ckpt"),
                                            "{dir}/sd.ckpt lacks", "tool_add_control.py"),
    "train sd21: LFS pointer": Case("tutorial_train_sd21.py", train("--resume_path", lambda b: b.dir / "lfs.ckpt"),
                                    "is not a checkpoint"),
    # tutorial_train --resume with the wrong kind of file
    "resume: missing": Case("tutorial_train.py", train("--resume", lambda b: b.dir / "nothere.ckpt"),
                            "--resume {dir}/nothere.ckpt: no such file"),
    "resume: truncated": Case("tutorial_train.py", train("--resume", lambda b: b.dir / "cut.ckpt"),
                              "{dir}/cut.ckpt is not a readable checkpoint (truncated or corrupt?)"),
    "resume: SD checkpoint": Case("tutorial_train.py", train("--resume", lambda b: b.dir / "sd_wrapped.ckpt"),
                                  "--resume {dir}/sd_wrapped.ckpt holds weights only", "--resume_path"),
    "resume: control-only safetensors": Case(
        "tutorial_train.py", train("--resume", lambda b: b.dir / "control.safetensors"),
        "--resume {dir}/control.safetensors is a safetensors weights file, not a Lightning checkpoint",
        "pass them as --resume_path"),
    "resume: another config's checkpoint": Case(
        "tutorial_train.py", lambda b: [*train("--resume", b.lightning)(b), "--config", TINY_V21],
        "was not trained with", "the --config it was trained with"),
    "resume: a folder": Case("tutorial_train.py", train("--resume", lambda b: b.dir / "out_dir"),
                             "{dir}/out_dir"),
    "resume: also --resume_path": Case(
        "tutorial_train.py",
        train("--resume", lambda b: b.lightning, "--resume_path", lambda b: b.dir / "initial.ckpt"),
        "--resume_path is not used with --resume"),
    "train: bad --devices": Case("tutorial_train.py", train("--devices", "two"), "expected auto, a count", code=2),
    # the demo and the apps
    "demo: earlier results": Case("demo.py", lambda b: ["--out", b.dir / "demo_out"],
                                  "{dir}/demo_out holds the results of an earlier run"),
    "app: missing checkpoint": Case("gradio_apps/gradio_canny2image.py", lambda b: [
        "--ckpt", b.dir / "control_sd15_canny.pth", "--config", TINY, "--device", "cpu"],
        "ControlNet checkpoint not found: {dir}/control_sd15_canny.pth", "huggingface.co/lllyasviel/ControlNet"),
    "app: LFS pointer": Case("gradio_apps/gradio_scribble2image.py", lambda b: [
        "--ckpt", b.dir / "lfs.ckpt", "--config", TINY, "--device", "cpu"],
        "{dir}/lfs.ckpt is not a checkpoint", "git lfs pull"),
}


def run_script(script: str, args: list, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return exited.value.code


@pytest.mark.parametrize("name", list(CASES))
def test_a_users_mistake_is_one_line_and_exit_1(name, bad, monkeypatch, capsys):
    case = CASES[name]
    monkeypatch.chdir(bad.dir)
    code = run_script(case.script, case.args(bad), monkeypatch)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    expected = case.error.format(dir=bad.dir)
    if case.code == 2:
        assert "usage:" in err and expected in err
        return
    lines = err.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    after = lines[lines.index(errors[0]) + 1:]
    assert after == [] or (len(after) == 1 and after[0].startswith("hint: ")), err
    assert case.hint is None or (after and case.hint in after[0]), err


def test_the_table_covers_every_entry_point():
    scripts = {case.script for case in CASES.values()}
    entry_points = {p.name for p in ROOT.glob("tool_*.py")} | {p.name for p in ROOT.glob("tutorial_train*.py")}
    assert entry_points | {"demo.py"} <= scripts
    assert any(s.startswith("gradio_apps/") for s in scripts)


def test_the_real_interpreter_prints_the_same_line(bad):
    """Outside pytest too: `python tool_add_control.py ...` exits 1 with the line and the hint, nothing else."""
    run = subprocess.run([sys.executable, ROOT / "tool_add_control.py", bad.dir / "lfs.ckpt", bad.dir / "o.ckpt"],
                         capture_output=True, text=True, cwd=bad.dir)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: {bad.dir / 'lfs.ckpt'} is not a checkpoint: it looks like a Git LFS pointer (the real file was "
        "never downloaded)", "hint: fetch the real file with `git lfs pull`, or download it again"]


def test_tools_report_through_logging(bad):
    """A tool's progress goes through logging (to stderr), its result only to where it was asked to write."""
    out = bad.dir / "logged.ckpt"
    run = subprocess.run([sys.executable, ROOT / "tool_add_control.py", bad.dir / "sd.ckpt", out, "--config", TINY],
                         capture_output=True, text=True, cwd=bad.dir)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and f"Done: {out} (" in run.stderr
    assert "These weights are newly added: control_model.zero_convs.0.0.weight" in run.stderr.splitlines()
    assert Path(out).is_file()

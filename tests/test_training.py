"""tutorial_train end to end on a tiny model and generated Fill50K data: loss, image logs, checkpoints, resume."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from cldm.logger import ImageLogger
from cldm.model import create_model, load_checkpoint, load_state_dict
from conftest import ROOT
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), n=16, size=32, seed=0)


def train(data_root, out, *extra):
    from tutorial_train import main
    args = ["--config", TINY, "--resume_path", "none", "--data_root", str(data_root), "--batch_size", "4",
            "--output_dir", str(out), "--sample_steps", "2", "--accelerator", "cpu", "--devices", "1", *extra]
    return main(args)


def losses(trainer):
    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def test_training_logs_checkpoints_resumes_and_exports(data_root, tmp_path):
    out = tmp_path / "run"
    trainer = train(data_root, out, "--max_steps", "24", "--logger_freq", "12", "--checkpoint_every", "8",
                    "--sd_locked", "False", "--learning_rate", "1e-3", "--seed", "0", "--log_every_n_steps", "1")
    curve = losses(trainer)
    assert len(curve) == 24 and all(map(lambda v: v == v and abs(v) < 1e6, curve))
    assert sum(curve[-6:]) / 6 < sum(curve[:6]) / 6

    logged = sorted(p.name for p in (out / "image_log" / "train").iterdir())
    for key in ("reconstruction", "control", "conditioning", "samples_cfg_scale_9.00"):
        assert f"{key}_gs-000012_e-000002_b-000003.png" in logged, logged
        assert any(name.startswith(f"{key}_gs-000024_") for name in logged)

    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file() and (out / "checkpoints" / "step-000024.ckpt").is_file()
    saved = load_state_dict(last)

    with pytest.raises(ValueError, match="--sd_locked False"):
        train(data_root, out, "--max_steps", "24", "--resume", str(last), "--force")
    resumed = train(data_root, out, "--max_steps", "24", "--resume", str(last), "--force", "--sd_locked", "False")
    assert resumed.global_step == 24
    model_state = resumed.lightning_module.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in saved.items())
    continued = train(data_root, out, "--max_steps", "26", "--resume", str(last), "--force",
                      "--logger_freq", "100", "--sd_locked", "False")
    assert continued.global_step == 26

    base = create_model(TINY)
    report = load_checkpoint(base, out / "control_model.safetensors", prefixes=("control_model.",))
    assert report.ok
    export = load_state_dict(out / "control_model.safetensors")
    assert set(export) == {k for k in base.state_dict() if k.startswith("control_model.")}


def test_existing_export_is_refused_before_training(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "control_model.safetensors").write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="--force"):
        train(data_root, out, "--max_steps", "1")
    assert (out / "control_model.safetensors").read_bytes() == b"keep me"


def test_missing_initial_checkpoint_says_how_to_make_it(data_root, tmp_path):
    from tutorial_train import main
    with pytest.raises(SystemExit, match="tool_add_control.py"):
        main(["--config", TINY, "--resume_path", str(tmp_path / "nope.ckpt"), "--data_root", str(data_root)])


def test_prompt_dropout_rate(tiny_model):
    prompts = [f"p{i}" for i in range(2000)]
    tiny_model.drop_prompt_rate = 0.0
    assert tiny_model.drop_prompts(prompts) == prompts
    tiny_model.drop_prompt_rate = 1.0
    assert set(tiny_model.drop_prompts(prompts)) == {""}
    tiny_model.drop_prompt_rate = 0.5
    dropped = sum(p == "" for p in tiny_model.drop_prompts(prompts))
    assert 850 < dropped < 1150


def test_image_logger_logs_once_per_global_step():
    logger = ImageLogger(batch_frequency=3)
    decisions = []
    for step in [1, 1, 2, 2, 3, 3, 3, 4, 6, 6]:
        if logger.should_log(step):
            logger.last_logged_step = step
            decisions.append(step)
    assert decisions == [3, 6]


@pytest.mark.ddp
def test_two_process_ddp_on_cpu(data_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "tutorial_train.py"), "--config", TINY, "--resume_path", "none",
           "--data_root", str(data_root), "--batch_size", "2", "--max_steps", "2", "--logger_freq", "2",
           "--sample_steps", "1", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--output_dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "control_model.safetensors").is_file()
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()

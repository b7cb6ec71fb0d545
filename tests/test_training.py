"""tutorial_train end to end on a tiny model and generated Fill50K data: loss, image logs, checkpoints, resume,
the settings the config and the command line give, and the runs that must stop instead of training wrongly."""

import csv
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cldm.cldm import ControlLDM
from cldm.logger import ImageLogger
from cldm.model import create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained, write_temps_to_dev_full
from ldm.checkpoint import DiskFullError, UserError, read_checkpoint
from ldm.models.diffusion.ddpm import TrainingStopped
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")
DECODER = ("model.diffusion_model.output_blocks.", "model.diffusion_model.out.")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), n=16, size=32, seed=0)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """Initial weights as tool_add_control.py gives them, of a tiny model whose UNet passes gradients."""
    model = model_as_trained(TINY)
    return save_state_dict(model.state_dict(), tmp_path_factory.mktemp("initial") / "control_tiny_ini.ckpt")


def train(data_root, out, *extra, config=TINY):
    """tutorial_train on the tiny config; a new run starts from random weights (--resume_path none)."""
    from tutorial_train import main
    start = [] if "--resume" in extra or "--resume_path" in extra else ["--resume_path", "none"]
    args = ["--config", str(config), *start, "--data_root", str(data_root), "--batch_size", "4",
            "--output_dir", str(out), "--sample_steps", "2", "--accelerator", "cpu", "--devices", "1",
            *map(str, extra)]
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
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step-000024.ckpt"]
    saved = load_state_dict(last)

    common = ["--resume", last, "--force", "--sd_locked", "False", "--learning_rate", "1e-3"]
    resumed = train(data_root, out, "--max_steps", "24", *common)
    assert resumed.global_step == 24
    model_state = resumed.lightning_module.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in saved.items())
    continued = train(data_root, out, "--max_steps", "26", "--logger_freq", "100", *common)
    assert continued.global_step == 26

    base = create_model(TINY)
    report = load_checkpoint(base, out / "control_model.safetensors", prefixes=("control_model.",))
    assert report.ok
    export = load_state_dict(out / "control_model.safetensors")
    # trained with sd_locked=False: the export holds the ControlNet and the UNet decoder trained with it
    trained = ("control_model.", "model.diffusion_model.output_blocks.", "model.diffusion_model.out.")
    assert set(export) == {k for k in base.state_dict() if k.startswith(trained)}


def test_the_config_governs_unless_an_option_is_given(tmp_path, caplog):
    from cldm.train_command import build_model, parse_args
    config = OmegaConf.load(TINY)
    config.model.params.update(learning_rate=3e-4, sd_locked=False, only_mid_control=True, drop_prompt_rate=0.25,
                               max_nan_steps=3)
    yaml = tmp_path / "tiny_unlocked.yaml"
    OmegaConf.save(config, yaml)

    def settings(*options):
        model = build_model(parse_args(["--config", str(yaml), *options], TINY, "none"), "none")
        return (model.learning_rate, model.sd_locked, model.only_mid_control, model.drop_prompt_rate,
                model.optimizer_name, model.max_nan_steps)

    assert settings() == (3e-4, False, True, 0.25, "adamw", 3)
    with caplog.at_level("INFO"):
        given = settings("--learning_rate", "1e-3", "--sd_locked", "True", "--only_mid_control", "False",
                         "--drop_prompt_rate", "0", "--optimizer", "adamw", "--max_nan_steps", "0")
    assert given == (1e-3, True, False, 0.0, "adamw", 0)
    assert "optimizer = adamw" not in caplog.text  # the class's default, which the config leaves as is
    assert "learning_rate = 0.001 (from the command line; the config says 0.0003)" in caplog.messages
    assert "only_mid_control = False (from the command line; the config says True)" in caplog.messages
    assert "max_nan_steps = 0 (from the command line; the config says 3)" in caplog.messages


def test_resume_switches_only_mid_control_back_and_forth(data_root, tmp_path, caplog):
    """The tutorial's workflow: pause, set only_mid_control=True, resume, pause again, set it back, resume."""
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = ["--sd_locked", "False", "--learning_rate", "1e-3", "--logger_freq", "100"]
    train(data_root, out, "--max_steps", "2", *common)
    with caplog.at_level("INFO"):
        mid = train(data_root, out, "--resume", last, "--max_steps", "4", "--only_mid_control", "True", "--force",
                    *common)
    assert mid.global_step == 4 and mid.lightning_module.only_mid_control
    assert any(m.startswith(f"Resuming from {last} with the command line's ") and f"--data_root {data_root}, " in m
               and "--max_steps 4, " in m and "--only_mid_control True" in m for m in caplog.messages)
    assert ("Resuming with only_mid_control = True (from the command line); the checkpoint's run had False"
            in caplog.messages)
    assert read_checkpoint(last)["control_training"]["only_mid_control"] is True
    caplog.clear()
    with caplog.at_level("INFO"):
        full = train(data_root, out, "--resume", last, "--max_steps", "6", "--force", *common)
    assert full.global_step == 6 and not full.lightning_module.only_mid_control
    assert ("Resuming with only_mid_control = False (from the config); the checkpoint's run had True (pass "
            "--only_mid_control True to keep it)") in caplog.messages


def test_resume_unlocks_the_unet_decoder_with_fresh_optimizer_state_for_it(data_root, initial, tmp_path, caplog):
    """The tutorial's workflow: end a long sd_locked run with some steps at sd_locked=False."""
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = ["--learning_rate", "1e-3", "--logger_freq", "100", "--force"]
    train(data_root, out, "--resume_path", initial, "--max_steps", "3", *common)
    saved = read_checkpoint(last)
    old_names = [n for group in saved["control_training"]["param_groups"] for n in group]
    assert old_names and not any(n.startswith(DECODER) for n in old_names)
    old_state = {n: saved["optimizer_states"][0]["state"][i] for i, n in enumerate(old_names)}

    with caplog.at_level("INFO"):
        unlocked = train(data_root, out, "--resume", last, "--sd_locked", "False", "--max_steps", "3", *common)
    model, optimizer = unlocked.lightning_module, unlocked.optimizers[0]
    assert unlocked.global_step == 3 and not model.sd_locked
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved["state_dict"].items())
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    decoder = {n for n, p in model.named_parameters() if n.startswith(DECODER)}
    assert in_optimizer == set(old_names) | decoder
    state = {names[id(p)]: s for p, s in optimizer.state.items()}
    assert set(state) == set(old_names)  # the decoder starts fresh; the control keeps its moments
    for name in old_names:
        assert all(torch.equal(state[name][k], old_state[name][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert ("Resuming with sd_locked = False (from the command line); the checkpoint's run had True"
            in caplog.messages)
    assert (f"Trainable tensors changed on resume: {len(decoder)} start training with fresh optimizer state"
            in caplog.text)

    continued = train(data_root, out, "--resume", last, "--sd_locked", "False", "--max_steps", "5", *common)
    assert continued.global_step == 5
    after = continued.lightning_module.state_dict()
    assert any(not torch.equal(after[n], saved["state_dict"][n]) for n in decoder)


def test_learning_rate_given_on_resume_takes_effect(data_root, tmp_path, caplog):
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = ["--sd_locked", "False", "--logger_freq", "100", "--force"]
    train(data_root, out, "--max_steps", "2", "--learning_rate", "1e-3", *common)
    with caplog.at_level("INFO"):
        resumed = train(data_root, out, "--resume", last, "--max_steps", "2", "--learning_rate", "0.5", *common)
    assert {group["lr"] for group in resumed.optimizers[0].param_groups} == {0.5}
    assert ("Resuming with learning_rate = 0.5 (from the command line); the checkpoint's run had 0.001"
            in caplog.messages)
    assert "Learning rate 0.001 -> 0.5: every parameter group's rate scaled by 500, optimizer state kept" in caplog.text


def test_resume_refuses_what_cannot_take_effect(data_root, tmp_path):
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(data_root, out, "--max_steps", "1", "--sd_locked", "False", "--logger_freq", "100")
    with pytest.raises(UserError, match=f"--optimizer adamw8bit \\(from the command line\\): {last} was trained "
                                        "with optimizer adamw") as refused:
        train(data_root, out, "--resume", last, "--max_steps", "2", "--sd_locked", "False", "--force",
              "--optimizer", "adamw8bit")
    assert refused.value.advice.startswith("resume with --optimizer adamw")
    with pytest.raises(UserError, match="--resume_path is not used with --resume"):
        train(data_root, out, "--resume", last, "--resume_path", "none", "--max_steps", "2", "--force")


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(data_root, tmp_path):
    out = tmp_path / "run"
    train(data_root, out, "--max_steps", "1", "--sd_locked", "False", "--logger_freq", "100", "--export",
          tmp_path / "first.safetensors")
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match="holds checkpoints of an earlier run \\(last.ckpt\\)") as err:
        train(data_root, out, "--max_steps", "1", "--sd_locked", "False", "--export", tmp_path / "second.safetensors")
    assert err.value.advice.startswith(f"continue that run with --resume {out / 'checkpoints' / 'last.ckpt'}")
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before
    train(data_root, out, "--max_steps", "2", "--sd_locked", "False", "--logger_freq", "100", "--force")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 2


def loss_turns_nan_at(monkeypatch, steps: set[int]) -> list:
    """Make the training loss NaN at the given global steps; returns the list that receives the model."""
    seen, shared_step = [], ControlLDM.shared_step

    def nan_at_some_steps(self, batch, **kwargs):
        seen[:] = [self]
        loss, loss_dict = shared_step(self, batch, **kwargs)
        return (loss * float("nan") if self.global_step in steps else loss), loss_dict

    monkeypatch.setattr(ControlLDM, "shared_step", nan_at_some_steps)
    return seen


def test_a_nonfinite_loss_stops_training_at_once_and_keeps_the_last_checkpoint(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = loss_turns_nan_at(monkeypatch, {3})
    with pytest.raises(TrainingStopped, match="the loss is nan at global step 3") as stopped:
        train(data_root, out, "--max_steps", "8", "--checkpoint_every", "1", "--sd_locked", "False",
              "--learning_rate", "1e-3", "--logger_freq", "100")
    last = out / "checkpoints" / "last.ckpt"
    assert stopped.value.advice.endswith(f"the last checkpoint before it: {last}")
    saved = read_checkpoint(last)
    assert saved["global_step"] == 3
    # the NaN step changed nothing: the model holds the weights of the last checkpoint
    assert all(torch.equal(v, seen[0].state_dict()[k]) for k, v in saved["state_dict"].items())
    assert not (out / "control_model.safetensors").exists()


def test_max_nan_steps_skips_that_many_steps(data_root, tmp_path, monkeypatch, caplog):
    seen = loss_turns_nan_at(monkeypatch, {2, 4})
    with caplog.at_level("WARNING"):
        trainer = train(data_root, tmp_path / "run", "--max_steps", "6", "--max_nan_steps", "2", "--sd_locked",
                        "False", "--learning_rate", "1e-3", "--logger_freq", "100")
    assert trainer.global_step == 6 and seen[0].nonfinite_steps == 2
    assert [m for m in caplog.messages if m.startswith("Skipped a step")] == [
        "Skipped a step: the loss is nan at global step 2 (1 of at most 2)",
        "Skipped a step: the loss is nan at global step 4 (2 of at most 2)"]
    assert all(torch.isfinite(v).all() for v in trainer.lightning_module.state_dict().values() if v.is_floating_point())


def test_a_model_that_cannot_learn_stops_with_why(data_root, tmp_path):
    """--resume_path none with sd_locked=True: the random UNet's zero output layer blocks every gradient."""
    with pytest.raises(TrainingStopped, match="exactly zero gradient at global step 0") as stopped:
        train(data_root, tmp_path / "run", "--max_steps", "3", "--logger_freq", "100")
    assert "--sd_locked False" in stopped.value.advice and "tool_add_control.py" in stopped.value.advice
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_while_saving_a_checkpoint_is_named(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_temps_to_dev_full(monkeypatch, prefix=".last.ckpt.")
    with pytest.raises(DiskFullError, match=f"^no space left on /.* while writing {out}/checkpoints/last.ckpt$"):
        train(data_root, out, "--max_steps", "1", "--sd_locked", "False", "--logger_freq", "100")
    assert list((out / "checkpoints").iterdir()) == []


def test_existing_export_is_refused_before_training(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "control_model.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        train(data_root, out, "--max_steps", "1")
    assert (out / "control_model.safetensors").read_bytes() == b"keep me"


def test_missing_initial_checkpoint_says_how_to_make_it(data_root, tmp_path):
    from tutorial_train import main
    with pytest.raises(FileNotFoundError, match="tool_add_control.py"):
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


class Recorder(pl.LightningModule):
    """A one-weight model whose log_images records the global step it was called at."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logged_at = []

    def training_step(self, batch, batch_idx):
        return (self.w - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def log_images(self, batch, N, **kwargs):
        self.logged_at.append(self.global_step)
        return {"grid": torch.zeros(1, 3, 4, 4)}


def test_image_logger_logs_once_per_global_step_under_gradient_accumulation(tmp_path):
    model = Recorder()
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[ImageLogger(batch_frequency=3)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    trainer.fit(model, DataLoader(torch.arange(12.0), batch_size=1))
    assert trainer.global_step == 6
    assert model.logged_at == [3, 6]  # not at step 0, and once per step although each step sees two batches
    written = sorted(p.name.split("_e-")[0] for p in (tmp_path / "image_log" / "train").iterdir())
    assert written == ["grid_gs-000003", "grid_gs-000006"]


@pytest.mark.ddp
def test_two_process_ddp_on_cpu(data_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "tutorial_train.py"), "--config", TINY, "--resume_path", "none",
           "--data_root", str(data_root), "--batch_size", "2", "--max_steps", "2", "--logger_freq", "2",
           "--sample_steps", "1", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--output_dir", str(tmp_path / "ddp"), "--sd_locked", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "control_model.safetensors").is_file()
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()


def test_a_run_bounded_by_steps_reports_only_what_it_did(data_root, tmp_path, caplog):
    """No word of skipped samples without --skip_bad_samples, no image folder that was never written, one version
    folder for both loggers, and an epoch label without a negative epoch count."""
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        trainer = train(data_root, out, "--max_steps", "2", "--sd_locked", "False", "--logger_freq", "100")
    assert not any("bad samples" in m for m in caplog.messages)
    summary = next(m for m in caplog.messages if m.startswith("Control-only weights: "))
    assert "Image grids" not in summary and not (out / "image_log").exists()
    assert f"Losses: {out / 'lightning_logs' / 'version_0' / 'metrics.csv'}" in summary
    versions = sorted(p.name for p in (out / "lightning_logs").iterdir())
    assert versions == ["version_0"]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "lightning_logs" / "version_0").iterdir())
    assert trainer.progress_bar_callback._get_train_description(3).strip() == "Epoch 3"
    resumed = train(data_root, out, "--resume", out / "checkpoints" / "last.ckpt", "--max_steps", "3", "--force",
                    "--sd_locked", "False", "--logger_freq", "100")
    assert sorted(p.name for p in (out / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert os.path.exists(os.path.join(resumed.loggers[1].log_dir, "metrics.csv"))


def test_an_epoch_bounded_run_resumed_after_an_epochs_last_step_trains_every_epoch(data_root, tmp_path, monkeypatch):
    """--max_epochs (kohya's --max_train_epochs, diffusers' --num_train_epochs): a run killed after the checkpoint
    at the last step of epoch 0 resumes in epoch 1, not in an empty epoch counted as one (0 -> 1 -> 3), so it
    trains every epoch it was asked for and names its image logs by the right epoch."""
    seen: list[tuple[int, int, int]] = []  # (global step, epoch, batch) of each step trained
    kill = [6]  # the global step at whose start the first run dies

    def record_or_die(self, batch, batch_idx):
        if self.global_step in kill:
            raise RuntimeError("killed")
        seen.append((self.global_step, self.current_epoch, batch_idx))
    monkeypatch.setattr(ControlLDM, "on_train_batch_start", record_or_die, raising=False)
    out, per_epoch = tmp_path / "run", 4  # 16 samples at batch 4
    common = ["--max_epochs", "3", "--checkpoint_every", "4", "--sd_locked", "False", "--logger_freq", "5",
              "--seed", "0"]
    with pytest.raises(RuntimeError, match="killed"):
        train(data_root, out, *common)
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    del seen[:], kill[:]
    resumed = train(data_root, out, *common, "--resume", out / "checkpoints" / "last.ckpt", "--force")
    assert seen == [(step, *divmod(step, per_epoch)) for step in range(4, 3 * per_epoch)]
    assert resumed.global_step == 3 * per_epoch and resumed.current_epoch == 3
    logged = {p.name for p in (out / "image_log" / "train").glob("control_gs-*")}
    assert logged == {"control_gs-000005_e-000001_b-000000.png", "control_gs-000010_e-000002_b-000001.png"}


def test_max_grad_norm_clips_the_gradient_of_each_update(data_root, tmp_path, monkeypatch):
    """--max_grad_norm (kohya's and diffusers' option): the gradient each update applies has at most that norm."""
    norms: list[float] = []

    def record(self, *args):  # after the update: the gradients it used, clipped
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
    monkeypatch.setattr(ControlLDM, "on_train_batch_end", record, raising=False)
    common = ["--max_steps", "2", "--sd_locked", "False", "--logger_freq", "100", "--seed", "0"]
    train(data_root, tmp_path / "plain", *common)
    plain, norms[:] = norms[:], []
    train(data_root, tmp_path / "clipped", *common, "--max_grad_norm", "1e-3")
    assert min(plain) > 1e-2 and norms == [pytest.approx(1e-3, rel=1e-4)] * 2
    with pytest.raises(UserError, match="--max_grad_norm must be positive"):
        train(data_root, tmp_path / "zero", *common, "--max_grad_norm", "0")


def test_resuming_mid_epoch_with_other_data_settings_says_what_changed(data_root, tmp_path, caplog):
    """The position in the epoch carries over exactly only under the same sample order: a changed seed (or data,
    batch size, number of ranks) is named, not passed over."""
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = ["--sd_locked", "False", "--logger_freq", "100", "--checkpoint_every", "2", "--force"]
    train(data_root, out, "--max_steps", "2", "--seed", "0", *common)  # 8 of the epoch's 16 samples
    with caplog.at_level("WARNING"):
        train(data_root, out, "--max_steps", "3", "--seed", "0", "--resume", last, *common)
        assert not [m for m in caplog.messages if m.startswith("Resuming mid-epoch")]
        train(data_root, out, "--max_steps", "3", "--seed", "1", "--resume", last, *common)
    assert [m for m in caplog.messages if m.startswith("Resuming mid-epoch")] == [
        "Resuming mid-epoch with other data settings than the checkpoint's (seed 0 -> 1): the rest of epoch 0 may "
        "repeat or leave out samples; the epochs after it are whole. Resume with the same data, --seed, --batch_size "
        "and number of ranks for an exact continuation"]


def test_a_finished_run_continued_with_more_steps_goes_on_where_it_stopped(data_root, tmp_path, monkeypatch):
    """--resume of the last.ckpt a run wrote when it reached --max_steps mid-epoch (the tutorial's "train, change a
    setting, resume", a reward phase): the next steps are that epoch's next batches, not a new epoch."""
    seen: list[tuple[int, int, int, list[str]]] = []  # (global step, epoch, batch, captions) of each step trained
    training_step = ControlLDM.training_step

    def record(self, batch, batch_idx):
        seen.append((self.global_step, self.current_epoch, batch_idx, list(batch["txt"])))
        return training_step(self, batch, batch_idx)
    monkeypatch.setattr(ControlLDM, "training_step", record)
    common = ["--sd_locked", "False", "--logger_freq", "100", "--checkpoint_every", "100", "--seed", "0"]
    train(data_root, tmp_path / "whole", "--max_steps", "3", *common)
    whole, seen[:] = seen[:], []
    out = tmp_path / "run"
    train(data_root, out, "--max_steps", "1", *common)
    train(data_root, out, "--max_steps", "3", "--resume", out / "checkpoints" / "last.ckpt", "--force", *common)
    assert seen == whole  # steps 0, then 1 and 2: epoch 0, batches 0, 1, 2, with the same samples
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_last_is_written_once_per_step_after_its_update_under_gradient_accumulation(data_root, tmp_path, monkeypatch):
    """With --accumulate_grad_batches the global step stays put for the micro-batches between updates: last.ckpt is
    written after an update only (not before the first, nor again mid-accumulation), and not again on resume."""
    saves: list[int] = []
    save_checkpoint = pl.Trainer.save_checkpoint

    def record(self, path, *args, **kwargs):
        if os.path.basename(path) == "last.ckpt":
            saves.append(self.global_step)
        return save_checkpoint(self, path, *args, **kwargs)
    monkeypatch.setattr(pl.Trainer, "save_checkpoint", record)
    out = tmp_path / "run"
    common = ["--accumulate_grad_batches", "2", "--checkpoint_every", "1", "--sd_locked", "False", "--logger_freq",
              "100"]
    train(data_root, out, "--max_steps", "2", *common)
    assert saves == [1, 2]
    saves.clear()
    train(data_root, out, "--max_steps", "3", "--resume", out / "checkpoints" / "last.ckpt", "--force", *common)
    assert saves == [3]

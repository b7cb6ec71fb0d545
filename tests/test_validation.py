"""Control fidelity while training (tutorial_train --val_data): the scalars at the right steps, the same numbers
cldm.fidelity.evaluate gives, the image sheet, the options refused when they would do nothing, and two DDP
processes of which only rank zero validates."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cldm.fidelity import Scorers, evaluate, load_samples
from cldm.model import save_state_dict
from cldm.sharding import ShardedDataParallel, shards_weights
from cldm.validation import (
    HELD_OUT_LOSSES,
    ControlValidation,
    HeldOut,
    choose_metrics,
    no_control_trains,
    read_held_out,
)
from conftest import ROOT, model_as_trained, randomize_zero_convs
from ldm.checkpoint import UserError, read_checkpoint
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")
SAMPLING = dict(seed=0, steps=2, guidance_scale=3.0, batch_size=4, sampler="ddim")  # what the run below uses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_fill50k(root / "train", n=16, size=32, seed=0), make_fill50k(root / "held_out", n=4, size=32, seed=1)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """A tiny model whose control acts from the start (random zero convs), as after some training."""
    model = model_as_trained(TINY)
    randomize_zero_convs(model)
    return save_state_dict(model.state_dict(), tmp_path_factory.mktemp("initial") / "ini.ckpt")


def train(train_root, out, *extra):
    from tutorial_train import main
    return main(["--config", TINY, "--data_root", str(train_root), "--batch_size", "4", "--output_dir", str(out),
                 "--accelerator", "cpu", "--devices", "1", "--logger_freq", "1000", "--log_every_n_steps", "1",
                 *map(str, extra)])


def logged_rows(trainer) -> dict[int, dict[str, float]]:
    """step -> the val/* values of metrics.csv (CSVLogger)."""
    rows = {}
    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        for r in csv.DictReader(f):
            values = {k: float(v) for k, v in r.items() if k.startswith("val/") and v}
            if values:
                rows.setdefault(int(r["step"]), {}).update(values)
    return rows


def test_validation_logs_what_evaluate_gives_at_the_right_steps_with_a_sheet(data, initial, tmp_path):
    train_root, held_out = data
    out = tmp_path / "run"
    trainer = train(train_root, out, "--resume_path", initial, "--max_steps", "5", "--seed", "0",
                    "--val_data", held_out, "--val_every", "2", "--val_samples", "4", "--val_steps", "2")

    # at the start, every --val_every steps and at the end; Lightning's validation loop adds the held-out loss
    rows = logged_rows(trainer)
    assert sorted(rows) == [0, 2, 4, 5]
    metrics = ("fill_iou", "fill_color_acc", "fill_floor_iou", "canny_f1", "ssim")  # Fill50K data: fill applies
    fidelity = {f"val/{m}{c}" for m in metrics for c in ("", "_no_control")} | {"val/seconds"}
    assert set(rows[5]) == set(rows[2]) == fidelity | set(HELD_OUT_LOSSES) and set(rows[0]) == fidelity
    assert rows[4]["val/loss_simple"] != rows[2]["val/loss_simple"]  # the same draws, other weights

    # the numbers cldm.fidelity.evaluate gives for the trained model and the same seeds
    model = trainer.lightning_module.eval()
    prompts, hints, targets = load_samples(held_out, 4)
    scores, _ = evaluate(model, prompts, hints, targets, Scorers(["fill", "canny", "ssim"]), **SAMPLING)
    for metric in metrics:
        assert rows[5][f"val/{metric}"] == pytest.approx(scores["control"][metric].mean(), abs=1e-12)
        # sd_locked: nothing the samples without control use trains, so step 0's are reused, and still right
        assert rows[5][f"val/{metric}_no_control"] == pytest.approx(scores["no_control"][metric].mean(), abs=1e-12)
        assert rows[2][f"val/{metric}_no_control"] == rows[0][f"val/{metric}_no_control"]
    assert rows[5]["val/canny_f1"] != rows[5]["val/canny_f1_no_control"]  # the control acts
    assert rows[5]["val/canny_f1"] != rows[0]["val/canny_f1"]  # and its training shows

    # TensorBoard: the same scalars and a sheet at every validated step; the sheets as files too
    events = EventAccumulator(str(trainer.loggers[0].log_dir), size_guidance={"images": 0}).Reload()
    fill = events.Scalars("val/fill_iou")
    assert [e.step for e in fill] == [0, 2, 4, 5]
    assert fill[-1].value == pytest.approx(rows[5]["val/fill_iou"], rel=1e-6)
    sheets = events.Images("val/samples")
    assert [e.step for e in sheets] == [0, 2, 4, 5]
    assert sheets[0].width == 4 + 4 * (4 * 32 + 4)  # hint | target | without | with, 128 px each
    assert sorted(p.name for p in (out / "image_log" / "val").iterdir()) == [
        f"fidelity_gs-{s:06}.png" for s in (0, 2, 4, 5)]


def test_validation_samples_under_the_trainings_autocast_with_a_half_precision_frozen_base(data, initial, tmp_path):
    train_root, held_out = data
    trainer = train(train_root, tmp_path / "run", "--resume_path", initial, "--max_steps", "1", "--val_data",
                    held_out, "--val_every", "1", "--val_samples", "2", "--val_steps", "1",
                    "--precision", "bf16-mixed", "--frozen_dtype", "bf16")
    rows = logged_rows(trainer)
    assert sorted(rows) == [0, 1] and all(np.isfinite(list(r.values())).all() for r in rows.values())


def test_samples_without_control_are_resampled_only_when_their_weights_train(monkeypatch):
    import cldm.validation
    model = model_as_trained(TINY)
    randomize_zero_convs(model)
    images = np.random.default_rng(0).integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8)
    held_out = HeldOut("held", ["red circle with blue background"] * 2, *images)
    validation = ControlValidation(held_out, every=1, metrics=["canny"], steps=1, batch_size=2)
    validation.scorers = Scorers(["canny"])
    sampled = []

    def recording_evaluate(*args, conditions, **kwargs):
        sampled.append(conditions)
        return evaluate(*args, conditions=conditions, **kwargs)

    monkeypatch.setattr(cldm.validation, "evaluate", recording_evaluate)
    model.train()
    modes = [m.training for m in model.modules()]

    model.sd_locked = False  # the UNet decoder trains: without control, the samples change too
    assert no_control_trains(model)
    validation.sample_and_score(model)
    validation.sample_and_score(model)
    assert sampled == [("control", "no_control")] * 2
    assert [m.training for m in model.modules()] == modes  # every module back in its own mode

    model.sd_locked = True  # only control_model trains: the first samples without control stay right
    assert not no_control_trains(model)
    sampled.clear()
    scores, images = validation.sample_and_score(model)
    assert sampled == [("control",)]
    fresh, fresh_images = evaluate(model, held_out.prompts, held_out.hints, held_out.targets, Scorers(["canny"]),
                                   steps=1, batch_size=2, conditions=("no_control",))
    assert np.array_equal(images["no_control"], fresh_images["no_control"])
    assert not np.array_equal(images["control"], images["no_control"])


def test_metrics_follow_the_data_unless_named(data):
    _, held_out = data
    state = torch.get_rng_state()
    fill = read_held_out(held_out, 4)
    assert torch.equal(torch.get_rng_state(), state)  # reading draws no number of the training's generator
    assert choose_metrics(fill) == ["fill", "canny", "ssim"]
    noise = HeldOut("photos", ["x"] * 2, fill.hints[:2],
                    np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    assert choose_metrics(noise) == ["canny", "ssim"]
    assert choose_metrics(noise, ["ssim"]) == ["ssim"]
    with pytest.raises(UserError, match="--val_metrics fill: sample 0 of photos is not a Fill50K-type target"):
        choose_metrics(noise, ["fill"])
    assert shards_weights(ShardedDataParallel()) and not shards_weights(DDPStrategy())


@pytest.mark.parametrize("extra, message", [
    (["--val_every", "3"], "--val_every is given without --val_data"),
    (["--val_data", "HELD"], "--val_data HELD: HELD holds 4 samples, fewer than the 16 asked for"),
    (["--val_data", "HELD", "--val_samples", "4", "--val_every", "0"], "--val_every must be at least 1"),
    (["--val_data", "HELD", "--val_split", "test"], "--val_split applies to the hf format, not to the fill50k"),
])
def test_validation_options_are_refused_by_name_before_the_model_is_built(data, tmp_path, extra, message):
    train_root, held_out = data
    extra = [str(held_out) if v == "HELD" else v for v in extra]
    with pytest.raises(UserError, match=message.replace("HELD", str(held_out))):
        train(train_root, tmp_path / "run", "--resume_path", "none", *extra)


@pytest.mark.ddp
def test_two_ddp_processes_only_rank_zero_validates(data, tmp_path):
    train_root, held_out = data
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(ROOT / "tutorial_train.py"), "--config", TINY, "--resume_path", "none",
           "--data_root", str(train_root), "--batch_size", "2", "--max_steps", "2", "--logger_freq", "1000",
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--output_dir", str(out),
           "--sd_locked", "False", "--val_data", str(held_out), "--val_every", "1", "--val_samples", "2",
           "--val_steps", "1", "--keep_best", "1", "--monitor", "val/canny_f1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Validating on 2 samples") == 1
    for step in (0, 1, 2):
        assert result.stderr.count(f"validation at step {step} ") == 1, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "image_log" / "val").iterdir()) == [
        f"fidelity_gs-{s:06}.png" for s in (0, 1, 2)]
    # every rank chose the same best checkpoint by rank zero's scores (a rank without them would hang or fail)
    assert len(list((out / "checkpoints" / "best").iterdir())) == 1



def losses(trainer) -> list[float]:
    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def best_checkpoints(out) -> dict[int, float]:
    """step -> score, from the names of the kept checkpoints (step-000004-val_canny_f1-0.3512.ckpt)."""
    names = [p.name.removesuffix(".ckpt").split("-") for p in (out / "checkpoints" / "best").iterdir()]
    return {int(parts[1]): float(parts[3]) for parts in names}


def test_keep_best_keeps_the_best_by_a_validation_value_and_early_stopping_watches_it(data, initial, tmp_path):
    train_root, held_out = data
    validate = ["--resume_path", initial, "--seed", "0", "--learning_rate", "1e-3", "--val_data", held_out,
                "--val_every", "1", "--val_samples", "4", "--val_steps", "2"]
    out = tmp_path / "best"
    trainer = train(train_root, out, *validate, "--max_steps", "4", "--keep_best", "2", "--monitor", "val/canny_f1")
    plain = train(train_root, tmp_path / "plain", *validate[:6], "--max_steps", "4")
    assert losses(trainer) == losses(plain)  # validating draws nothing from the training's random stream
    scores = {step: row["val/canny_f1"] for step, row in logged_rows(trainer).items() if step > 0}
    assert sorted(scores) == [1, 2, 3, 4] and len(set(scores.values())) > 2  # the scores move
    best = sorted(scores, key=lambda step: -scores[step])[:2]
    kept = best_checkpoints(out)
    assert sorted(kept) == sorted(best)  # the two highest, not the last ones
    assert all(kept[step] == pytest.approx(scores[step], abs=1e-4) for step in kept)
    assert read_checkpoint(next((out / "checkpoints" / "best").iterdir()))["global_step"] in best

    # the config's monitor by default (the held-out loss; less is better), and early stopping: without control
    # nothing that samples trains (sd_locked), so that score never improves after the first validation
    out = tmp_path / "stop"
    trainer = train(train_root, out, *validate, "--max_steps", "10", "--keep_best", "1",
                    "--monitor", "val/canny_f1_no_control", "--early_stop_patience", "2")
    assert trainer.global_step == 3  # improved at step 1, not at 2 and 3
    assert sorted(best_checkpoints(out)) == [1]
    out = tmp_path / "loss"
    trainer = train(train_root, out, *validate, "--max_steps", "3", "--keep_best", "1")
    val_losses = {step: row["val/loss_simple_ema"] for step, row in logged_rows(trainer).items() if step > 0}
    assert list(best_checkpoints(out)) == [min(val_losses, key=val_losses.get)]


@pytest.mark.parametrize("extra, message", [
    (["--keep_best", "2"], "--keep_best and --early_stop_patience choose by a validation value, and no --val_data"),
    (["--val_data", "HELD", "--val_samples", "4", "--keep_best", "2", "--monitor", "val/depth_rmse"],
     "--monitor val/depth_rmse is not a value the validation logs"),
    (["--val_data", "HELD", "--val_samples", "4", "--early_stop_patience", "0"], "--early_stop_patience 1 or more"),
])
def test_checkpoint_choice_is_refused_by_name_when_it_cannot_work(data, tmp_path, extra, message):
    train_root, held_out = data
    extra = [str(held_out) if v == "HELD" else v for v in extra]
    with pytest.raises(UserError, match=message):
        train(train_root, tmp_path / "run", "--resume_path", "none", *extra)


def test_an_epoch_bounded_run_validates_its_last_step(data, initial, tmp_path):
    """--max_epochs without --max_steps: the last batch of the last epoch is validated as a last step is."""
    train_root, held_out = data
    trainer = train(train_root, tmp_path / "run", "--resume_path", initial, "--max_epochs", "2", "--seed", "0",
                    "--val_data", held_out, "--val_every", "3", "--val_samples", "2", "--val_steps", "1",
                    "--val_metrics", "canny")
    assert trainer.global_step == 8 and trainer.current_epoch == 2  # 16 samples at batch 4, two epochs whole
    assert sorted(logged_rows(trainer)) == [0, 3, 6, 8]

"""EMA of the trained weights (tutorial_train --ema_decay): the average against a hand computation, a killed and
resumed run's average equal to an uninterrupted run's, the exports, and the logged and validation samples of the
average."""

import csv
import os

import numpy as np
import pytest
import torch

from cldm.cldm import ControlLDM
from cldm.fidelity import Scorers, evaluate, load_samples
from cldm.loader import load_model
from cldm.model import create_model, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained
from ldm.checkpoint import UserError
from ldm.modules.ema import EMA_KEY, OptimizerEma
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")
EMA = ["--ema_decay", "0.9", "--seed", "0", "--sd_locked", "False", "--learning_rate", "1e-3", "--logger_freq",
       "100"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), n=16, size=32, seed=0)  # 4 steps an epoch at batch 4


def train(data_root, out, *extra):
    from tutorial_train import main
    start = [] if "--resume" in extra else ["--resume_path", "none"]
    return main(["--config", TINY, *start, "--data_root", str(data_root), "--batch_size", "4", "--output_dir",
                 str(out), "--sample_steps", "2", "--accelerator", "cpu", "--devices", "1", *map(str, extra)])


def averages(trainer) -> dict[str, torch.Tensor]:
    """The EMA of each trained tensor, by parameter name."""
    names = {p: n for n, p in trainer.lightning_module.named_parameters()}
    return {names[p]: ema.clone() for p, ema in OptimizerEma.averaged(trainer.optimizers[0])}


def test_the_average_follows_the_originals_formula_and_swaps_exactly():
    torch.manual_seed(0)
    w, frozen_out = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2))
    optimizer = torch.optim.SGD([w, frozen_out], lr=0.3)
    OptimizerEma(0.5).attach(optimizer)
    weights, target = [w.detach().clone()], torch.randn(5)
    for _ in range(12):
        optimizer.zero_grad()
        ((w - target) ** 2).sum().backward()  # frozen_out gets no gradient: never updated, no average
        optimizer.step()
        weights.append(w.detach().clone())
    # LitEma's: from the weights before the first update; decay min(0.5, (1 + n) / (10 + n)) at the n-th update
    expected = weights[0].double()
    for n, weight in enumerate(weights[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * weight.double()
    state = optimizer.state[w]
    assert state["ema_updates"] == 12 and EMA_KEY not in optimizer.state.get(frozen_out, {})
    torch.testing.assert_close(state[EMA_KEY].double(), expected, rtol=1e-6, atol=1e-7)

    raw, average = w.detach().clone(), state[EMA_KEY].clone()
    with OptimizerEma.swapped(optimizer):
        assert torch.equal(w, average) and torch.equal(state[EMA_KEY], raw)
    assert torch.equal(w, raw) and torch.equal(state[EMA_KEY], average)
    assert OptimizerEma.drop(optimizer) == 1 and EMA_KEY not in optimizer.state[w]
    with pytest.raises(ValueError, match="ema_decay must be between 0 and 1"):
        OptimizerEma(1.0)


def kill_at(monkeypatch, step: int) -> None:
    """End the next training run without a word at the start of global step `step`, as a kill -9 would: the
    checkpoints saved before it stay, nothing after it is saved."""
    def killed(self, batch, batch_idx):
        if self.global_step == step:
            raise RuntimeError("killed")
    monkeypatch.setattr(ControlLDM, "on_train_batch_start", killed, raising=False)


def test_a_killed_and_resumed_runs_average_equals_an_uninterrupted_ones(data_root, tmp_path, monkeypatch):
    whole = train(data_root, tmp_path / "whole", "--max_steps", "8", "--checkpoint_every", "4", *EMA)
    reference, weights = averages(whole), whole.lightning_module.state_dict()
    assert len(reference) == len(whole.lightning_module.trainable_parameters())
    # killed within epoch 1 and resumed from the end of epoch 0 (step 4), or from within epoch 1 (step 6)
    for every, killed in ((4, 6), (2, 7)):
        out = tmp_path / f"every_{every}"
        kill_at(monkeypatch, killed)
        with pytest.raises(RuntimeError, match="killed"):
            train(data_root, out, "--max_steps", "8", "--checkpoint_every", every, *EMA)
        monkeypatch.undo()
        saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == killed - killed % every
        resumed = train(data_root, out, "--resume", out / "checkpoints" / "last.ckpt", "--max_steps", "8",
                        "--checkpoint_every", every, "--force", *EMA)
        assert resumed.global_step == 8
        assert all(torch.equal(v, weights[k]) for k, v in resumed.lightning_module.state_dict().items())
        result = averages(resumed)
        assert result.keys() == reference.keys() and all(torch.equal(result[k], reference[k]) for k in result)


def test_the_export_holds_the_average_or_the_raw_weights_by_option(data_root, tmp_path):
    out = tmp_path / "run"
    trainer = train(data_root, out, "--max_steps", "3", "--ema_export", "both", *EMA)
    model = trainer.lightning_module
    average, raw = averages(trainer), model.state_dict()
    export, raw_export = load_state_dict(out / "control_model.safetensors"), load_state_dict(
        out / "control_model_raw.safetensors")
    assert export.keys() == raw_export.keys() == set(model.control_state_dict())
    trained = [k for k in export if k in average]
    assert trained and all(torch.equal(export[k], average[k]) for k in trained)
    assert all(torch.equal(raw_export[k], raw[k]) for k in raw_export)
    assert any(not torch.equal(average[k], raw[k]) for k in trained)
    # a tensor that never trained (no gradient reaches it) is exported as it is
    assert all(torch.equal(export[k], raw[k]) for k in export if k not in average)
    # tool_convert_diffusers to-diffusers of the run's checkpoint converts what the export holds
    from cldm.diffusers_convert import convert_to_diffusers
    folders = [convert_to_diffusers(source, tmp_path / name, TINY) for source, name in (
        (out / "checkpoints" / "last.ckpt", "from_checkpoint"), (out / "control_model.safetensors", "from_export"))]
    converted = [load_state_dict(folder / "diffusion_pytorch_model.safetensors") for folder in folders]
    assert converted[0].keys() == converted[1].keys() and all(torch.equal(v, converted[1][k])
                                                              for k, v in converted[0].items())

    raw_only = train(data_root, tmp_path / "raw", "--max_steps", "1", "--ema_export", "raw", *EMA)
    assert all(torch.equal(v, raw_only.lightning_module.state_dict()[k])
               for k, v in load_state_dict(tmp_path / "raw" / "control_model.safetensors").items())
    with pytest.raises(UserError, match="--ema_export raw is given, but the run keeps no EMA"):
        train(data_root, tmp_path / "no_ema", "--max_steps", "1", "--ema_export", "raw")
    with pytest.raises(UserError, match="--ema_decay 0.9 with --use_ema False would do nothing"):
        train(data_root, tmp_path / "no_ema", "--max_steps", "1", "--use_ema", "False", "--ema_decay", "0.9")


def model_with(trainer, averaged: bool) -> ControlLDM:
    """A fresh model (no trainer, so no EMA of its own) with the trained run's average or raw weights."""
    model = create_model(TINY)
    state = trainer.lightning_module.state_dict()
    model.load_state_dict({**state, **(averages(trainer) if averaged else {})})
    return model.eval()


def test_logged_and_validation_samples_are_of_the_average(data_root, tmp_path):
    held_out = make_fill50k(tmp_path / "held_out", n=2, size=32, seed=1)
    trainer = train(data_root, tmp_path / "run", "--max_steps", "3", "--val_data", held_out, "--val_samples", "2",
                    "--val_steps", "2", "--val_metrics", "canny", "ssim", "--log_every_n_steps", "1",
                    "--ema_decay", "0.5", "--seed", "0", "--sd_locked", "False", "--learning_rate", "1e-2",
                    "--logger_freq", "100")
    model = trainer.lightning_module.eval()
    batch = {"jpg": torch.rand(2, 32, 32, 3) * 2 - 1, "hint": torch.rand(2, 32, 32, 3), "txt": ["a", "b"]}
    logged = model.log_images(batch, N=2, ddim_steps=2)["samples_cfg_scale_9.00"]
    assert torch.equal(logged, model_with(trainer, True).log_images(batch, N=2, ddim_steps=2)[
        "samples_cfg_scale_9.00"])
    assert not torch.allclose(logged, model_with(trainer, False).log_images(batch, N=2, ddim_steps=2)[
        "samples_cfg_scale_9.00"], atol=1e-3)

    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        last = [r for r in csv.DictReader(f) if r.get("val/ssim") and int(r["step"]) == 3][0]
    prompts, hints, targets = load_samples(held_out, 2)
    run = dict(seed=0, steps=2, guidance_scale=3.0, batch_size=4, sampler="ddim")
    scores = {averaged: evaluate(model_with(trainer, averaged), prompts, hints, targets, Scorers(["canny", "ssim"]),
                                 **run)[0]["control"] for averaged in (True, False)}
    assert float(last["val/ssim"]) == pytest.approx(scores[True]["ssim"].mean(), abs=1e-12)
    assert float(last["val/canny_f1"]) == pytest.approx(scores[True]["canny_f1"].mean(), abs=1e-12)
    assert not np.allclose(scores[True]["ssim"], scores[False]["ssim"], atol=1e-6)

    # a checkpoint of the run (a best one, chosen by these values) gives tool_eval_control the weights they scored;
    # a training started from it (--resume_path) gets the raw ones, as a resumed run does
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    scored, raw = model_with(trainer, True).state_dict(), model_with(trainer, False).state_dict()
    for initial, expected in ((False, scored), (True, raw)):
        loaded = load_model(TINY, [last], initial=initial)[0].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.items())


@pytest.mark.parametrize("config", ["cldm_tiny_lora.yaml", "cldm_tiny_lllite.yaml"])
def test_the_average_covers_what_each_mode_trains(data_root, tmp_path, config):
    from tutorial_train import main
    initial = model_as_trained(ROOT / "models" / config).state_dict()  # a UNet that passes gradients back
    save_state_dict(initial, tmp_path / "ini.ckpt")
    trainer = main(["--config", str(ROOT / "models" / config), "--resume_path", str(tmp_path / "ini.ckpt"),
                    "--data_root", str(data_root), "--batch_size", "4", "--output_dir", str(tmp_path / "run"),
                    "--accelerator", "cpu", "--devices", "1", "--max_steps", "2", "--logger_freq", "100",
                    "--ema_decay", "0.9", "--learning_rate", "1e-3"])
    model = trainer.lightning_module
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n in trained if not torch.equal(initial[n], model.state_dict()[n])}
    assert moved and set(averages(trainer)) == moved  # each tensor the optimizer moved, and nothing frozen


def test_turning_the_ema_on_or_off_on_resume(data_root, tmp_path, caplog):
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = ["--seed", "0", "--sd_locked", "False", "--learning_rate", "1e-3", "--logger_freq", "100", "--force"]
    train(data_root, out, "--max_steps", "2", *common)
    before = load_state_dict(last)
    with caplog.at_level("INFO"):
        on = train(data_root, out, "--resume", last, "--max_steps", "3", "--ema_decay", "0.9", *common)
    assert "Resuming with use_ema = True (from the command line); the checkpoint's run had False" in caplog.messages
    after, average = on.lightning_module.state_dict(), averages(on)
    decay = 2 / 11  # min(0.9, (1 + n) / (10 + n)) at the first update: the average starts at step 2's weights
    for name, value in average.items():
        torch.testing.assert_close(value, decay * before[name] + (1 - decay) * after[name], rtol=1e-5, atol=1e-7)
    assert any(EMA_KEY in s for s in torch.load(last, weights_only=True)["optimizer_states"][0]["state"].values())
    caplog.clear()
    with caplog.at_level("WARNING"):  # resumed without the option: the config's use_ema False, said so
        train(data_root, out, "--resume", last, "--max_steps", "4", *common)
    assert "Resuming with use_ema = False (from the config); the checkpoint's run had True (pass --use_ema True to " \
           "keep it)" in caplog.messages
    assert any(m.startswith("use_ema is off: the averages of ") for m in caplog.messages)
    assert not any(EMA_KEY in s for s in torch.load(last, weights_only=True)["optimizer_states"][0]["state"].values())


def test_a_skipped_nonfinite_step_leaves_the_average_as_it_leaves_the_weights(data_root, tmp_path, monkeypatch):
    """--max_nan_steps: Lightning still calls the optimizer's step for a skipped step (no tensor has a gradient), so
    its hooks run; the average must neither move towards the unchanged weights nor count an update."""
    weights: list[dict[str, torch.Tensor]] = []  # the trained tensors before step 0, then after each step
    shared_step = ControlLDM.shared_step

    def nan_at_step_2(self, batch, **kwargs):
        loss, terms = shared_step(self, batch, **kwargs)
        return (loss * float("nan") if self.global_step == 2 else loss), terms

    def record(self, *args):
        weights.append({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad})

    def record_first(self, *args):
        if not weights:
            record(self)
    monkeypatch.setattr(ControlLDM, "shared_step", nan_at_step_2)
    monkeypatch.setattr(ControlLDM, "on_train_batch_start", record_first, raising=False)
    monkeypatch.setattr(ControlLDM, "on_train_batch_end", record, raising=False)
    trainer = train(data_root, tmp_path / "run", "--max_steps", "4", "--max_nan_steps", "1", *EMA)
    assert trainer.global_step == 4 and trainer.lightning_module.nonfinite_steps == 1 and len(weights) == 5
    average = averages(trainer)
    assert average and all(torch.equal(weights[2][n], weights[3][n]) for n in average)  # step 2 moved nothing
    updates = {}
    for name, value in average.items():  # LitEma's formula over the applied steps 0, 1 and 3, from the first to move
        start, expected, n = weights[0][name], None, 0
        for after in (weights[1][name], weights[2][name], weights[4][name]):
            if expected is None and torch.equal(after, start):
                continue  # not updated yet (a zero gradient, behind the zero output layer)
            expected, n = start.double() if expected is None else expected, n + 1
            decay = min(0.9, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * after.double()
        updates[name] = n
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
    names = {p: n for n, p in trainer.lightning_module.named_parameters()}
    states = trainer.optimizers[0].state
    assert 3 in updates.values() and all(states[p]["ema_updates"] == updates[names[p]]
                                         for p, _ in OptimizerEma.averaged(trainer.optimizers[0]))

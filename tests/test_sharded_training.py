"""Sharded training (tutorial_train --strategy fsdp, FSDP2) on two CPU processes (gloo): the tiny SDXL ControlNet
trains, is killed, resumes from its sharded checkpoint and exports, and its loss curve is the curve of one
process training on the same global batch; tool_eval_control.py reads the sharded checkpoint."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cldm.model import save_state_dict
from conftest import ROOT, model_as_trained
from ldm.checkpoint import UserError, load_state_dict, read_checkpoint
from tool_make_fill50k import make_fill50k

TINY_XL = str(ROOT / "models" / "cldm_tiny_xl.yaml")
N = 4  # samples: 2 steps an epoch at a global batch of 2


def per_sample_step(shared_step):
    """ControlLDM.shared_step with each sample's latent, timestep and noise drawn from its own seed (its caption's
    number and the step), so that a loss depends on the weights and the samples alone, not on how a batch is split
    across ranks; records each rank's loss per step in $LOSSES.<rank>, and dies (os._exit, like kill -9) at the
    start of step $DIE_AT."""

    def step(self, batch, **kwargs):
        if not self.training:  # the held-out loss of a validation
            return shared_step(self, batch, **kwargs)
        if self.global_step == int(os.environ.get("DIE_AT", -1)):
            os._exit(9)
        results = []
        for i, caption in enumerate(batch["txt"]):
            torch.manual_seed(int(caption.split()[-1]) * 1000 + self.global_step)
            results.append(shared_step(self, {k: v[i:i + 1] for k, v in batch.items()}, **kwargs))
        loss = sum(r[0] for r in results) / len(results)
        with open(f"{os.environ['LOSSES']}.{self.global_rank}", "a") as f:
            f.write(json.dumps({"step": self.global_step, "loss": loss.item()}) + "\n")
        return loss, {k: sum(r[1][k] for r in results) / len(results) for k in results[0][1]}
    return step


DRIVER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from cldm.cldm import ControlLDM
    from test_sharded_training import per_sample_step
    import tutorial_train

    ControlLDM.shared_step = per_sample_step(ControlLDM.shared_step)
    tutorial_train.main(sys.argv[1:])
""")


def numbered(root):
    """Captions "sample i", whose number seeds the sample's draws (per_sample_step)."""
    lines = [json.loads(line) for line in (root / "prompt.json").read_text().splitlines()]
    (root / "prompt.json").write_text("".join(json.dumps({**r, "prompt": f"sample {i}"}) + "\n"
                                              for i, r in enumerate(lines)))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    train = numbered(make_fill50k(root / "data", n=N, size=64, seed=0))
    return train, make_fill50k(root / "held", n=2, size=64, seed=1)


def train_args(data, out, processes, *extra):
    """Validated every 2 steps, the best checkpoint by the held-out loss kept."""
    start = [] if "--resume" in extra else ["--resume_path", "none"]
    train, held_out = data
    return ["--config", TINY_XL, *start, "--sd_locked", "False", "--data_root", str(train), "--output_dir", str(out),
            "--val_data", str(held_out), "--val_every", "2", "--val_samples", "2", "--val_steps", "1",
            "--keep_best", "1", "--monitor", "val/loss_simple",
            "--batch_size", str(2 // processes), "--devices", str(processes), "--accelerator", "cpu",
            "--max_steps", "4", "--checkpoint_every", "2", "--logger_freq", "1000", "--seed", "0",
            "--ema_decay", "0.5", "--ema_export", "both", *extra]


def run_two(tmp_path, data, out, losses, *extra, die_at=None):
    """tutorial_train --strategy fsdp on two processes (Lightning launches the second)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOSSES": str(tmp_path / losses),
           **({"DIE_AT": str(die_at)} if die_at is not None else {})}
    return subprocess.run([sys.executable, str(script), *train_args(data, out, 2, "--strategy", "fsdp", *extra)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def validated(logs) -> dict[int, dict[str, float]]:
    """step -> the val/* values of every run logged under `logs` (metrics.csv of each version)."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(logs.glob("version_*/metrics.csv")):
        for r in csv.DictReader(open(path)):
            values = {k: float(v) for k, v in r.items() if k.startswith("val/") and v}
            if values:
                rows.setdefault(int(r["step"]), {}).update(values)
    return rows


def curve(path, ranks) -> dict[int, float]:
    """step -> the loss of the global batch: the mean over ranks of each rank's mean."""
    per_step: dict[int, list[float]] = {}
    for rank in ranks:
        for line in open(f"{path}.{rank}"):
            record = json.loads(line)
            per_step.setdefault(record["step"], []).append(record["loss"])
    assert all(len(v) == len(ranks) for v in per_step.values()), per_step
    return {step: float(np.mean(v)) for step, v in sorted(per_step.items())}


@pytest.mark.ddp
def test_fsdp_on_two_processes_resumes_and_exports_what_one_process_trains(data, tmp_path, monkeypatch):
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    first = run_two(tmp_path, data, sharded, "first", die_at=3)
    assert first.returncode == 9, first.stderr[-3000:]
    last = sharded / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file() and read_checkpoint(last, location="meta")["global_step"] == 2
    resumed = run_two(tmp_path, data, sharded, "resumed", "--resume", str(last), "--force")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    from cldm.cldm import ControlLDM
    from tutorial_train import main
    monkeypatch.setattr(ControlLDM, "shared_step", per_sample_step(ControlLDM.shared_step))
    monkeypatch.setenv("LOSSES", str(tmp_path / "single"))
    main(train_args(data, single, 1))

    before, after = curve(tmp_path / "first", (0, 1)), curve(tmp_path / "resumed", (0, 1))
    assert sorted(before) == [0, 1, 2] and sorted(after) == [2, 3]
    assert after[2] == pytest.approx(before[2], rel=1e-6)  # the resumed run starts where the killed one was
    one_process = list(curve(tmp_path / "single", (0,)).values())
    np.testing.assert_allclose([before[0], before[1], after[2], after[3]], one_process, rtol=1e-5)
    assert len(set(np.round(one_process, 4))) == 4  # the loss moves: the steps are not all alike

    # validated on every rank in step (rank zero scoring): the same held-out loss, the same best checkpoint
    val = [validated(out / "lightning_logs") for out in (sharded, single)]
    assert sorted(val[0]) == sorted(val[1]) == [0, 2, 4]
    for step in (2, 4):
        assert val[0][step]["val/loss_simple"] == pytest.approx(val[1][step]["val/loss_simple"], rel=1e-5)
    best = [sorted(p.name for p in (out / "checkpoints" / "best").iterdir()) for out in (sharded, single)]
    assert len(best[0]) == 1 and [name[:11] for name in best[0]] == [name[:11] for name in best[1]]
    assert (sharded / "checkpoints" / "best" / best[0][0] / ".metadata").is_file()  # a sharded one

    # the exports (the weights and their EMA, sharded with them) are what one process trains, to within half a
    # step of the learning rate (1e-5): gradients summed in another order, which Adam's normalisation magnifies
    # where a gradient is near zero; the raw one holds the sharded checkpoint's weights
    for name in ("control_model.safetensors", "control_model_raw.safetensors"):
        export, reference = load_file(sharded / name), load_file(single / name)
        assert export.keys() == reference.keys()
        np.testing.assert_allclose(torch.cat([export[k].flatten() for k in export]),
                                   torch.cat([reference[k].flatten() for k in export]), atol=5e-6, err_msg=name)
    export, weights = load_file(sharded / "control_model_raw.safetensors"), load_state_dict(last)
    assert all(torch.equal(export[k], weights[k]) for k in export)
    ema = load_file(sharded / "control_model.safetensors")
    assert any(not torch.equal(ema[k], export[k]) for k in export)  # the average is not the weights

    # the model loader of tool_eval_control takes the sharded checkpoint as it takes a file: the EMA of what trained
    # (what validation scored and the export holds), the raw weights as a training's initial ones
    from cldm.loader import load_model
    for initial, expected in ((False, {**weights, **ema}), (True, weights)):
        model, _ = load_model(TINY_XL, [last], initial=initial)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items() if k in weights)


@pytest.fixture
def one_process_group():
    """Sharded training in this process (one rank) opens a process group and sets its address in the
    environment; both are gone after the test, so that later tests start their own."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("config, size", [("cldm_tiny_lora.yaml", 32), ("cldm_tiny_lllite.yaml", 32),
                                          ("cldm_tiny_v21.yaml", 32), ("cldm_tiny_xl_lora.yaml", 64),
                                          ("cldm_tiny_xl_lllite.yaml", 64), ("cldm_tiny_v21_xs.yaml", 32),
                                          ("cldm_tiny_xl_xs.yaml", 64), ("cldm_tiny_xl_union.yaml", 64),
                                          ("cldm_tiny_t2i.yaml", 32), ("cldm_tiny_xl_t2i.yaml", 64)])
def test_every_mode_and_base_trains_sharded_as_unsharded(config, size, tmp_path, monkeypatch, one_process_group):
    """FSDP on one rank shards each mode's trainable tensors (every one, or shard_trainable refuses; LoRA's copy
    keeps the UNet's tied weights whole, LLLite shards modules inside the UNet's attention), trains and validates
    as training without it does."""
    from cldm.cldm import ControlLDM
    from tutorial_train import main
    data = numbered(make_fill50k(tmp_path / "data", n=4, size=size, seed=0))
    held_out = make_fill50k(tmp_path / "held", n=1, size=size, seed=1)
    model = model_as_trained(ROOT / "models" / config)
    initial, before = save_state_dict(model.state_dict(), tmp_path / "ini.ckpt"), model.control_state_dict()
    monkeypatch.setattr(ControlLDM, "shared_step", per_sample_step(ControlLDM.shared_step))
    monkeypatch.setenv("LOSSES", str(tmp_path / "losses"))
    exports, validations = {}, {}
    for strategy in ("fsdp", "auto"):
        out = tmp_path / strategy
        main(["--config", str(ROOT / "models" / config), "--resume_path", str(initial), "--data_root", str(data),
              "--batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3", "--output_dir", str(out),
              "--strategy", strategy, "--devices", "1", "--accelerator", "cpu", "--logger_freq", "1000",
              "--val_data", str(held_out), "--val_samples", "1", "--val_steps", "1", "--val_metrics", "canny"])
        exports[strategy] = load_file(out / "control_model.safetensors")
        validations[strategy] = validated(out / "lightning_logs")
    sharded, plain = exports["fsdp"], exports["auto"]
    assert sharded.keys() == plain.keys() == before.keys()
    for key in sharded:
        # 1% of one step at lr 1e-3: Adam magnifies float32 summation-order differences where a gradient is near
        # zero (one element of the T2I-Adapter's 1x1 convolutions, 5e-6 off); a mode sharded wrongly is a step off
        np.testing.assert_allclose(sharded[key], plain[key], atol=1e-5, err_msg=key)
    assert any(not torch.allclose(plain[k], before[k]) for k in plain)  # it trained
    # validated at the start and the end as without sharding (the hint block's unit runs alone there first)
    assert sorted(validations["fsdp"]) == sorted(validations["auto"]) == [0, 2]
    for name, value in validations["auto"][2].items():
        if name != "val/seconds":
            assert validations["fsdp"][2][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_a_sharded_checkpoint_resumes_under_fsdp_with_what_can_carry_over(tmp_path, one_process_group):
    from tutorial_train import main
    data = make_fill50k(tmp_path / "data", n=4, size=32, seed=0)
    out = tmp_path / "run"

    def train(*extra):
        return main(["--config", str(ROOT / "models" / "cldm_tiny.yaml"), "--data_root", str(data), "--batch_size",
                     "2", "--output_dir", str(out), "--devices", "1", "--accelerator", "cpu", "--logger_freq", "1000",
                     *extra])

    train("--resume_path", "none", "--sd_locked", "False", "--max_steps", "1", "--strategy", "fsdp")
    last = out / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="is a sharded checkpoint .of --strategy fsdp., which only that strategy"):
        train("--resume", str(last), "--sd_locked", "False", "--max_steps", "2", "--force")
    with pytest.raises(UserError, match="covers the .* tensors it trained, this run trains"):
        train("--resume", str(last), "--sd_locked", "True", "--max_steps", "2", "--strategy", "fsdp", "--force")
    trainer = train("--resume", str(last), "--sd_locked", "False", "--max_steps", "2", "--strategy", "fsdp",
                    "--learning_rate", "3e-5", "--force")
    assert trainer.global_step == 2
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [pytest.approx(3e-5)]  # restored 1e-5, rescaled
    # the same checkpoint under the offloading strategy (the 24 GB recipe): the shards and their moments on the CPU
    trainer = train("--resume", str(last), "--sd_locked", "False", "--max_steps", "3", "--strategy",
                    "fsdp_cpu_offload", "--force")
    assert trainer.global_step == 3
    from torch.distributed.tensor import DTensor
    states = trainer.optimizers[0].state
    assert states and all(isinstance(p, DTensor) and s["exp_avg"].device.type == "cpu" for p, s in states.items())


def test_strategies_that_cannot_run_as_asked_are_refused(monkeypatch):
    import importlib.util

    from cldm.sharding import check_strategy
    with pytest.raises(UserError, match="8-bit AdamW cannot update FSDP's sharded parameters"):
        check_strategy("fsdp", "cpu", "adamw8bit")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "deepspeed" else find_spec(name))
    with pytest.raises(UserError, match="needs DeepSpeed"):
        check_strategy("deepspeed_stage_2", "gpu", "adamw")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "deepspeed" else find_spec(name))
    with pytest.raises(UserError, match="runs on CUDA GPUs only"):
        check_strategy("deepspeed_stage_3_offload", "cpu", "adamw")
    check_strategy("ddp", "cpu", "adamw8bit")

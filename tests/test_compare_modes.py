"""The mode comparison (cldm/bench/comparison.py, benchmarks/compare_modes.py): every registered mode has a row, and
the command runs end to end on the demo's base with a couple of modes and a few steps."""

import json
import shutil

import cv2
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cldm.bench import comparison
from cldm.bench.comparison import COMPARED, family_modes, first_above, train_argv, validation_curve
from cldm.modes import MODES
from conftest import ROOT
from ldm.checkpoint import UserError

DEMO = ROOT / "models" / "cldm_demo.yaml"


def test_every_registered_mode_is_compared():
    compared = {row.mode.name for row in COMPARED}
    missing = [mode.name for mode in MODES if mode.name not in compared]
    assert not missing, f"add a ComparedMode row for {missing} to COMPARED in cldm/bench/comparison.py"


def test_validation_curve_and_the_first_step_above_the_threshold(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss_step,val/fill_iou,val/fill_iou_no_control,val/seconds\n"
                   "0,0,,0.20,0.22,3.0\n0,9,0.1,,,\n0,10,,0.45,0.21,2.5\n0,20,,0.61,0.23,2.0\n0,30,,0.55,0.22,2.0\n")
    curve, seconds = validation_curve(csv)
    assert curve == [(0, 0.20, 0.22), (10, 0.45, 0.21), (20, 0.61, 0.23), (30, 0.55, 0.22)]
    assert seconds == pytest.approx(9.5)
    assert first_above(curve, 0.5) == 20 and first_above(curve, 0.45) == 20 and first_above(curve, 0.7) is None
    csv.write_text("epoch,step,train/loss_step\n0,9,0.1\n")
    with pytest.raises(ValueError, match="holds no val/fill_iou"):
        validation_curve(csv)


def test_each_row_trains_with_its_settings_on_its_config(tmp_path):
    only_mid = comparison.BY_NAME["only_mid_control"]
    sizes = {k: v for k, v in comparison.FAST.items() if k != "reward_steps"}
    plan = comparison.Plan(str(DEMO), None, **sizes, guidance_scale=3.0, threshold=0.5, precision="32",
                           device="cpu")
    argv = train_argv(only_mid.config(DEMO), "none", only_mid.settings, plan, tmp_path, tmp_path, tmp_path)
    assert argv[argv.index("--only_mid_control") + 1] == "True" and argv[argv.index("--sd_locked") + 1] == "True"
    assert argv[argv.index("--max_steps") + 1] == "2" and argv[argv.index("--val_every") + 1] == "1"
    assert comparison.BY_NAME["lllite"].config(DEMO).name == "cldm_demo_lllite.yaml"
    # a family config of another mode than its row's is refused by name
    family = tmp_path / "fam"
    family.mkdir()
    shutil.copy(DEMO, family / "cldm_demo.yaml")
    shutil.copy(ROOT / "models" / "cldm_demo_t2i.yaml", family / "cldm_demo_lora.yaml")
    with pytest.raises(UserError, match="cldm_demo_lora.yaml builds a t2i-adapter model, not the control-lora"):
        family_modes(family / "cldm_demo.yaml", ["sd_locked", "lora"])
    modes, left_out = family_modes(family / "cldm_demo.yaml", ["sd_locked", "lllite"])
    assert [m.name for m in modes] == ["sd_locked"] and "cldm_demo_lllite.yaml" in left_out["lllite"]


def test_every_compared_config_sets_its_learning_rate():
    """A demo-family config without one trains at ControlLDM's default 1e-5, ten times below the demo's."""
    modes, left_out = family_modes(DEMO, list(comparison.BY_NAME))
    assert not left_out
    for mode in modes:
        assert "learning_rate" in OmegaConf.load(mode.config(DEMO)).model.params, mode.name


def test_the_comparison_runs_end_to_end(tmp_path, caplog):
    """Two modes (a ControlNet copied from the base, a T2I-Adapter from scratch) and one the family lacks, a few
    steps each: the folder is written whole, its figures are those of the files the runs wrote."""
    family = tmp_path / "models"
    family.mkdir()
    for name in ("cldm_demo.yaml", "cldm_demo_t2i.yaml"):
        shutil.copy(ROOT / "models" / name, family / name)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--fast", "--base_config", str(family / "cldm_demo.yaml"), "--base",
            str(ROOT / "models" / "demo_base" / "demo_base.safetensors"), "--modes", "full", "t2i", "lora",
            "--work_dir", str(work), "--out", str(out), "--device", "cpu", "--reward_max_t", "999"]
    summary = comparison.main(argv)

    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "fidelity.png", "results.json"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert [m["name"] for m in summary["modes"]] == ["full", "t2i"]
    assert "no " in summary["left_out"]["lora"] and "cldm_demo_lora.yaml" in summary["left_out"]["lora"]
    table = (out / "comparison.md").read_text()
    assert "| ControlNet, full (sd_locked=False) | cldm_demo.yaml |" in table and "| T2I-Adapter |" in table
    assert "| LoRA-offset (ControlLoRA v2) | left out: no " in table
    image = cv2.imread(str(out / "fidelity.png"))
    assert image is not None and image.shape[0] > 100

    for mode in summary["modes"]:
        run = work / "runs" / mode["name"]
        export = load_file(run / "control_model.safetensors")
        assert mode["file_bytes_fp32"] == 4 * sum(t.numel() for t in export.values())
        assert mode["static_bytes"] > 0 and mode["peak_bytes"] > mode["static_bytes"]
        assert mode["seconds_per_step"] > 0 and mode["cpu_seconds_per_step"] > 0 and mode["train_seconds"] > 0
        assert [step for step, *_ in mode["curve"]] == [0, 1, 2]
        # the final evaluation of the exported file, on the same held-out samples and seeds as the last
        # validation of the training model, gives its numbers
        assert mode["final"]["control"]["mean"] == pytest.approx(mode["curve"][-1][1], abs=1e-6)
        assert mode["final"]["no_control"]["mean"] == pytest.approx(mode["curve"][-1][2], abs=1e-6)
        assert sum(mode["scores"]) / len(mode["scores"]) == pytest.approx(mode["final"]["control"]["mean"])
        assert mode["seconds"] > mode["train_seconds"]
    full = summary["modes"][0]
    # sd_locked=False: the ControlNet copy and the UNet decoder train
    model = torch.load(work / "runs" / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = sum(v.numel() for k, v in model.items()
                  if k.startswith(("control_model.", "model.diffusion_model.output_blocks.",
                                   "model.diffusion_model.out.")))
    assert full["trainable"] == trained

    # the reward phase: each run continued one step with the fill reward (every timestep rewarded) and one without
    assert "| after 1 steps with the fill reward (95% CI) | gain over the trained model |" in table
    for mode, phase in zip(summary["modes"], summary["reward_phases"]):
        assert phase["name"] == mode["name"]
        rewarded, plain = phase["rewarded"], phase["plain"]
        assert plain["weight"] == 0 and rewarded["weight"] is None
        assert rewarded["gain"]["mean"] == pytest.approx(sum(rewarded["scores"]) / 2 - sum(mode["scores"]) / 2)
        phase_dir = work / "runs" / mode["name"] / "reward"
        with_reward, without = (load_file(phase_dir / kind / "control_model.safetensors") for kind in ("fill", "plain"))
        assert any(not torch.equal(with_reward[k], without[k]) for k in without)  # the reward term acted
    assert summary["modes"][1]["name"] == "t2i" and summary["reward_phases"][1]["rewarded"]["learning_rate"] == \
        pytest.approx(1e-4)  # 0.1 times the T2I-Adapter config's 1e-3

    with pytest.raises(UserError, match="already exists"):
        comparison.main(argv)
    caplog.clear()
    with caplog.at_level("INFO"):
        again = comparison.main([*argv, "--force"])  # the same plan: the finished runs are reused, not retrained
    assert caplog.text.count("reusing the finished run") == 2 and caplog.text.count("reusing the finished reward") == 2
    assert again["modes"] == json.loads(json.dumps(summary["modes"]))
    edited = family / "cldm_demo_t2i.yaml"
    edited.write_text(edited.read_text() + "# edited\n")
    caplog.clear()
    with caplog.at_level("INFO"):
        without_reward = comparison.main([*argv, "--force", "--reward_steps", "0"])
    assert caplog.text.count("reusing the finished run") == 1  # the edited config's mode is trained again
    assert without_reward["reward_phases"] == [] and "Reward phase" not in (out / "comparison.md").read_text()

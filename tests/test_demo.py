"""The offline demo: `demo.py --fast` end to end, the fidelity metrics on cases with known answers, the base."""

import importlib
import json
import math
import shlex

import cv2
import numpy as np
import pytest
import torch

import cldm.fidelity as ev
from cldm.data.circles import render, sample_circle
from cldm.model import create_model, load_checkpoint
from cldm.pipeline import sample
from conftest import ROOT, randomize_zero_convs

DEMO_CONFIG = ROOT / "models" / "cldm_demo.yaml"
BASE = ROOT / "models" / "demo_base" / "demo_base.safetensors"


def circle(seed: int = 0, size: int = 64) -> dict:
    return sample_circle(np.random.default_rng([seed, 0]), size)


def test_demo_fast_writes_report_and_metrics(tmp_path, monkeypatch):
    import demo
    from gradio_apps import serving
    out = tmp_path / "demo_out"
    metrics = demo.main(["--fast", "--out", str(out), "--threads", "1"])
    for name in ("report.html", "metrics.json", "samples.png", "eval.json", "control_demo_ini.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["goal"] == metrics["goal"] and set(saved["goal"]) >= {"reached", "fill_iou_control", "ratio"}
    assert {"fill_iou", "fill_color_acc", "fill_floor_iou", "canny_f1", "ssim"} <= set(saved["eval"]["metrics"])
    assert [c.split()[1] for c in saved["commands"]] == ["tool_make_fill50k.py", "tool_make_fill50k.py",
                                                         "tool_add_control.py", "tutorial_train.py",
                                                         "tool_eval_control.py", "tutorial_train.py",
                                                         "tool_eval_control.py"]
    # the reward phase continues the run with the fill reward and is scored on the same samples, paired
    assert "--reward fill" in saved["commands"][5] and "--resume" in saved["commands"][5]
    fill = saved["reward"]["compared"]["fill_iou"]
    assert fill["before"] == saved["reward"]["before"]["fill_iou"]["control"]["mean"]
    assert fill["after"] == saved["eval"]["metrics"]["fill_iou"]["control"]["mean"]
    assert "Reward fine-tuning" in (out / "report.html").read_text()
    assert saved["app_command"].split("--ckpt ")[1].startswith(str(out / "reward" / "control_model.safetensors"))
    assert len(saved["loss_curve"]) == 3
    assert list((out / "train" / "image_log" / "train").glob("samples_cfg_scale_*_gs-000003_*.png"))
    assert "data:image/png;base64," in (out / "report.html").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        demo.main(["--fast", "--out", str(out)])
    # the command it prints opens the interactive scribble app on the model it trained
    argv = shlex.split(saved["app_command"])
    assert argv[:2] == ["python", "gradio_apps/gradio_scribble2image_interactive.py"]
    assert saved["app_command"] in (out / "report.html").read_text()
    served = []
    monkeypatch.setattr(serving, "launch", lambda page, args, block=True: served.append(page))
    monkeypatch.chdir(ROOT)
    assert serving.main(importlib.import_module("gradio_apps.gradio_scribble2image_interactive").APP, argv[2:]) == 0
    scale = [c["props"] for c in served[0].config["components"] if c["props"].get("label") == "Guidance Scale"]
    assert [s["value"] for s in scale] == [demo.FAST.guidance_scale]


def test_iou_and_edge_f1_known_answers():
    a = np.zeros((32, 32), bool)
    a[4:12, 4:12] = True
    b = np.zeros_like(a)
    b[20:28, 20:28] = True
    assert ev.iou(a, a) == 1.0 and ev.iou(a, b) == 0.0 and ev.iou(b & a, b & a) == 1.0
    half = a.copy()
    half[4:8] = False
    assert ev.iou(a, half) == 0.5
    edges = cv2.Canny(np.kron(a, np.ones((2, 2), bool)).astype(np.uint8) * 255, 100, 200) > 0
    far = np.roll(edges, 20, axis=(0, 1))
    assert ev.edge_f1(edges, edges) == 1.0
    assert ev.edge_f1(edges, far) == 0.0
    assert ev.edge_f1(edges, np.roll(edges, 1, axis=0), tolerance=2) == 1.0
    assert ev.edge_f1(edges, np.zeros_like(edges)) == 0.0


def test_fill_metric_known_answers():
    c = circle()
    hint, target = render(c, 64)
    scores = ev.score_fill(target, hint, target)
    assert scores["fill_iou"] == 1.0 and scores["fill_color_acc"] == 1.0
    disc = np.all(target == c["color"], axis=-1)
    assert scores["fill_floor_iou"] == pytest.approx(disc.mean())
    background_only = np.broadcast_to(np.array(c["background"], np.uint8), target.shape).copy()
    empty = ev.score_fill(target, hint, background_only)
    assert empty["fill_iou"] == 0.0 and empty["fill_color_acc"] == 0.0
    # the same disc moved off its target: no overlap
    moved = background_only.copy()
    cv2.circle(moved, (2, 2), 1, c["color"], -1)
    assert ev.score_fill(target, hint, moved)["fill_iou"] == 0.0
    # the fill colour is judged on the region: a disc in place but in the wrong colour fails
    wrong = target.copy()
    wrong[disc] = (np.array(c["color"]) + np.array(c["background"])) // 2
    assert ev.score_fill(target, hint, wrong)["fill_color_acc"] == 0.0


def test_disc_fit_and_canny_and_ssim_known_answers():
    _, target = render(circle(3), 64)
    region = ev.fill_region(target, np.array(circle(3)["color"]), np.array(circle(3)["background"]))
    assert ev.disc_fit_iou(region) > 0.9
    square = np.zeros((64, 64), bool)
    square[10:50, 30:34] = True
    assert ev.disc_fit_iou(square) < 0.5 and ev.disc_fit_iou(np.zeros_like(square)) == 0.0
    hint = np.repeat(ev.canny(target)[..., None], 3, axis=2)
    assert ev.score_canny(target, hint, target)["canny_f1"] == 1.0
    gray = ev.gray(target)
    assert ev.ssim(gray, gray) == pytest.approx(1.0, abs=1e-3)
    assert ev.ssim(gray, 255 - gray) < 0.5


def test_summary_is_paired():
    scores = {"control": {"m": np.array([0.5, 0.7, 0.9])}, "no_control": {"m": np.array([0.4, 0.6, 0.8])}}
    s = ev.summarize(scores)["m"]
    assert s["control"]["mean"] == pytest.approx(0.7) and s["no_control"]["mean"] == pytest.approx(0.6)
    assert s["paired_diff"]["mean"] == pytest.approx(0.1) and s["paired_diff"]["ci95"] == pytest.approx(0.0, abs=1e-9)
    # each condition's interval of the mean: 1.96 * sample std (0.2) / sqrt(3)
    assert s["control"]["ci95"] == pytest.approx(1.96 * 0.2 / 3 ** 0.5) == s["no_control"]["ci95"]
    assert math.isnan(ev.ci95(np.array([0.5])))


def test_generate_is_seeded_per_sample_and_scale_zero_equals_no_control(tiny_model):
    randomize_zero_convs(tiny_model)
    prompts = ["red circle with blue background", "blue circle with red background"]
    hints = torch.rand(2, 3, 32, 32)
    together = ev.generate(tiny_model, prompts, hints, [5, 6], steps=2)
    alone = ev.generate(tiny_model, prompts[1:], hints[1:], [6], steps=2)
    # the same noise, whatever the batch; float rounding of batched kernels may move a pixel by one level
    assert np.abs(together[1].astype(int) - alone[0]).max() <= 1
    without = ev.generate(tiny_model, prompts, None, [5, 6], steps=2)
    assert not np.array_equal(together, without)
    zero = sample(tiny_model, prompts, units=[tiny_model.unit(hints, strength=0.0)], steps=2, cfg_scale=3.0,
                  seed=[5, 6])
    assert np.array_equal(zero.images, without)


def test_lr_multipliers_group_the_trainable_parameters(tiny_model):
    tiny_model.learning_rate = 1e-4
    tiny_model.lr_multipliers = {"control_model.zero_convs.": 10.0, "control_model.input_hint_block.": 10.0}
    opt = tiny_model.configure_optimizers()
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    boosted = {id(p) for n, p in tiny_model.named_parameters()
               if n.startswith(("control_model.zero_convs.", "control_model.input_hint_block."))}
    assert set(by_lr) == {1e-4, 1e-3} and by_lr[1e-3] == boosted
    assert set().union(*by_lr.values()) == set(map(id, tiny_model.trainable_parameters()))


def test_shipped_base_fits_the_demo_config_and_is_small():
    assert BASE.stat().st_size < 20 * 2 ** 20
    model = create_model(DEMO_CONFIG)
    report = load_checkpoint(model, BASE, strict=True, prefixes=("first_stage_model.", "cond_stage_model.",
                                                                  "model.diffusion_model."))
    assert report.ok
    assert 0.1 < float(model.scale_factor) < 10  # set from the latents, not the config's placeholder 1.0
    assert json.loads((BASE.with_suffix(".json")).read_text())["check"][0]["good_enough"]


def test_train_tiny_base_runs_end_to_end(tmp_path):
    import tool_train_tiny_base
    out = tmp_path / "base.safetensors"
    report = tool_train_tiny_base.main(["--out", str(out), "--device", "cpu", "--pool", "8", "--budget_s", "1",
                                        "--vae_steps", "2", "--steps", "2", "--vae_batch", "2", "--batch", "2",
                                        "--check_n", "2", "--check_steps", "1"])
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert report["vae"]["steps"] <= 2 and report["unet"]["steps"] <= 2
    assert set(report["check"][0]) >= {"pass_rate", "disc_iou_mean", "color_acc", "good_enough"}
    with pytest.raises(FileExistsError, match="--force"):
        tool_train_tiny_base.main(["--out", str(out), "--device", "cpu"])


def test_train_tiny_base_tokenizes_each_prompt_once_and_drops_to_the_empty_prompt():
    import tool_train_tiny_base
    model = create_model(DEMO_CONFIG)
    encoder = model.cond_stage_model
    prompts = ["red circle with blue background", "green circle", "red circle with blue background"]
    pool, empty = tool_train_tiny_base.prompt_tokens(encoder, prompts)
    assert torch.equal(pool, encoder.tokenize(prompts)) and torch.equal(empty, encoder.tokenize([""])[0])
    with torch.no_grad():  # the tokens encode as the prompts do
        assert torch.equal(encoder.encode_tokens(pool), model.get_learned_conditioning(prompts))


def test_depth_and_seg_are_skipped_without_their_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(tmp_path))
    scorers = ev.Scorers(["fill", "depth", "seg"])
    assert set(scorers.skipped) == {"depth", "seg"} and list(scorers.functions) == ["fill"]
    assert all("weights" in why for why in scorers.skipped.values())


def test_depth_rmse_and_seg_miou_known_answers(monkeypatch):
    import annotator.midas
    import annotator.uniformer
    classes = np.zeros((16, 16), np.int64)
    classes[:, 8:] = 5

    class FakeMidas:
        def __init__(self, device):
            pass

        def __call__(self, image):
            return np.full(image.shape[:2], 255, np.uint8), None

    class FakeSegmenter:
        def __init__(self, device):
            pass

        def segment(self, image):
            return classes

    monkeypatch.setattr(annotator.midas, "MidasDetector", FakeMidas)
    monkeypatch.setattr(annotator.uniformer, "UniformerDetector", FakeSegmenter)
    image = np.zeros((16, 16, 3), np.uint8)
    depth = ev.Scorers(["depth"])
    assert depth(image, np.full_like(image, 255), image)["depth_rmse"] == 0.0
    assert depth(image, np.zeros_like(image), image)["depth_rmse"] == 1.0
    seg = ev.Scorers(["seg"])
    assert seg(image, annotator.uniformer.colorize(classes), image)["seg_miou"] == 1.0
    assert seg(image, annotator.uniformer.colorize(5 - classes), image)["seg_miou"] == 0.0


def stat(*cpus: tuple[int, int, int]) -> str:
    """A /proc/stat of CPUs given as (busy, idle, iowait) clock ticks."""
    total = [sum(c[i] for c in cpus) for i in range(3)]
    lines = [f"cpu  {total[0]} 0 0 {total[1]} {total[2]} 0 0 0 0 0"]
    lines += [f"cpu{i} {busy // 2} 3 {busy - busy // 2 - 3} {idle} {iowait} 0 0 0 0 0"
              for i, (busy, idle, iowait) in enumerate(cpus)]
    return "\n".join(lines + ["intr 12345 0 0", "ctxt 999", "btime 1700000000", "procs_running 3"]) + "\n"


def test_threads_are_the_cores_idle_between_two_stat_readings():
    import demo
    before = stat((1000, 5000, 10), (2000, 4000, 20))
    # over 100 ticks each: cpu0 busy 95 (idle 5), cpu1 idle 90 and waiting on I/O 10 (an idle core)
    after = stat((1095, 5005, 10), (2000, 4090, 30))
    idle, counted = demo.idle_cores(before, after, {0, 1})
    assert counted == 2 and idle == pytest.approx(5 / 100 + 100 / 100)
    assert demo.threads_for(idle, counted) == 1
    assert demo.idle_cores(before, after, {1}) == (pytest.approx(1.0), 1)  # a process allowed on cpu1 only
    quiet = stat((1010, 5090, 10), (2005, 4095, 20))
    assert demo.threads_for(*demo.idle_cores(before, quiet, {0, 1})) == 2  # 0.9 + 0.95 idle
    busy = stat((1100, 5000, 10), (2070, 4030, 20))
    assert demo.threads_for(*demo.idle_cores(before, busy, {0, 1})) == 1  # 0.0 + 0.3 idle: still one thread
    assert demo.threads_for(2.0, 4) == 2 and demo.threads_for(3.49, 4) == 3 and demo.threads_for(3.5, 4) == 4


def test_threads_follow_the_last_second_not_the_load_average(tmp_path, monkeypatch):
    """The defect: a pip install that has just ended still holds the one-minute load average at 1.5, so two idle
    cores got one thread."""
    import demo
    path = tmp_path / "stat"
    path.write_text(stat((1000, 5000, 0), (1000, 5000, 0)))
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(demo.time, "sleep", lambda s: path.write_text(stat((1002, 5098, 0), (1001, 5099, 0))))
    threads, why = demo.pick_threads(stat=path)
    assert threads == 2
    assert why == "2.0 of the 2 cores this process may use were idle over the last 1 s"
    path.write_text(stat((1000, 5000, 0), (1000, 5000, 0)))
    monkeypatch.setattr(demo.time, "sleep", lambda s: path.write_text(stat((1060, 5040, 0), (1100, 5000, 0))))
    assert demo.pick_threads(stat=path) == (1, "0.4 of the 2 cores this process may use were idle over the last 1 s")
    assert demo.pick_threads(stat=tmp_path / "missing") == (
        2, f"all 2 cores this process may use ({tmp_path / 'missing'} does not say how busy they are)")


def test_each_command_says_its_thread_count_and_why_and_the_tool_runs_with_it(tmp_path, monkeypatch, capfd):
    """The demo's output names the threads each tool gets and the reason, and the tool's torch has that many."""
    import demo
    monkeypatch.setattr(demo, "pick_threads", lambda: (1, "0.6 of the 2 cores this process may use were idle"))
    probe = tmp_path / "probe.py"
    probe.write_text("import sys, torch; open(sys.argv[1], 'w').write(str(torch.get_num_threads()))\n")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    commands: list[str] = []
    assert demo.run_command("probe.py", [str(tmp_path / "n")], commands, None) == (
        1, "0.6 of the 2 cores this process may use were idle")
    assert (tmp_path / "n").read_text() == "1"
    assert f"$ python probe.py {tmp_path / 'n'}\n(1 torch thread: 0.6 of the 2 cores this process may use were idle)" \
        in capfd.readouterr().out
    assert demo.run_command("probe.py", [str(tmp_path / "n")], commands, 2) == (2, "--threads")
    assert (tmp_path / "n").read_text() == "2" and "(2 torch threads: --threads)" in capfd.readouterr().out

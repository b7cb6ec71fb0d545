"""Reward fine-tuning (cldm/reward.py, ControlNet++): the one-step x0 against diffusers' scheduler, the reward step's
gradient against finite differences in double precision, the gradient reaching only what each mode trains, every
reward model on known cases, and tutorial_train runs: frozen detector and VAE, weight 0 bitwise the plain run, a NaN
reward stopped by name, missing weights named, the reward phase after training."""

import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch.utils.data import default_collate

from annotator.lineart import LineartDetector
from annotator.uniformer import ADE20K_PALETTE, MEAN, NO_CLASS, STD, colorize
from annotator.util import CKPTS_ENV
from cldm.data import open_dataset
from cldm.fidelity import edge_f1, reference_fill
from cldm.model import create_model, load_state_dict, save_state_dict
from cldm.reward import (
    CannyReward,
    DepthReward,
    FillReward,
    HEDReward,
    Reward,
    SegReward,
    load_reward_model,
)
from conftest import ROOT, randomize_zero_convs, randomize_zero_init
from ldm.checkpoint import UserError
from ldm.models.diffusion.ddpm import TrainingStopped
from ldm.modules.diffusionmodules.util import GroupNorm32
from tool_make_fill50k import make_fill50k

TINY = ROOT / "models" / "cldm_tiny.yaml"
MODES = ["cldm_tiny.yaml", "cldm_tiny_lora.yaml", "cldm_tiny_lllite.yaml", "cldm_tiny_t2i.yaml", "cldm_tiny_xs.yaml",
         "cldm_tiny_union.yaml", "cldm_tiny_v21.yaml", "cldm_tiny_v21_xs.yaml", "cldm_tiny_xl.yaml",
         "cldm_tiny_xl_lora.yaml", "cldm_tiny_xl_lllite.yaml", "cldm_tiny_xl_t2i.yaml", "cldm_tiny_xl_xs.yaml",
         "cldm_tiny_xl_union.yaml"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), n=8, size=32, seed=0)


def batch_of(data_root, n: int = 4) -> dict:
    dataset = open_dataset(data_root, shuffle=False)
    return default_collate([dataset[i] for i in range(n)])


def images(batch: dict) -> torch.Tensor:
    """The batch's training images, Bx3xHxW in [0, 1]."""
    return (batch["jpg"].permute(0, 3, 1, 2).float() + 1) / 2


def tiny(config=TINY, **params):
    torch.manual_seed(0)
    model = create_model(config, params=params)
    randomize_zero_init(model.model.diffusion_model)
    if hasattr(model.control_model, "zero_convs"):
        randomize_zero_convs(model)
    return model.eval()


@pytest.mark.parametrize("parameterization", ["epsilon", "v_prediction"])
def test_one_step_x0_equals_diffusers_pred_original_sample(parameterization):
    """ControlNet++ takes x0 from DDPMScheduler.step(...).pred_original_sample; ours from the model's schedule."""
    model = tiny(parameterization="eps" if parameterization == "epsilon" else "v")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=parameterization, clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([0, 150, 999])
    ours = model.predict_start(x_t, t, out)
    theirs = torch.stack([scheduler.step(o, int(s), x).pred_original_sample for o, s, x in zip(out, t, x_t)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def reward_step(model, reward: Reward, batch: dict):
    x, c = model.get_input(batch, model.first_stage_key)
    target = batch["jpg"].permute(0, 3, 1, 2)
    return x, c, reward.step(model.differentiable_decode_first_stage, c["c_concat"][0], target)


def reward_of_step(model, step, x, c, t, noise) -> tuple[torch.Tensor, dict]:
    """The reward term of a training step as the training loss (p_losses) computes it: the model's output at x
    noised to t, its one-step x0, the reward."""
    terms = []

    def recorded(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        terms.append(step(x0, t))
        return terms[-1]

    loss, logged = model.p_losses(x, c, t, noise, denoised_loss=recorded)
    (term, reward_logged), = terms
    assert {f"{'train' if model.training else 'val'}/{k}" for k in reward_logged} <= logged.keys()
    return term, reward_logged


# The fill reward is smooth; HED's ReLUs and max-pools have kinks, a few of which a shift of the weights by 1e-8
# crosses, so its difference quotient is good to about 1e-4. Canny is left out: non-maximum suppression makes the
# magnitude map jump where a pixel becomes a local maximum, so no difference quotient converges to its gradient.
@pytest.mark.parametrize("name, parameterization, rel", [("fill", "eps", 1e-6), ("fill", "v", 1e-6),
                                                         ("hed", "eps", 1e-3), ("hed", "v", 1e-3)])
def test_reward_step_gradient_equals_finite_differences(data_root, name, parameterization, rel, monkeypatch):
    """A reward step in double precision (decoder and detector checkpointed): its derivative along a random direction
    of the trained weights equals the central difference."""
    # the UNet's GroupNorm32 computes in float32 by design (the original's); here it keeps the double of the rest
    monkeypatch.setattr(GroupNorm32, "forward", torch.nn.GroupNorm.forward)
    model = tiny(parameterization=parameterization, sd_locked=False)
    batch = batch_of(data_root)
    x, c = model.get_input(batch, model.first_stage_key)
    model.double()
    x, c = x.double(), {k: [v.double() for v in vs] for k, vs in c.items()}
    reward_model = load_reward_model(name, random_init=True)
    for network in reward_model.networks:
        network.double()
    reward = Reward(reward_model, weight=0.7, max_t=200, checkpointing=True)
    step = reward.step(model.differentiable_decode_first_stage, c["c_concat"][0], images(batch).double() * 2 - 1)
    t = torch.tensor([3, 120, 200, 700])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trained = model.trainable_parameters()
    gen = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in trained]

    def term() -> torch.Tensor:
        value, logged = reward_of_step(model, step, x, c, t, noise)
        assert value.dtype == torch.float64 and float(logged["loss_reward"]) > 0
        return value

    analytic = float(sum((g * d).sum() for g, d in zip(torch.autograd.grad(term(), trained), direction)))
    eps = 1e-8

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(trained, direction):
                p.add_(sign * eps * d)
            value = float(term())
            for p, d in zip(trained, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert analytic != 0 and analytic == pytest.approx(numeric, rel=rel, abs=1e-12)


@pytest.mark.parametrize("config, params", [(config, {}) for config in MODES] + [
    ("cldm_tiny.yaml", {"sd_locked": False}), ("cldm_tiny_xl.yaml", {"sd_locked": False}),
    ("cldm_tiny.yaml", {"only_mid_control": True})], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, dict) else v)
def test_reward_gradient_reaches_only_what_the_mode_trains(data_root, config, params):
    """The reward's gradient (the hed reward: a network detector) reaches trainable tensors of every mode (ControlNet
    with sd_locked, full and only_mid_control, LoRA-offset, LLLite, T2I-Adapter, ControlNet-XS, Union) on SD1.5,
    SD2.1 and SDXL configs; the VAE, the locked base and the detector get none."""
    model = tiny(ROOT / "models" / config, **params)
    reward = Reward(HEDReward(random_init=True), weight=1.0)
    x, c, step = reward_step(model, reward, batch_of(data_root))
    term, logged = reward_of_step(model, step, x, c, torch.tensor([0, 50, 150, 200]), torch.randn_like(x))
    term.backward()
    assert float(logged["loss_reward"]) > 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert moved and set(moved) <= trained
    if params.get("sd_locked") is False:  # full: the decoder half of the UNet learns from the reward too
        assert any(n.startswith("model.diffusion_model.output_blocks.") for n in moved)
    assert not any(p.grad is not None for n, p in model.named_parameters() if n not in trained)
    assert all(p.grad is None for net in reward.model.networks for p in net.parameters())
    assert not model.first_stage_model.training and not any(net.training for net in reward.model.networks)


def test_only_the_rewarded_timesteps_count(data_root):
    """Samples above max_t take no part: the term equals the mean over the rewarded samples alone, and is 0 when
    none is rewarded (ControlNet++ normalises over the rewarded samples)."""
    model = tiny()
    reward = Reward(FillReward(), weight=2.0, max_t=200)
    batch = batch_of(data_root)
    x, c, step = reward_step(model, reward, batch)
    x0 = torch.randn_like(x)
    t = torch.tensor([10, 800, 200, 201])
    term, logged = step(x0, t)
    decoded = (model.decode_first_stage(x0[[0, 2]]) / 2 + 0.5).clamp(0, 1)
    expected = FillReward().losses(decoded, FillReward().labels(None, images(batch)[[0, 2]])).mean()
    torch.testing.assert_close(term, 2.0 * expected)
    torch.testing.assert_close(logged["loss_reward"], expected)
    none, logged = step(x0, torch.full((4,), 500))
    assert float(none) == 0 and logged == {}


def test_fill_reward_scores_the_target_near_zero_and_the_background_near_one(data_root):
    batch = batch_of(data_root)
    target = images(batch)
    reward = FillReward()
    labels = reward.labels(None, target)
    for i, image in enumerate((target.permute(0, 2, 3, 1) * 255).round().byte().numpy()):
        disc, color, background = reference_fill(image)  # the fill IoU metric's disc and colours
        assert np.array_equal(labels.disc[i, 0].numpy(), disc)
        np.testing.assert_allclose(labels.color[i].numpy() * 255, color, atol=1e-4)
    assert float(reward.losses(target, labels).max()) < 0.02
    background = labels.background.view(-1, 3, 1, 1).expand_as(target)
    assert float(reward.losses(background, labels).min()) > 0.95


def test_canny_reward_sees_the_edges_opencv_sees(data_root):
    """kornia's Canny (the canny reward's detector) against OpenCV's on the same blurred images, thresholds scaled
    to 0..255: the thinned edges agree within a pixel."""
    target = images(batch_of(data_root, 8))
    from kornia.filters import canny
    edges = canny(target, CannyReward.LOW, CannyReward.HIGH)[1][:, 0].numpy() > 0
    for ours, image in zip(edges, (target.permute(0, 2, 3, 1) * 255).round().byte().numpy()):
        gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (5, 5), 1.0)
        opencv = cv2.Canny(gray, 255 * CannyReward.LOW, 255 * CannyReward.HIGH, L2gradient=True) > 0
        assert edge_f1(opencv, ours, tolerance=1.0) > 0.9
    magnitude = CannyReward.magnitude(target)
    assert torch.equal(magnitude > CannyReward.LOW, torch.from_numpy(
        canny(target, CannyReward.LOW, CannyReward.HIGH, hysteresis=False)[1].numpy() > 0))


def test_seg_reward_reads_palette_hints_ignores_black_and_scores_cross_entropy():
    """The hint's classes by palette colour; black (ADE20K's "other") is no class and counts in no loss, as
    ControlNet++'s cross-entropy ignores it (ignore_index 255, the mean over the labelled pixels)."""
    reward = SegReward(random_init=True)
    gen = np.random.default_rng(0)
    classes = gen.integers(0, 150, (3, 16, 16)).repeat(4, 1).repeat(4, 2)  # 64 x 64, 4 x 4 blocks of one class
    classes[classes == 48] = 6  # the palette gives both the same colour: the first is read back
    hint = np.stack([colorize(c) for c in classes])
    other = np.zeros((3, 64, 64), bool)
    other[0, :20] = True  # a band of black, 5 blocks high
    other[2] = True  # a hint of no class at all
    hint[other] = 0
    hint = torch.from_numpy(hint).permute(0, 3, 1, 2).float() / 255
    labels = reward.labels(hint, None)
    expected = np.where(other, NO_CLASS, classes)[:, ::4, ::4]
    assert torch.equal(labels, torch.from_numpy(expected))
    image = torch.rand(3, 3, 64, 64)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))  # mmseg's, on 0..255
    logits = reward.networks[0]((image * 255 - mean) / std)
    hand = [torch.nn.functional.cross_entropy(lg[:, lb != NO_CLASS].T, lb[lb != NO_CLASS])
            for lg, lb in zip(logits[:2], labels[:2])]
    losses = reward.losses(image, labels)
    torch.testing.assert_close(losses[:2], torch.stack(hand), rtol=1e-5, atol=1e-5)
    assert float(losses[2]) == 0
    assert len(ADE20K_PALETTE) == reward.networks[0].decode_head.conv_seg.out_channels


def test_depth_reward_normalises_both_maps_by_their_maximum():
    torch.manual_seed(2)  # random MiDaS weights often give a map of zeros (its head ends in a ReLU); these do not
    reward = DepthReward(random_init=True, size=64)
    hint = torch.rand(2, 3, 32, 32)
    labels = reward.labels(hint, None)
    assert torch.allclose(labels.flatten(1).amax(1), torch.ones(2))
    torch.testing.assert_close(labels * hint.mean(1).flatten(1).amax(1).view(-1, 1, 1), hint.mean(1))
    image = torch.rand(2, 3, 32, 32)
    depth = reward.networks[0](torch.nn.functional.interpolate(image, size=(64, 64), mode="bilinear") * 2 - 1)
    depth = torch.nn.functional.interpolate(depth[:, None], size=(32, 32), mode="bilinear")[:, 0]
    assert (depth.flatten(1).amax(1) > 2 * depth.flatten(1).amin(1)).all()
    depth = depth / depth.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(reward.losses(image, labels), ((depth - labels) ** 2).mean((1, 2)))
    with pytest.raises(ValueError, match="multiple of 32"):
        DepthReward(random_init=True, size=100)


def test_lineart_detector_loads_the_published_layout_and_inverts_the_drawing():
    keys = [line.split("\t") for line in (ROOT / "tests" / "reference" / "annotators" / "ann_lineart.keys.tsv")
            .read_text().splitlines()]
    detector = LineartDetector(random_init=True)
    assert [(k, tuple(v.shape)) for k, v in detector.model.state_dict().items()] == [
        (k, tuple(int(d) for d in shape.split("x"))) for k, shape in keys]
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    drawing = detector.model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0, 0]
    assert np.array_equal(detector(image), 255 - (drawing.detach().numpy() * 255).clip(0, 255).astype(np.uint8))


def train(data_root, out, *extra, config=TINY):
    from tutorial_train import main
    args = ["--config", str(config), "--data_root", str(data_root), "--batch_size", "4", "--output_dir", str(out),
            "--sample_steps", "2", "--accelerator", "cpu", "--devices", "1", "--logger_freq", "100", "--seed", "0",
            "--sd_locked", "False", "--learning_rate", "1e-3", "--log_every_n_steps", "1", *map(str, extra)]
    return main(args)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    return save_state_dict(tiny().state_dict(), tmp_path_factory.mktemp("initial") / "ini.ckpt")


@pytest.fixture
def hed_weights(tmp_path, monkeypatch):
    """Random HED weights where the detectors' weights are looked for."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.manual_seed(3)
    state = HEDReward(random_init=True).networks[0].state_dict()
    torch.save(state, folder / "ControlNetHED.pth")
    monkeypatch.setenv(CKPTS_ENV, str(folder))
    return state


def test_reward_training_keeps_the_detector_and_vae_frozen_and_weight_zero_is_the_plain_run(
        data_root, initial, hed_weights, tmp_path):
    common = ["--resume_path", initial, "--max_steps", "3"]
    plain = train(data_root, tmp_path / "plain", *common).lightning_module.state_dict()
    off = train(data_root, tmp_path / "off", *common, "--reward", "hed", "--reward_weight", "0")
    rewarded = train(data_root, tmp_path / "hed", *common, "--reward", "hed", "--reward_max_t", "999")
    # bitwise, every tensor of the model (sd_locked False: the UNet's decoder half trains too)
    assert off.lightning_module.state_dict().keys() == plain.keys()
    assert all(torch.equal(v, plain[k]) for k, v in off.lightning_module.state_dict().items())
    exports = [load_file(tmp_path / name / "control_model.safetensors") for name in ("plain", "off", "hed")]
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])
    assert not all(torch.equal(exports[0][k], exports[2][k]) for k in exports[0])  # the reward moved them

    model = rewarded.lightning_module
    assert model.reward_model.name == "hed" and not model.reward_model.networks[0].training
    assert all(torch.equal(v, hed_weights[k]) for k, v in model.reward_model.networks[0].state_dict().items())
    start = load_state_dict(initial)
    vae = {k: v for k, v in model.state_dict().items() if k.startswith("first_stage_model.")}
    assert vae and all(torch.equal(v, start[k]) for k, v in vae.items())
    assert not model.first_stage_model.training
    with open(next((tmp_path / "hed" / "lightning_logs").glob("version_*/metrics.csv"))) as f:
        header = f.readline()
    assert "train/loss_reward_step" in header  # every sample rewarded (max_t 999): logged every step


def test_a_nan_reward_stops_training_by_name(data_root, initial, tmp_path, monkeypatch):
    monkeypatch.setattr(FillReward, "losses", lambda self, image, labels: image.sum((1, 2, 3)) * float("nan"))
    with pytest.raises(TrainingStopped, match=r"the loss is nan at global step 0 \(train/loss_reward nan"):
        train(data_root, tmp_path / "run", "--resume_path", initial, "--max_steps", "2", "--reward", "fill",
              "--reward_max_t", "999")


def test_missing_reward_weights_and_impossible_settings_are_named(data_root, initial, tmp_path, monkeypatch, capsys):
    from cldm.cli import run_tool
    from tutorial_train import main
    monkeypatch.setenv(CKPTS_ENV, str(tmp_path))
    args = ["--config", str(TINY), "--resume_path", str(initial), "--data_root", str(data_root), "--output_dir",
            str(tmp_path / "run"), "--max_steps", "1", "--accelerator", "cpu"]
    assert run_tool(main, [*args, "--reward", "seg"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'upernet_global_small.pth'}" in err and "--reward seg" in err and "Traceback" not in err
    assert run_tool(main, [*args, "--reward_weight", "1"]) == 1
    assert "reward_weight 1.0 is given without a reward" in capsys.readouterr().err
    assert run_tool(main, [*args, "--reward", "fill", "--reward_max_t", "1000"]) == 1
    assert "reward_max_t must be a timestep, 0 to 999" in capsys.readouterr().err
    model = tiny()
    model.reward_name, model.reward_weight = "canny", 1.0
    from cldm.train_command import check_reward
    with pytest.raises(UserError, match="--reward canny compares with the training images, which --cached_latents"):
        check_reward(model, "some/cache")


def test_reward_phase_continues_a_training_run(data_root, initial, tmp_path):
    """The library's reward phase (what demo.py and the mode comparison run after training): the checkpoint's run
    continued with the reward for the given steps, exported; the fill IoU evaluation reads the export."""
    from cldm.train_command import reward_phase
    trained = train(data_root, tmp_path / "train", "--resume_path", initial, "--max_steps", "2")
    phase = reward_phase(tmp_path / "train" / "checkpoints" / "last.ckpt", TINY, data_root, tmp_path / "reward",
                         "fill", steps=2, batch_size=4, max_t=999,
                         extra_args=["--accelerator", "cpu", "--devices", "1", "--logger_freq", "100"])
    assert phase.global_step == 4 and phase.lightning_module.reward_name == "fill"
    before = load_file(tmp_path / "train" / "control_model.safetensors")
    after = load_file(tmp_path / "reward" / "control_model.safetensors")
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)
    assert trained.lightning_module.reward_name is None


def test_eval_compare_with_gives_the_paired_difference(tmp_path):
    from cldm.fidelity import compare
    before = {"fill_iou": np.array([0.5, 0.6, 0.7, 0.2])}
    after = {"fill_iou": np.array([0.6, 0.6, 0.9, 0.3])}
    result = compare(after, before)["fill_iou"]
    diff = after["fill_iou"] - before["fill_iou"]
    assert result["before"] == pytest.approx(0.5) and result["after"] == pytest.approx(0.6)
    assert result["paired_diff"]["mean"] == pytest.approx(diff.mean())
    assert result["paired_diff"]["ci95"] == pytest.approx(1.96 * diff.std(ddof=1) / 2)
    import tool_eval_control
    earlier = {"data_root": "a", "n": 4, "seed": 0, "sampler": "ddim", "steps": 20, "guidance_scale": 3.0,
               "per_sample": {"control": {"fill_iou": before["fill_iou"].tolist()}}}
    now = {**earlier, "seed": 1, "per_sample": {"control": {"fill_iou": after["fill_iou"].tolist()}}}
    with pytest.raises(UserError, match="seed 0 there, 1 here"):
        tool_eval_control.compared(now, earlier, "earlier.json")
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"n": 4}))
    with pytest.raises(UserError, match="holds no per-sample scores"):
        tool_eval_control.read_earlier(str(path))


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_checkpointing_keeps_few_activations_and_bf16_autocast_runs(data_root):
    """With checkpointing the decoder's and detector's activations are not kept for backward (they are recomputed);
    under bf16 autocast the decoder and detector compute in bf16 and the loss comes out float32, with a gradient."""
    model = tiny()
    batch = batch_of(data_root)
    x, c = model.get_input(batch, model.first_stage_key)
    x0 = torch.randn_like(x, requires_grad=True)
    t = torch.zeros(4, dtype=torch.long)
    kept = {}
    for checkpointing in (True, False):
        reward = Reward(HEDReward(random_init=True), weight=1.0, checkpointing=checkpointing)
        step = reward.step(model.differentiable_decode_first_stage, c["c_concat"][0], images(batch) * 2 - 1)
        kept[checkpointing] = saved_bytes(lambda: step(x0, t))
    assert kept[True] < 0.05 * kept[False]

    decoded = []
    model.first_stage_model.decoder.register_forward_hook(lambda m, i, o: decoded.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term, logged = step(x0, t)
    assert decoded == [torch.bfloat16] and term.dtype == torch.float32 and torch.isfinite(term)
    term.backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0

"""LLLite mode: SD structure on meta, exact no-op at init, where the residual goes, kohya files, multi-control,
what trains, and a tutorial_train run."""

import contextlib
import csv
import dataclasses
import os
import re

import pytest
import torch
import torch.nn.functional as F
from test_control import eps_pair, grads_after_step, make_batch

from cldm.control import ControlUnit, unconditional_units
from cldm.lllite import ControlNetLLLite, LLLiteControlLDM, lllite_targets, load_lllite
from cldm.model import create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained, randomize_zero_convs, randomize_zero_init

TINY_LLLITE = ROOT / "models" / "cldm_tiny_lllite.yaml"
KEY = re.compile(r"^lllite_unet_(input_blocks_\d+_1|middle_block_1)_transformer_blocks_\d+_attn(1_to_[qkv]|2_to_q)"
                 r"\.(conditioning1\.[024]|down\.0|mid\.0|up\.0)\.(weight|bias)$")


def module_params(channels: int, depth: int, ced: int = 32, m: int = 64) -> int:
    """Parameters of one module: conditioning1 (convs with kernel = stride, 3 -> ced/2 (-> ced/2) -> ced),
    down Linear(C, m), mid Linear(m + ced, m), up Linear(m, C), all with bias."""
    strides = {1: [4, 2], 2: [4, 4], 3: [4, 4, 2], 4: [4, 4, 4]}[depth]
    widths = [3] + [ced // 2] * (len(strides) - 1) + [ced]
    cond = sum(a * b * k * k + b for a, b, k in zip(widths, widths[1:], strides))
    return cond + (channels * m + m) + ((m + ced) * m + m) + (m * channels + channels)


def randomize_lllite(net: torch.nn.Module, seed: int = 4, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)



@pytest.fixture
def lllite_model():
    model = model_as_trained(TINY_LLLITE)
    return model


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_sd_structure_on_meta(version):
    model = create_model(ROOT / "models" / f"cldm_{version}_lllite.yaml", device="meta")
    net = model.control_model
    assert isinstance(model, LLLiteControlLDM) and isinstance(net, ControlNetLLLite)
    assert len(list(net.children())) == 28
    # SD1.x/2.x: input_blocks 1,2 at 320 ch (/8), 4,5 at 640 (/16), 7,8 at 1280 (/32), middle at 1280 (/64);
    # 4 modules each (attn1 q/k/v, attn2 q)
    expected = (8 * module_params(320, 1) + 8 * module_params(640, 2) + 8 * module_params(1280, 3)
                + 4 * module_params(1280, 4))
    assert expected == 3_351_040
    assert sum(p.numel() for p in model.trainable_parameters()) == expected
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in net.parameters()}
    depths = {name: m.depth for name, m in net.named_children()}
    assert depths["lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == 1
    assert depths["lllite_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_q"] == 2
    assert depths["lllite_unet_input_blocks_8_1_transformer_blocks_0_attn1_to_v"] == 3
    assert depths["lllite_unet_middle_block_1_transformer_blocks_0_attn1_to_k"] == 4
    kernels = [net.get_submodule("lllite_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q").conditioning1[i]
               for i in (0, 2, 4)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in kernels] == [
        (3, 16, 4, 4), (16, 16, 4, 4), (16, 32, 2, 2)]
    assert all(KEY.match(k) for k in model.control_state_dict())


def test_fresh_lllite_is_exact_identity(lllite_model):
    controlled, plain = eps_pair(lllite_model, make_batch())
    assert torch.equal(controlled, plain)


def test_residual_enters_the_projection_input(lllite_model):
    randomize_lllite(lllite_model.control_model)
    batch = make_batch()
    name = "lllite_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k"
    attention = lllite_model.model.diffusion_model.get_submodule("input_blocks.3.1.transformer_blocks.0.attn1")
    proj = attention.to_k
    seen = {}  # the first call: apply_model (eps_pair then runs the plain UNet); self-attention: k reads x
    handles = [attention.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0])),
               proj.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))]
    lllite_model.control_scales = [0.5]
    controlled, plain = eps_pair(lllite_model, batch)
    for h in handles:
        h.remove()
    hint = lllite_model.get_input(batch, "jpg")[1]["c_concat"][0]
    with torch.no_grad():
        residual = lllite_model.control_model.get_submodule(name)(seen["x"], hint * 2 - 1)
        expected = F.linear(seen["x"] + 0.5 * residual, proj.weight)
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-6)
    assert (controlled - plain).abs().max() > 1e-3
    lllite_model.control_scales = [0.0]
    controlled, plain = eps_pair(lllite_model, batch)
    assert torch.equal(controlled, plain)


def test_only_lllite_tensors_train_also_with_gradient_checkpointing(lllite_model):
    randomize_lllite(lllite_model.control_model, std=0.05)
    expected = {n for n, _ in lllite_model.named_parameters() if n.startswith("control_model.")}
    opt = lllite_model.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in lllite_model.control_model.parameters()}

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        for block in lllite_model.model.diffusion_model.modules():
            if hasattr(block, "checkpoint"):
                block.checkpoint = checkpointing
        torch.manual_seed(5)
        assert grads_after_step(lllite_model) == expected  # every LLLite tensor, in the encoder too
        return {n: p.grad.clone() for n, p in lllite_model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)  # checkpointed blocks re-run the hooks in backward
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
    with pytest.raises(ValueError, match="stays locked"):
        lllite_model.sd_locked = False


def test_save_load_round_trip_is_exact(lllite_model, tmp_path):
    randomize_lllite(lllite_model.control_model)
    path = save_state_dict(lllite_model.control_state_dict(), tmp_path / "lllite.safetensors")
    saved = load_state_dict(path)
    assert set(saved) == set(lllite_model.control_model.state_dict()) and all(KEY.match(k) for k in saved)
    other = create_model(TINY_LLLITE)
    load_checkpoint(other, {k: v for k, v in lllite_model.state_dict().items() if not k.startswith("control_model.")})
    assert other.load_control(path).ok
    assert all(torch.equal(v, other.control_model.state_dict()[k]) for k, v in saved.items())
    batch = make_batch()
    assert torch.equal(eps_pair(lllite_model, batch)[0], eps_pair(other, batch)[0])
    full = create_model(TINY_LLLITE)  # a whole-model checkpoint (control_model.* keys) loads the usual way
    assert load_checkpoint(full, lllite_model.state_dict()).ok
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in lllite_model.state_dict().items())


def test_kohya_file_with_other_dims_loads_with_dims_inferred(lllite_model, tmp_path):
    unet = lllite_model.model.diffusion_model
    source = ControlNetLLLite.for_unet(unet, cond_emb_dim=16, network_dim=8)
    randomize_lllite(source, seed=7)
    path = save_state_dict(source.state_dict(), tmp_path / "kohya_lllite.safetensors")
    report = lllite_model.load_control(path)
    assert report.ok and not report.missing
    net = lllite_model.control_model
    assert (net.cond_emb_dim, net.network_dim) == (16, 8)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in source.state_dict().items())
    partial = {k: v for k, v in source.state_dict().items() if "attn2" not in k}
    report = lllite_model.load_control(partial)
    assert sorted(report.missing) == sorted(f"control_model.{n}" for n in lllite_targets(unet) if "attn2" in n)
    stray = {k.replace("input_blocks_1_1", "input_blocks_2_1"): v for k, v in source.state_dict().items()}
    with pytest.raises(ValueError, match="no such layer"):
        lllite_model.load_control(stray)
    assert load_lllite(path).state_dict().keys() == source.state_dict().keys()


@contextlib.contextmanager
def reference_lllite(unet, units):
    """LLLite written out by hand: proj(x + sum_u s_u * module_u(x, 2 * hint_u - 1)) on every target."""
    handles = []
    for name, target in lllite_targets(unet).items():
        def hook(proj, args, name=name):
            x = args[0]
            return (x + sum(s * net.get_submodule(name)(x, h * 2 - 1) for net, h, s in units),)
        handles.append(unet.get_submodule(target.path).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_lllite_and_controlnet_units_together(tiny_model):
    randomize_zero_convs(tiny_model)
    unet = tiny_model.model.diffusion_model
    lllite_a, lllite_b = ControlNetLLLite.for_unet(unet), ControlNetLLLite.for_unet(unet, 16, 8)
    randomize_lllite(lllite_a, seed=5)
    randomize_lllite(lllite_b, seed=6)
    x, cond = tiny_model.get_input(make_batch(), "jpg")
    x_noisy, t, text = torch.randn_like(x), torch.tensor([10, 700]), cond["c_crossattn"][0]
    hint_cn, hint_a, hint_b = cond["c_concat"][0], torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    cn = ControlUnit(tiny_model.control_model, hint_cn, strength=0.8)
    a = ControlUnit(lllite_a, hint_a, strength=0.7, start=0.5)
    b = ControlUnit(lllite_b, hint_b, strength=1.3, end=0.5, mode="control")

    def eps(units, step):
        return tiny_model.apply_model(x_noisy, t, {"c_crossattn": [text], "control": units}, sampling_step=step)

    def expected(lllite_units, with_cn=True):
        residuals = [0.8 * r for r in tiny_model.control_model(x_noisy, hint_cn, t, text)] if with_cn else None
        with reference_lllite(unet, lllite_units):
            return unet(x_noisy, t, context=text, control=residuals)

    with torch.no_grad():
        plain = unet(x_noisy, t, context=text)
        cn_only = eps([cn], (0, 4))
        for step, active in [((0, 4), [(lllite_b, hint_b, 1.3)]), ((1, 4), [(lllite_b, hint_b, 1.3)]),
                             ((2, 4), [(lllite_a, hint_a, 0.7)]), ((3, 4), [(lllite_a, hint_a, 0.7)])]:
            got = eps([cn, a, b], step)
            torch.testing.assert_close(got, expected(active), rtol=0, atol=1e-6)
            assert (got - cn_only).abs().max() > 1e-3
        both = [(lllite_a, hint_a, 0.7), (lllite_b, hint_b, 1.3)]
        always_a, always_b = (dataclasses.replace(u, start=0.0, end=1.0) for u in (a, b))
        torch.testing.assert_close(eps([always_a, always_b], None), expected(both, with_cn=False), rtol=0,
                                   atol=1e-6)
        with pytest.raises(ValueError, match="needs the sampling step"):
            eps([a, b], None)  # a window outside sampling is an error, not silently always on
        a.strength = 0.0
        assert torch.equal(eps([cn, a], (3, 4)), cn_only)
        eps([always_a, always_b], None)
        assert torch.equal(unet(x_noisy, t, context=text), plain)  # nothing lingers after a controlled forward
    assert unconditional_units([cn, a, b]) == [cn, a]


def hand_ddim(model, cond: dict, uncond: dict, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Three deterministic DDIM steps written out (timesteps 667, 334, 1: every 333rd plus one, as the
    original's uniform schedule; the last step goes to alphas_cumprod[0]), guidance against `uncond`."""
    a = model.alphas_cumprod.double()
    timesteps = [667, 334, 1]
    for t, prev in zip(timesteps, [334, 1, 0]):
        ts = torch.full((x.shape[0],), t)
        eps_c, eps_u = model.apply_model(x, ts, cond), model.apply_model(x, ts, uncond)
        eps = (eps_u + scale * (eps_c - eps_u)).double()
        x0 = (x.double() - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        x = (a[prev].sqrt() * x0 + (1 - a[prev]).sqrt() * eps).float()
    return x


def test_sampling_with_the_models_own_lllite(lllite_model):
    """DDIMSampler on the model's own LLLite (the hint as c_concat) gives the DDIM steps written out by hand, and a
    control scale of 0 gives exactly the samples without any hint."""
    from ldm.models.diffusion.ddim import DDIMSampler
    randomize_lllite(lllite_model.control_model, std=0.05)
    text = lllite_model.get_learned_conditioning(["a circle"])
    cond = {"c_concat": [torch.rand(1, 3, 32, 32)], "c_crossattn": [text]}
    uncond = {"c_concat": None, "c_crossattn": [lllite_model.get_learned_conditioning([""])]}
    x_T = torch.randn(1, 4, 4, 4)
    runs = []
    with torch.no_grad():
        for scale in (1.0, 0.0):
            lllite_model.control_scales = [scale]
            samples, _ = DDIMSampler(lllite_model).sample(3, 1, (4, 4, 4), cond, x_T=x_T, verbose=False,
                                                          unconditional_guidance_scale=5.0,
                                                          unconditional_conditioning=uncond)
            runs.append(samples)
        lllite_model.control_scales = [1.0]
        controlled = hand_ddim(lllite_model, cond, uncond, x_T, 5.0)
        plain = hand_ddim(lllite_model, {**cond, "c_concat": None}, uncond, x_T, 5.0)
    torch.testing.assert_close(runs[0], controlled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[1], plain, rtol=1e-5, atol=1e-5)
    assert (controlled - plain).abs().max() > 1e-2  # the hint steers


def test_tutorial_train_lllite_loss_falls(tmp_path):
    from tool_make_fill50k import make_fill50k
    from tutorial_train import main
    data = make_fill50k(tmp_path / "fill50k", n=8, size=32, seed=0)
    torch.manual_seed(0)
    base = create_model(TINY_LLLITE)
    # a random UNet with strong zero-init layers: its large output error is what the LLLite modules learn
    # to steer away, a clear signal within a few steps
    randomize_zero_init(base.model.diffusion_model, std=0.3)
    sd_checkpoint = {k: v for k, v in base.state_dict().items() if not k.startswith("control_model.")}
    init = save_state_dict(sd_checkpoint, tmp_path / "sd_random.safetensors")  # a plain SD checkpoint
    out = tmp_path / "run"
    trainer = main(["--config", str(TINY_LLLITE), "--resume_path", str(init), "--data_root", str(data),
                    "--batch_size", "2", "--max_steps", "8", "--learning_rate", "0.1", "--seed", "0",
                    "--log_every_n_steps", "1", "--logger_freq", "1000", "--checkpoint_every", "1000",
                    "--output_dir", str(out), "--accelerator", "cpu", "--devices", "1"])
    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        curve = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert len(curve) == 8
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3, curve
    trained = trainer.lightning_module
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in sd_checkpoint.items())  # the UNet stayed locked
    export = load_state_dict(out / "control_model.safetensors")
    assert set(export) == set(trained.control_model.state_dict()) and all(KEY.match(k) for k in export)

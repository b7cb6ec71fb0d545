"""LLLite on SDXL, as kohya built it: 136 targets and their depths, kohya's file layout loaded strictly and saved
as it is, an exact no-op at init, the vector y untouched, and a training run with checkpoint and resume."""

import pytest
import torch
from test_lllite_mode import KEY, module_params, randomize_lllite

from cldm.control import ControlUnit
from cldm.lllite import ControlNetLLLite, LLLiteControlLDM, load_lllite
from cldm.model import create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained, randomize_zero_init, reference_keys
from ldm.checkpoint import UserError
from tool_make_fill50k import make_fill50k

XL_LLLITE, TINY_XL_LLLITE = ROOT / "models" / "cldm_xl_lllite.yaml", ROOT / "models" / "cldm_tiny_xl_lllite.yaml"


@pytest.fixture(scope="module")
def xl_lllite():
    return create_model(XL_LLLITE, device="meta")


def test_kohya_targets_depths_and_keys_on_meta(xl_lllite):
    net = xl_lllite.control_model
    assert isinstance(xl_lllite, LLLiteControlLDM) and isinstance(net, ControlNetLLLite)
    ref = reference_keys("sdxl/lllite_xl.keys.tsv")
    assert {k: tuple(v.shape) for k, v in xl_lllite.control_state_dict().items()} == ref
    assert len(list(net.children())) == 136 and all(KEY.match(k) for k in ref)
    depths = {}
    for name, module in net.named_children():
        block = name.split("_transformer_blocks_")[0].removeprefix("lllite_unet_")
        depths.setdefault(block, set()).add((module.in_dim, module.depth))
    # kohya: input_blocks 4, 5 at 640 channels and depth 2 (latent / 2), 7, 8 and the middle at 1280, depth 3
    assert depths == {"input_blocks_4_1": {(640, 2)}, "input_blocks_5_1": {(640, 2)},
                      "input_blocks_7_1": {(1280, 3)}, "input_blocks_8_1": {(1280, 3)},
                      "middle_block_1": {(1280, 3)}}
    expected = 16 * module_params(640, 2) + 120 * module_params(1280, 3)
    assert sum(p.numel() for p in xl_lllite.trainable_parameters()) == expected == 22_969_600


def test_a_file_in_kohyas_sdxl_layout_loads_strictly(xl_lllite):
    """A file with exactly lllite_xl.keys.tsv's keys and shapes: dims read from it, every target covered."""
    gen = torch.Generator().manual_seed(0)
    ref = reference_keys("sdxl/lllite_xl.keys.tsv")
    file = {k: torch.randn(shape, generator=gen) * 0.01 for k, shape in ref.items()}
    net = load_lllite(file)
    assert (net.cond_emb_dim, net.network_dim) == (32, 64)
    net.check_fits(xl_lllite.model.diffusion_model)
    loaded = net.state_dict()
    assert {k: tuple(v.shape) for k, v in loaded.items()} == ref
    assert all(torch.equal(loaded[k], v) for k, v in file.items())
    report = xl_lllite.load_control(file)
    assert report.ok and not report.missing
    with pytest.raises(RuntimeError, match="up.0.weight"):  # strict: a wrong shape names the tensor
        bad = dict(file)
        name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.up.0.weight"
        bad[name] = torch.zeros(64, 64)
        load_lllite(bad)


@pytest.fixture
def tiny_lllite():
    model = model_as_trained(TINY_XL_LLLITE)
    return model


def batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"jpg": torch.rand(n, size, size, 3, generator=g) * 2 - 1, "hint": torch.rand(n, size, size, 3, generator=g),
            "txt": ["a red circle", "a blue circle"][:n]}


def test_tiny_sdxl_lllite_is_a_no_op_at_init_and_acts_with_y(tiny_lllite):
    x, cond = tiny_lllite.get_input(batch(), "jpg")
    x = torch.randn_like(x)
    t = torch.tensor([10, 600])
    unet = tiny_lllite.model.diffusion_model
    with torch.no_grad():
        plain = unet(x, t, context=cond["c_crossattn"][0], y=cond["c_adm"])
        assert torch.equal(tiny_lllite.apply_model(x, t, cond), plain)
        randomize_lllite(tiny_lllite.control_model, std=0.05)
        controlled = tiny_lllite.apply_model(x, t, cond)
        other_y = tiny_lllite.apply_model(x, t, {**cond, "c_adm": cond["c_adm"] + 1})
        as_unit = tiny_lllite.apply_model(x, t, {"c_crossattn": cond["c_crossattn"], "c_adm": cond["c_adm"],
                                                 "control": [ControlUnit(tiny_lllite.control_model,
                                                                         cond["c_concat"][0])]})
    assert (controlled - plain).abs().max() > 1e-3
    assert not torch.allclose(controlled, other_y)  # the vector still reaches the UNet
    assert torch.equal(controlled, as_unit)


def test_tiny_sdxl_lllite_trains_saves_kohya_layout_and_resumes(tmp_path):
    from tutorial_train import main
    data = make_fill50k(tmp_path / "fill50k", n=4, size=64, seed=0)
    torch.manual_seed(0)
    base = create_model(TINY_XL_LLLITE)
    randomize_zero_init(base.model.diffusion_model, std=0.3)
    init = save_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("control_model.")},
                           tmp_path / "sdxl_base.safetensors")  # a plain base: the LLLite modules start fresh
    out = tmp_path / "run"
    common = ["--config", str(TINY_XL_LLLITE), "--data_root", str(data), "--batch_size", "2", "--seed", "0",
              "--output_dir", str(out), "--accelerator", "cpu", "--devices", "1",
              "--learning_rate", "0.01"]
    with pytest.raises(UserError, match="--frozen_dtype bf16 needs --precision bf16-mixed"):
        main([*common, "--resume_path", str(init), "--max_steps", "2", "--frozen_dtype", "bf16"])
    # the 24 GB recipe: bf16 autocast over a bf16 frozen base, checkpointing, and an image log on the way
    recipe = ["--precision", "bf16-mixed", "--frozen_dtype", "bf16", "--gradient_checkpointing", "True"]
    trainer = main([*common, *recipe, "--resume_path", str(init), "--max_steps", "2", "--checkpoint_every", "2",
                    "--logger_freq", "2"])
    trained = trainer.lightning_module
    assert {p.dtype for p in trained.model.parameters()} == {p.dtype for p in trained.conditioner.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in trained.control_model.parameters()} == {torch.float32}
    assert any(p.name.startswith("samples_cfg") for p in (out / "image_log" / "train").iterdir())
    export = load_state_dict(out / "control_model.safetensors")
    assert set(export) == set(trained.control_model.state_dict()) and all(KEY.match(k) for k in export)
    assert any(v.any() for k, v in export.items() if ".up.0." in k)  # the zero-initialised up layers trained
    resumed = main([*common, "--max_steps", "3", "--resume", str(out / "checkpoints" / "last.ckpt"), "--force",
                    "--logger_freq", "1000"])
    assert resumed.global_step == 3
    fresh = create_model(TINY_XL_LLLITE)
    load_checkpoint(fresh, init)
    assert fresh.load_control(out / "control_model.safetensors").ok

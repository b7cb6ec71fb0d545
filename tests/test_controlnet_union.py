"""ControlNet-Union mode (cldm/controlnet_union.py): the published structure (diffusers' ControlNetUnionModel for
xinsir's configs), which mode a file is, and sampling equal to diffusers' StableDiffusionXLControlNetUnionPipeline."""

import diffusers
import pytest
import torch
from diffusers_schedulers import SDXL_SCHEDULER_CONFIG
from omegaconf import OmegaConf

from cldm.cldm import CONTROLNET
from cldm.control import ControlUnit
from cldm.controlnet_union import (
    CONTROLNET_UNION,
    Hints,
    control_type_index,
    diffusers_config,
    diffusers_weights,
)
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.model import create_model
from cldm.modes import recognise
from cldm.pipeline import sample
from conftest import (
    PROMPTS,
    ROOT,
    SEEDS,
    diffusers_unet,
    meta_tensors,
    model_as_trained,
    randomize_zero_init,
    reference_keys,
    sd_checkpoint,
    sdxl_pipeline_latents,
    shapes,
)

MODELS = ROOT / "models"
FULL, TINY_XL = MODELS / "cldm_xl_union.yaml", MODELS / "cldm_tiny_xl_union.yaml"
# xinsir/controlnet-union-sdxl-1.0's config.json (config_promax.json differs in num_control_type: 8), the fields
# ControlNetUnionModel takes; the condition transformer's are its defaults, which xinsir's code hard-codes.
PUBLISHED = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "class_embed_type": None, "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default", "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
    "use_linear_projection": True, "num_control_type": 6,
}
UNION_ONLY = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")


def published_on_meta(num_control_type: int) -> diffusers.ControlNetUnionModel:
    with torch.device("meta"):
        return diffusers.ControlNetUnionModel(**PUBLISHED | {"num_control_type": num_control_type})


# ---- structure and files ---------------------------------------------------------------------------------------

def test_full_size_model_holds_diffusers_controlnet_union():
    """cldm_xl_union.yaml on the meta device exports the names and shapes of xinsir's file; without the union's own
    modules they are the 844 of a diffusers ControlNet-XL (the reference list)."""
    model = create_model(FULL, device="meta")
    ours = shapes(model.control_state_dict())
    assert ours == shapes(published_on_meta(6).state_dict())
    assert {k: v for k, v in ours.items() if not k.startswith(UNION_ONLY)} == reference_keys(
        "sdxl/controlnet_xl.diffusers.keys.tsv")
    union = {k: v for k, v in ours.items() if k.startswith(UNION_ONLY)}
    assert union["task_embedding"] == (6, 320) and union["control_add_embedding.linear_1.weight"] == (1280, 6 * 256)
    assert sum(torch.Size(s).numel() for s in union.values()) == 6 * 320 + (
        4 * 320 * 320 + 4 * 320 + 2 * 2 * 320 + 2 * 4 * 320 * 320 + 5 * 320) + 320 * 320 + 320 + (
        6 * 256 * 1280 + 1280 + 1280 * 1280 + 1280)


@pytest.mark.parametrize("num_control_type", [6, 8])
def test_published_files_load_through_the_mode_with_their_structure(num_control_type):
    """xinsir's file (6 types) and ProMax (8) in diffusers' names: the registry tells them union files (not
    ControlNets), and they become networks of their own structure on a model of the full-size config."""
    theirs = published_on_meta(num_control_type).state_dict()
    file = meta_tensors(shapes(theirs))
    found = recognise(file)
    assert (found.mode, found.layout) == (CONTROLNET_UNION, "diffusers")
    assert CONTROLNET.layout(file) is None
    model = create_model(FULL, device="meta")
    net = CONTROLNET_UNION.network(file, model, OmegaConf.load(FULL))
    assert net.num_control_type == num_control_type
    assert shapes(diffusers_weights(net)) == shapes(theirs)
    assert net.control_types()[-1] == ("repaint" if num_control_type == 8 else "segment")
    # a Lightning checkpoint of the model is the mode's other layout, and no ControlNet's either
    checkpoint = meta_tensors(shapes(model.state_dict()))
    assert recognise(checkpoint).layout == "checkpoint" and CONTROLNET.layout(checkpoint) is None


def test_control_type_names():
    assert [control_type_index(n, 8) for n in ("openpose", "depth", "scribble", "hed", "canny", "mlsd",
                                               "lineart", "normal", "segment", "tile", "inpaint", "repaint")] == [
        0, 1, 2, 2, 3, 3, 3, 4, 5, 6, 7, 7]
    assert control_type_index("canny/lineart/anime_lineart/mlsd", 6) == 3
    with pytest.raises(ValueError, match="not one of this ControlNet-Union's 6 types"):
        control_type_index("tile", 6)  # ProMax's
    with pytest.raises(ValueError, match="not one of"):
        control_type_index("lines", 8)


# ---- the network equals diffusers' ------------------------------------------------------------------------------

def randomized(model):
    """The model's union network with every zero-initialised tensor random, so that each part is tested."""
    net = model.control_model
    randomize_zero_init(net)
    torch.manual_seed(3)
    for module in [net.spatial_ch_projs, *net.zero_convs, net.middle_block_out, net.input_hint_block[-1]]:
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def tiny():
    return randomized(model_as_trained(TINY_XL).eval())


def their_controlnet(model, folder) -> diffusers.ControlNetUnionModel:
    """diffusers' ControlNetUnionModel from the folder tool_convert_diffusers.py writes of the model's export."""
    import tool_convert_diffusers
    from cldm.model import save_state_dict
    save_state_dict(model.control_state_dict(), folder / "union.safetensors")
    tool_convert_diffusers.main(["to-diffusers", str(folder / "union.safetensors"), str(folder / "union"),
                                 "--config", str(TINY_XL)])
    net, info = diffusers.ControlNetUnionModel.from_pretrained(folder / "union", output_loading_info=True)
    assert not any(info.values()), info
    return net.eval()


def test_residuals_match_diffusers_with_one_and_two_hints(tiny, tmp_path):
    """One hint: residuals times the strength; two: each hint weighted inside the fusion. A batch of 3: the condition
    transformer attends across the batch, as in diffusers."""
    model = tiny
    theirs = their_controlnet(model, tmp_path)
    net = model.control_model
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 400, 700])
    hints = [torch.rand(3, 3, 64, 64, generator=g) for _ in range(2)]
    pooled_width = model.conditioner.embedders[1].model.text_projection.shape[1]
    with torch.no_grad():
        cond = model.text_conditioning(PROMPTS + PROMPTS[:1], (64, 64), original_size=(96, 80), crop=(8, 16))
        context, y = cond["c_crossattn"][0], cond["c_adm"]
        time_ids = torch.tensor([[96, 80, 8, 16, 64, 64]] * 3, dtype=torch.float32)
        for types, weights in ((["depth"], [0.7]), (["depth", "openpose"], [0.8, 0.3])):
            indices = [control_type_index(n, 6) for n in types]
            ours = net(x, [Hints(h, (i,), w) for h, i, w in zip(hints, indices, weights)], t, context, y)
            if len(types) == 1:
                ours = [r * weights[0] for r in ours]
            vector = torch.zeros(3, 6)
            vector[:, indices] = 1
            down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hints[:len(types)],
                               control_type=vector, control_type_idx=indices, conditioning_scale=weights,
                               added_cond_kwargs={"text_embeds": y[:, :pooled_width], "time_ids": time_ids},
                               return_dict=False)
            for i, (a, b) in enumerate(zip(ours, [*down, mid])):
                assert b.abs().max() > 1e-2, f"residual {i} is zero"
                assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"{types}: residual {i} differs"


def union_pipeline(model, folder, scheduler) -> diffusers.StableDiffusionXLControlNetUnionPipeline:
    pipe = diffusers.StableDiffusionXLControlNetUnionPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=diffusers_unet(model, TINY_XL), controlnet=their_controlnet(model, folder), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def their_latents(pipe, model, steps: int, cfg: float, **union) -> torch.Tensor:
    return sdxl_pipeline_latents(pipe, model, PROMPTS, SEEDS, 64, steps, cfg, **union)


def test_sampling_matches_stable_diffusion_xl_controlnet_union_pipeline(tiny, tmp_path):
    """sample() = StableDiffusionXLControlNetUnionPipeline on the same weights, noise and embeddings, final latents
    within float32 tolerance: (1) one control type at strength 0.7 acting on steps 2-4 of 6; (2) a depth and an
    openpose hint at once on one network, each with its strength and window (the pipeline's per-image
    controlnet_conditioning_scale and control_guidance_start/end), fused in one pass; (3) one unit holding both
    hints (6 channels) at strength 0.6, which the pipeline gives as the same scale for both images."""
    model = tiny
    pipe = union_pipeline(model, tmp_path, diffusers.DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    g = torch.Generator().manual_seed(2)
    depth, pose = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    steps, cfg = 6, 5.0
    net = model.control_model
    cases = [
        ([ControlUnit(net, depth, strength=0.7, start=0.2, end=0.8, control_type="depth")],
         dict(control_image=[depth], control_mode=[1], controlnet_conditioning_scale=0.7,
              control_guidance_start=0.2, control_guidance_end=0.8)),
        ([ControlUnit(net, depth, strength=0.8, end=0.6, control_type="depth"),
          ControlUnit(net, pose, strength=0.6, start=0.3, control_type="openpose")],
         dict(control_image=[depth, pose], control_mode=[1, 0], controlnet_conditioning_scale=[0.8, 0.6],
              control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0])),
        ([ControlUnit(net, torch.cat([depth, pose], 1), strength=0.6, control_type=("depth", "openpose"))],
         dict(control_image=[depth, pose], control_mode=[1, 0], controlnet_conditioning_scale=0.6)),
    ]
    results = []
    for units, union in cases:
        ours = sample(model, PROMPTS, units=units, sampler="ddim", steps=steps, cfg_scale=cfg, seed=SEEDS,
                      decode=False).latents
        theirs = their_latents(pipe, model, steps, cfg, **union)
        error = (ours - theirs).abs().max() / theirs.abs().max()
        assert error < 1e-5, f"{union['control_mode']}: relative difference {error:.2e}"
        results.append(ours)
    plain = sample(model, PROMPTS, sampler="ddim", steps=steps, cfg_scale=cfg, seed=SEEDS, decode=False).latents
    for ours in results:
        assert (ours - plain).abs().max() > 1e-3 * plain.abs().max()  # the union network acts
    assert (results[1] - results[2]).abs().max() > 1e-3 * plain.abs().max()


# ---- units: control types, windows, fusion, mixed kinds ---------------------------------------------------------

def test_units_name_their_control_types(tiny):
    net = tiny.control_model
    hint = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="names the control type of its hint"):
        ControlUnit(net, hint)
    with pytest.raises(ValueError, match="not one of this ControlNet-Union's 6 types"):
        ControlUnit(net, hint, control_type="tile")
    with pytest.raises(ValueError, match=r"2 type\(s\) \['depth', 'openpose'\] need 6"):
        ControlUnit(net, hint, control_type=["depth", "openpose"])
    controlnet = model_as_trained(MODELS / "cldm_tiny_xl.yaml").control_model
    with pytest.raises(ValueError, match="takes no control type"):
        ControlUnit(controlnet, hint, control_type="depth")
    assert controlnet.control_types() == () and net.control_types()[:2] == ("openpose", "depth")
    assert ControlUnit(net, hint, control_type="scribble").control_types == ("scribble",)


def test_units_of_one_network_fuse_with_their_windows(tiny):
    """Two units of one union network give one pass: a unit outside its window keeps its place at weight 0 while the
    other acts (diffusers' per-image keep), and the network gives nothing when both are outside."""
    model, net = tiny, tiny.control_model
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(4)
    depth, pose = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    units = [ControlUnit(net, depth, strength=0.8, end=0.5, control_type="depth"),
             ControlUnit(net, pose, strength=0.6, start=0.25, end=0.75, control_type="openpose")]
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 100])
    with torch.no_grad():
        cond = model.text_conditioning(PROMPTS, (64, 64))
        context, y = cond["c_crossattn"][0], cond["c_adm"]
        eps = {step: model.apply_model(x, t, {**cond, "control": units}, sampling_step=(step, 4)) for step in range(4)}
        plain = unet(x, t, context=context, y=y)

        def expected(w_depth: float, w_pose: float) -> torch.Tensor:
            residuals = net(x, [Hints(depth, (1,), w_depth), Hints(pose, (0,), w_pose)], t, context, y)
            return unet(x, t, context=context, y=y, control=residuals)
        torch.testing.assert_close(eps[0], expected(0.8, 0.0), rtol=0, atol=1e-6)  # openpose not yet
        torch.testing.assert_close(eps[1], expected(0.8, 0.6), rtol=0, atol=1e-6)
        torch.testing.assert_close(eps[2], expected(0.0, 0.6), rtol=0, atol=1e-6)  # depth ended
        torch.testing.assert_close(eps[3], plain, rtol=0, atol=0)  # both outside: nothing
    with pytest.raises(ValueError, match="same control mode"):
        modes = [units[0], ControlUnit(net, pose, mode="prompt", control_type="openpose")]
        model.apply_model(x, t, {**cond, "control": modes}, sampling_step=(0, 4))


def test_a_union_unit_beside_a_controlnet_unit(tiny, tmp_path):
    """A union file and a ControlNet-XL file as units of one sample() on a ControlNet-XL model: one forward is the
    UNet given the sum of their weighted residuals; each acts."""
    from cldm.loader import load_control_network
    from cldm.model import save_state_dict
    config = MODELS / "cldm_tiny_xl.yaml"
    model = model_as_trained(config, control=True).eval()
    union_file = save_state_dict(tiny.control_state_dict(), tmp_path / "union.safetensors")
    union = load_control_network(union_file, model, config)
    g = torch.Generator().manual_seed(5)
    hints = [torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)]
    units = [ControlUnit(union, hints[0], strength=0.7, control_type="depth"), model.unit(hints[1], strength=0.5)]
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30, 800])
    with torch.no_grad():
        cond = model.text_conditioning(PROMPTS, (64, 64))
        context, y = cond["c_crossattn"][0], cond["c_adm"]
        got = model.apply_model(x, t, {**cond, "control": units})
        mine = [0.7 * r for r in union.residuals(x, hints[0], t, context, y, control_type="depth")]
        other = [0.5 * r for r in model.control_model(x, hints[1], t, context, y=y)]
        expected = model.model.diffusion_model(x, t, context=context, y=y, control=[a + b for a, b in zip(mine, other)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    both = sample(model, PROMPTS, units=units, steps=3, seed=SEEDS, decode=False).latents
    for alone in units:
        one = sample(model, PROMPTS, units=[alone], steps=3, seed=SEEDS, decode=False).latents
        assert (one - both).abs().max() > 1e-3 * both.abs().max()


# ---- initialisation, training, files ---------------------------------------------------------------------------

def test_tool_add_control_starts_the_copy_as_diffusers_from_unet(tmp_path):
    """The initial checkpoint copies from the UNet what ControlNetUnionModel.from_unet copies (conv_in, time
    embedding, down and mid blocks; not the vector embedding add_embedding), and leaves the UNet's output unchanged."""
    import tool_add_control
    from cldm.model import load_state_dict, save_state_dict
    base = model_as_trained(TINY_XL)
    sd = save_state_dict(sd_checkpoint(base), tmp_path / "sd.safetensors")
    initial = tool_add_control.main([str(sd), str(tmp_path / "ini.safetensors"), "--config", str(TINY_XL)])
    state = load_state_dict(initial)
    model = create_model(TINY_XL)
    model.load_state_dict(state)
    names = diffusers_module_names(model.control_model)
    copied = {k for k in model.control_model.state_dict()
              if torch.equal(state[f"control_model.{k}"], state.get(f"model.diffusion_model.{k}", torch.empty(0)))}
    ours = {rename_module(k, names) for k in copied}
    unet = diffusers_unet(base, TINY_XL)
    theirs_sd, unet_sd = diffusers.ControlNetUnionModel.from_unet(unet).state_dict(), unet.state_dict()
    theirs = {k for k, v in theirs_sd.items() if k in unet_sd and torch.equal(v, unet_sd[k])}
    assert ours == theirs and "conv_in.weight" in ours and "mid_block.resnets.1.conv2.weight" in ours
    assert not any(k.startswith("add_embedding.") for k in ours)
    g = torch.Generator().manual_seed(6)
    x, t, hint = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 600]), torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        cond = model.text_conditioning(PROMPTS, (64, 64))
        controlled = model.apply_model(x, t, {**cond, "c_concat": [hint]})
        plain = model.apply_model(x, t, cond)
    assert torch.equal(controlled, plain)  # zero convs: step 0 is an exact no-op


def test_tutorial_train_union_cached_bf16_checkpoints_resumes_validates_exports_and_evaluates(tmp_path):
    """tutorial_train.py on a union config: the data set's control type from --control_type, cached latents, the
    frozen base in bf16, checkpoints, resume, --val_data; the export is diffusers' layout (ControlNetUnionModel loads
    it strictly), the SDXL checkpoint plus the export give the trained model, and tool_eval_control scores it."""
    import tool_add_control
    import tool_cache_latents
    import tool_eval_control
    from cldm.loader import load_model
    from cldm.model import load_state_dict, save_state_dict
    from tool_make_fill50k import make_fill50k
    from tutorial_train import main
    data = make_fill50k(tmp_path / "train", n=4, size=64, seed=0)
    held_out = make_fill50k(tmp_path / "held_out", n=2, size=64, seed=1)
    base = model_as_trained(TINY_XL)
    sd = save_state_dict(sd_checkpoint(base), tmp_path / "sd.safetensors")
    init = tool_add_control.main([str(sd), str(tmp_path / "ini.safetensors"), "--config", str(TINY_XL)])
    cache = tool_cache_latents.main(["--config", str(TINY_XL), "--ckpt", str(init), "--data_root", str(data),
                                     "--out", str(tmp_path / "cache")])
    out = tmp_path / "run"
    args = ["--config", str(TINY_XL), "--cached_latents", str(cache), "--batch_size", "2", "--logger_freq", "1000",
            "--accelerator", "cpu", "--devices", "1", "--output_dir", str(out), "--frozen_dtype", "bf16",
            "--precision", "bf16-mixed", "--checkpoint_every", "1", "--learning_rate", "1e-3", "--seed", "0",
            "--control_type", "mlsd", "--val_data", str(held_out), "--val_every", "2", "--val_samples", "2",
            "--val_steps", "2"]
    trainer = main([*args, "--resume_path", str(init), "--max_steps", "2"])
    assert trainer.lightning_module.control_type == ("mlsd",)
    first = {k: v.clone() for k, v in trainer.lightning_module.control_model.state_dict().items()}
    resumed = main([*args, "--resume", str(out / "checkpoints" / "last.ckpt"), "--max_steps", "3", "--force"])
    assert resumed.global_step == 3
    model = resumed.lightning_module
    changed = [k for k, v in model.control_model.state_dict().items() if not torch.equal(first[k], v)]
    assert "task_embedding" in changed and any(k.startswith("transformer_layes.") for k in changed)
    export = load_state_dict(out / "control_model.safetensors")
    theirs = diffusers.ControlNetUnionModel.from_config(diffusers_config(TINY_XL, model.control_model))
    theirs.load_state_dict(export, strict=True)
    trained = load_state_dict(out / "checkpoints" / "last.ckpt")
    loaded, report = load_model(TINY_XL, [sd, out / "control_model.safetensors"])
    control = {k: v for k, v in loaded.state_dict().items() if k.startswith("control_model.")}
    assert control and all(torch.equal(v, trained[k]) for k, v in control.items())
    assert not any(report.unexpected.values())
    summary = tool_eval_control.main(["--config", str(TINY_XL), "--control_type", "mlsd", "--ckpt", str(sd),
                                      str(out / "control_model.safetensors"), "--data_root", str(held_out), "--n", "2",
                                      "--metrics", "ssim", "--steps", "2", "--device", "cpu"])
    assert summary["metrics"]["ssim"]["paired_diff"]["mean"] != 0.0
    with pytest.raises(ValueError, match="--control_type applies to ControlNet-Union configs"):
        tool_eval_control.main(["--config", str(MODELS / "cldm_tiny_xl.yaml"), "--control_type", "mlsd",
                                "--ckpt", str(sd), "--data_root", str(held_out), "--n", "1"])


def test_files_round_trip_and_a_promax_file_loads_into_the_config(tiny, tmp_path):
    """The export loads back bit-exactly; a file with ProMax's 8 types loads into the 6-type config (the network
    takes the file's structure) and acts as the same file given as a unit; tool_convert_diffusers goes both ways."""
    import tool_convert_diffusers
    from cldm.loader import load_control_network
    from cldm.model import load_state_dict, save_state_dict
    export = tiny.control_state_dict()
    fresh = create_model(TINY_XL)
    fresh.load_control(export)
    assert all(torch.equal(a, b) for a, b in zip(fresh.control_model.state_dict().values(),
                                                 tiny.control_model.state_dict().values()))
    torch.manual_seed(1)
    promax = diffusers.ControlNetUnionModel.from_config(
        diffusers_config(TINY_XL, tiny.control_model) | {"num_control_type": 8})
    promax_file = save_state_dict(promax.state_dict(), tmp_path / "promax.safetensors")
    fresh.load_control(promax_file)
    assert fresh.control_model.num_control_type == 8 and fresh.control_model.control_types()[6:] == ("tile", "repaint")
    as_unit = load_control_network(promax_file, tiny, TINY_XL)
    assert all(torch.equal(a, b) for a, b in zip(fresh.control_model.state_dict().values(),
                                                 as_unit.state_dict().values()))
    folder = tool_convert_diffusers.main(["to-diffusers", str(promax_file), str(tmp_path / "folder"),
                                          "--config", str(TINY_XL)])
    assert diffusers.ControlNetUnionModel.from_pretrained(folder).config.num_control_type == 8
    back = tool_convert_diffusers.main(["from-diffusers", str(folder), str(tmp_path / "back.safetensors"),
                                        "--config", str(TINY_XL)])
    before, after = load_state_dict(promax_file), load_state_dict(back)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    other = OmegaConf.load(TINY_XL)
    other.model.params.control_stage_config.params.transformer_depth = [1, 1, 1]
    OmegaConf.save(other, tmp_path / "other.yaml")
    with pytest.raises(ValueError, match="promax.safetensors does not fit the model of --config .*other.yaml"):
        tool_convert_diffusers.main(["to-diffusers", str(promax_file), str(tmp_path / "other"),
                                     "--config", str(tmp_path / "other.yaml")])


def test_an_unlocked_run_exports_the_checkpoint_layout_with_the_decoder(tiny, tmp_path):
    """With sd_locked False the decoder trains too; diffusers' layout cannot hold it, so the export is the checkpoint
    layout plus the decoder, and the base checkpoint plus the export give the trained model."""
    from cldm.loader import load_model
    from cldm.model import save_state_dict
    model = model_as_trained(TINY_XL)
    model.sd_locked = False
    with torch.no_grad():
        model.model.diffusion_model.out[-1].bias.add_(0.5)
        model.control_model.task_embedding.add_(1.0)
    export = model.control_state_dict()
    assert CONTROLNET_UNION.layout(export) == "checkpoint" and "model.diffusion_model.out.2.bias" in export
    sd = save_state_dict(sd_checkpoint(model_as_trained(TINY_XL)), tmp_path / "sd.safetensors")
    loaded, _ = load_model(TINY_XL, [sd, save_state_dict(export, tmp_path / "export.safetensors")])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()
               if k.startswith(("control_model.", "model.diffusion_model.out", "model.diffusion_model.output_blocks")))


def test_a_union_on_an_sd1_base_is_a_controlnet_union_model_too():
    """The union network needs no SDXL: on the tiny SD1 base (no vector embedding) diffusers' class builds it from
    our config.json (addition_time_embed_dim given, addition_embed_type none) and computes the same residuals."""
    config = MODELS / "cldm_tiny_union.yaml"
    net = randomized(model_as_trained(config)).control_model.eval()
    theirs = diffusers.ControlNetUnionModel.from_config(diffusers_config(config, net))
    theirs.load_state_dict(diffusers_weights(net), strict=True)
    assert theirs.config.addition_embed_type is None
    g = torch.Generator().manual_seed(8)
    x, t, context = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ours = net.residuals(x, hint, t, context, control_type="hed")
        down, mid = theirs.eval()(x, t, encoder_hidden_states=context, controlnet_cond=[hint],
                                  control_type=torch.tensor([[0.0, 0, 1, 0, 0, 0]] * 2), control_type_idx=[2],
                                  return_dict=False)
    for a, b in zip(ours, [*down, mid]):
        assert b.abs().max() > 1e-3 and (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_an_export_records_the_condition_transformers_heads(tmp_path):
    """The condition transformer's heads are not in the tensors (xinsir's files have 8, the tiny configs 4). The
    export records them in its safetensors header, so the file is the trained network as a unit on a ControlNet
    model (the apps' case), in a model whose config says 8, and in the diffusers folder it converts to; a file
    without the record gets 8, which compute other residuals."""
    import json

    import tool_convert_diffusers
    from cldm.loader import load_control_network, load_model
    from cldm.model import save_state_dict
    from cldm.train_command import write_exports
    from ldm.checkpoint import read_metadata
    config = MODELS / "cldm_tiny_union.yaml"
    model = randomized(model_as_trained(config)).eval()
    [export] = write_exports(model, tmp_path / "union.safetensors", "raw", force=False, write=True)
    assert read_metadata(export) == CONTROLNET_UNION.recorded(model) == {"controlnet_union": '{"num_trans_head": 4}'}
    controlnet_config = MODELS / "cldm_tiny.yaml"
    as_unit = load_control_network(export, model_as_trained(controlnet_config), controlnet_config)
    bare = load_control_network(save_state_dict(model.control_state_dict(), tmp_path / "bare.safetensors"),
                                model_as_trained(controlnet_config), controlnet_config)
    assert (as_unit.arguments["num_trans_head"], bare.arguments["num_trans_head"]) == (4, 8)
    g = torch.Generator().manual_seed(8)
    x, t, context = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        trained, unit, unrecorded = (net.residuals(x, hint, t, context, control_type="depth")
                                     for net in (model.control_model, as_unit, bare))
        assert all(torch.equal(a, b) for a, b in zip(unit, trained))
        assert not all(torch.equal(a, b) for a, b in zip(unrecorded, trained))
    other = OmegaConf.load(config)
    other.model.params.control_stage_config.params.num_trans_head = 8
    OmegaConf.save(other, tmp_path / "eight_heads.yaml")
    sd = save_state_dict(sd_checkpoint(model), tmp_path / "sd.safetensors")
    loaded, _ = load_model(tmp_path / "eight_heads.yaml", [sd, export])
    assert loaded.control_model.arguments["num_trans_head"] == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.control_model.state_dict().values(),
                                                 model.control_model.state_dict().values()))
    folder = tool_convert_diffusers.main(["to-diffusers", str(export), str(tmp_path / "folder"),
                                          "--config", str(tmp_path / "eight_heads.yaml")])
    assert json.loads((folder / "config.json").read_text())["num_trans_head"] == 4
    back = tool_convert_diffusers.main(["from-diffusers", str(folder), str(tmp_path / "back.safetensors"),
                                        "--config", str(config)])
    assert read_metadata(back) == read_metadata(export)

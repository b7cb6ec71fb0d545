"""ControlNet-XS mode (cldm/controlnet_xs.py): the published structures (diffusers' ControlNetXSAdapter for SD2.1 and
SDXL), the exchange with the UNet against diffusers' UNetControlNetXSModel, sampling against diffusers' ControlNet-XS
pipelines, the files, training and mixed units."""

import csv
import json
import os
from dataclasses import replace

import diffusers
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers_schedulers import SDXL_SCHEDULER_CONFIG, documented_scheduler
from omegaconf import OmegaConf

from cldm.control import ControlUnit
from cldm.controlnet_xs import ControlNetXS, XSConfig, load_controlnet_xs, save_folder
from cldm.loader import load_control_network
from cldm.model import create_model, load_state_dict, save_state_dict
from cldm.modes import recognise
from cldm.pipeline import sample
from conftest import (
    PROMPTS,
    ROOT,
    SEEDS,
    diffusers_unet,
    diffusers_vae,
    meta_tensors,
    model_as_trained,
    randomize_zero_convs,
    sd_checkpoint,
    sd_pipeline_latents,
    sdxl_pipeline_latents,
    shapes,
)
from ldm.checkpoint import UserError
from ldm.models.diffusion.samplers import SAMPLERS

MODELS = ROOT / "models"
TINY, TINY_XL = MODELS / "cldm_tiny_v21_xs.yaml", MODELS / "cldm_tiny_xl_xs.yaml"
# stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0, unet/config.json (the fields that shape it)
SD21_UNET = dict(attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 layers_per_block=2, sample_size=96, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 upcast_attention=True, use_linear_projection=True)
SDXL_UNET = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
                 projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
# The published adapters as ControlNetXSAdapter.from_unet makes them: UmerHA/Testing-ConrolNetXS-SD2.1-canny
# (widths 4/8/16/16) and -SDXL-canny (size ratio 0.1), both with a learnt time embedding.
PUBLISHED = {"cldm_v21_xs.yaml": (SD21_UNET, dict(block_out_channels=[4, 8, 16, 16], num_attention_heads=4,
                                                  learn_time_embedding=True)),
             "cldm_xl_xs.yaml": (SDXL_UNET, dict(size_ratio=0.1, num_attention_heads=4, learn_time_embedding=True))}
# config fields that change nothing computed
BOOKKEEPING = dict(sample_size=None, upcast_attention=False)


def published_adapter(config: str) -> diffusers.ControlNetXSAdapter:
    unet_config, adapter_args = PUBLISHED[config]
    with torch.device("meta"):
        return diffusers.ControlNetXSAdapter.from_unet(diffusers.UNet2DConditionModel(**unet_config), **adapter_args)


def with_unet_norms(xs_unet: diffusers.UNetControlNetXSModel, eps: float = 1e-5) -> diffusers.UNetControlNetXSModel:
    """diffusers' UNetControlNetXSModel rebuilds the base UNet's resnets with ResnetBlock2D's default eps 1e-6 instead
    of the UNet's norm_eps 1e-5 (its control middle block keeps 1e-6 as the adapter has it): give the base its own."""
    control_middle = {id(r) for r in xs_unet.mid_block.ctrl_midblock.resnets}
    for m in xs_unet.modules():
        if isinstance(m, ResnetBlock2D) and id(m) not in control_middle and m.norm1.eps != eps:
            m.norm1.eps = m.norm2.eps = eps
    return xs_unet


# ---- structure -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(PUBLISHED))
def test_full_size_model_holds_diffusers_controlnet_xs_adapter(config):
    model = create_model(MODELS / config, device="meta")
    theirs = published_adapter(config)
    assert shapes(model.control_state_dict()) == shapes(theirs.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in theirs.parameters())
    assert {id(p) for p in trainable} == {id(p) for p in model.control_model.parameters()}
    # the project's loading path: a file of their tensors is recognised, built with their structure, and fits
    file = meta_tensors(shapes(theirs.state_dict()))
    assert str(recognise(file)) == "controlnet-xs, diffusers layout"
    net = load_controlnet_xs(file, {"num_attention_heads": 4})
    assert replace(net.config, **BOOKKEEPING) == replace(model.control_model.config, **BOOKKEEPING)
    net.check_fits(model.model.diffusion_model)


def control_norms(net) -> list[tuple[int, float]]:
    """(groups, eps) of every norm of an adapter's control blocks, level by level, then the middle block: ours
    (ControlNetXS) or diffusers' UNetControlNetXSModel."""
    ours = isinstance(net, ControlNetXS)
    out = []
    blocks = [(b.resnets, getattr(b, "attentions", [])) if ours else (b.ctrl_resnets, b.ctrl_attentions)
              for b in net.down_blocks]
    middle = net.mid_block.midblock if ours else net.mid_block.ctrl_midblock
    for resnets, attentions in [*blocks, (middle.resnets, middle.attentions)]:
        for r in resnets:
            norms = (r.in_layers[0], r.out_layers[0]) if ours else (r.norm1, r.norm2)
            out += [(n.num_groups, n.eps) for n in norms]
        out += [(a.norm.num_groups, a.norm.eps) for a in attentions if a is not None]
    return out


@pytest.mark.parametrize("config", [*PUBLISHED, TINY.name, TINY_XL.name])
def test_diffusers_fused_model_keeps_the_adapters_norms(config):
    """diffusers' UNetControlNetXSModel.from_unet rebuilds the control blocks and takes the group counts of each
    level's first resnet as the most any of the level's norms may have: for narrow adapters (e.g. widths 8/16/32 on a
    32/64/128 UNet) it then normalises otherwise than its own ControlNetXSAdapter. Not for the published adapters,
    nor for the tiny configs the parity tests use."""
    model = create_model(MODELS / config, device="meta")
    if config in PUBLISHED:
        unet_config, _ = PUBLISHED[config]
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**unet_config)
        adapter = published_adapter(config)
    else:
        unet = diffusers_unet(model_as_trained(MODELS / config), MODELS / config)
        adapter = diffusers.ControlNetXSAdapter.from_config(model.control_model.config.diffusers_config())
    with torch.device(next(unet.parameters()).device):
        fused = diffusers.UNetControlNetXSModel.from_unet(unet, adapter)
    assert control_norms(fused) == control_norms(model.control_model)


def plain_sd_checkpoint(model, path):
    return save_state_dict(sd_checkpoint(model), path)


def test_a_fresh_adapter_leaves_the_unet_unchanged_and_only_it_trains(tmp_path):
    """Without a learnt time embedding a plain SD checkpoint starts it; with one, tool_add_control.py copies the
    UNet's time embedding into it (a plain checkpoint is refused: a random one would replace the UNet's)."""
    import tool_add_control
    from cldm.loader import MissingWeightsError, load_model
    g = torch.Generator().manual_seed(0)
    for config, size in ((TINY_XL, 64), (TINY, 32)):
        sd = plain_sd_checkpoint(model_as_trained(config), tmp_path / f"{config.stem}_sd.safetensors")
        if model_as_trained(config).control_model.config.learn_time_embedding:
            with pytest.raises(MissingWeightsError, match="control_model.time_embed"):
                load_model(config, [sd], initial=True)
            sd = tool_add_control.main([str(sd), str(tmp_path / f"{config.stem}_ini.safetensors"),
                                        "--config", str(config)])
        model, _ = load_model(config, [sd], initial=True)
        model.eval()
        unet = model.model.diffusion_model
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "control_model." + k for k in model.control_model.state_dict()}
        with pytest.raises(ValueError, match="UNet stays locked"):
            model.sd_locked = False
        latent = size // 8
        x, t = torch.randn(2, 4, latent, latent, generator=g), torch.tensor([10, 500])
        hint = torch.rand(2, 3, size, size, generator=g)
        batch = {"jpg": torch.rand(2, size, size, 3, generator=g) * 2 - 1, "hint": hint.permute(0, 2, 3, 1),
                 "txt": PROMPTS}
        with torch.no_grad():
            _, cond = model.get_input(batch, "jpg")
            controlled = model.apply_model(x, t, cond)
            plain = unet(x, t, context=cond["c_crossattn"][0], y=cond.get("c_adm"))
        torch.testing.assert_close(controlled, plain, rtol=0, atol=1e-6)
        model.train()
        loss, _ = model.shared_step(batch)
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("control_model."))
        # at step 0 the gradients reach the connections into the UNet; the rest waits for them to grow
        grads = {n: p.grad for n, p in model.control_model.named_parameters()}
        assert all(grads[n].abs().sum() > 0 for n in grads if "ctrl_to_base" in n or "control_to_base" in n)


# ---- the exchange against diffusers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = model_as_trained(TINY, control=True).eval()
    unet = diffusers_unet(model, TINY)
    folder = save_folder(model.control_model, tmp_path_factory.mktemp("xs") / "adapter")
    return model, unet, diffusers.ControlNetXSAdapter.from_pretrained(folder).eval()


def test_one_forward_equals_unet_controlnet_xs_model(tiny):
    model, unet, adapter = tiny
    theirs = diffusers.UNetControlNetXSModel.from_unet(unet, adapter).eval()
    g = torch.Generator().manual_seed(3)
    x, t, hint = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([15, 700]), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)
        plain = model.model.diffusion_model(x, t, context=context)
        # diffusers' base resnets run at eps 1e-6: their model without control is not their own UNet
        def uncontrolled() -> torch.Tensor:
            return theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, apply_control=False).sample

        assert (uncontrolled() - plain).abs().max() > 1e-5
        with_unet_norms(theirs)
        torch.testing.assert_close(uncontrolled(), plain, rtol=0, atol=0)
        ours = model.apply_model(x, t, {"c_crossattn": [context], "control": [model.unit(hint, strength=0.7)]})
        expected = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=0.7).sample
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def sd_pipeline(unet, adapter, sampler: str) -> diffusers.StableDiffusionControlNetXSPipeline:
    pipe = diffusers.StableDiffusionControlNetXSPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, controlnet=adapter,
        scheduler=documented_scheduler(SAMPLERS[sampler].label), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with_unet_norms(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_sampling_matches_stable_diffusion_controlnet_xs_pipeline(tiny, sampler):
    """controlnet_conditioning_scale 0.7 on steps 2 and 3 of 6 (control_guidance_start 0.2, end 0.7) is a unit of
    strength 0.7 from 0.2 to 0.7."""
    model, unet, adapter = tiny
    hint = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps, cfg = 6, 7.5
    ours = sample(model, PROMPTS, units=[model.unit(hint, strength=0.7, start=0.2, end=0.7)], sampler=sampler,
                  steps=steps, cfg_scale=cfg, seed=SEEDS, decode=False).latents
    theirs = sd_pipeline_latents(sd_pipeline(unet, adapter, sampler), model, PROMPTS, SEEDS, 32, steps, cfg,
                                 image=hint, controlnet_conditioning_scale=0.7, control_guidance_start=0.2,
                                 control_guidance_end=0.7)
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"{sampler}: relative difference {error:.2e}"
    whole = sample(model, PROMPTS, units=[model.unit(hint, strength=0.7)], sampler=sampler, steps=steps,
                   cfg_scale=cfg, seed=SEEDS, decode=False).latents
    assert (whole - ours).abs().max() > 1e-3 * ours.abs().max()  # the window matters


def test_sampling_matches_stable_diffusion_xl_controlnet_xs_pipeline(tmp_path):
    model = model_as_trained(TINY_XL, control=True).eval()
    adapter = diffusers.ControlNetXSAdapter.from_pretrained(save_folder(model.control_model, tmp_path / "a")).eval()
    pipe = diffusers.StableDiffusionXLControlNetXSPipeline(
        vae=diffusers_vae(model, TINY_XL), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=diffusers_unet(model, TINY_XL), controlnet=adapter,
        scheduler=diffusers.DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    with_unet_norms(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    steps, cfg = 6, 6.0
    ours = sample(model, PROMPTS, units=[model.unit(hint, strength=0.8, end=0.5)], sampler="ddim", steps=steps,
                  cfg_scale=cfg, seed=SEEDS, decode=False).latents
    theirs = sdxl_pipeline_latents(pipe, model, PROMPTS, SEEDS, 64, steps, cfg, image=hint,
                                   controlnet_conditioning_scale=0.8, control_guidance_end=0.5)
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"relative difference {error:.2e}"


# ---- files ---------------------------------------------------------------------------------------------------

def test_export_is_diffusers_layout_and_loads_back_bit_exact(tmp_path):
    model = model_as_trained(TINY, control=True).eval()
    net = model.control_model
    export = model.control_state_dict()
    theirs = diffusers.ControlNetXSAdapter.from_config(net.config.diffusers_config())
    theirs.load_state_dict(export, strict=True)  # diffusers' names and shapes
    path = save_state_dict(export, tmp_path / "xs.safetensors")
    assert str(recognise(load_state_dict(path))) == "controlnet-xs, diffusers layout"
    checkpoint = {"control_model." + k: v for k, v in net.state_dict().items()}
    assert str(recognise(checkpoint)) == "controlnet-xs, checkpoint layout"
    folder = save_folder(net, tmp_path / "folder")
    with pytest.raises(FileExistsError):
        save_folder(net, folder)
    shown = {"num_attention_heads": 2, "time_embedding_mix": 0.9}  # what the tensors do not show
    for source in (path, folder, checkpoint):
        loaded = load_controlnet_xs(source, shown if source is not folder else None)  # a folder has config.json
        assert replace(loaded.config, **BOOKKEEPING) == replace(net.config, **BOOKKEEPING)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    # the model's own file: loaded over a fresh model, the same adapter; its heads and mix are the model's
    fresh = create_model(TINY)
    assert fresh.load_control(path).ok
    assert all(torch.equal(a, b) for a, b in zip(fresh.control_model.state_dict().values(), net.state_dict().values()))
    assert fresh.control_model.config == net.config


def test_files_of_other_modes_are_not_taken_for_controlnet_xs_and_bad_ones_are_refused(tmp_path):
    from cldm.controlnet_xs import CONTROLNET_XS
    for config in ("cldm_tiny.yaml", "cldm_tiny_lora.yaml", "cldm_tiny_lllite.yaml", "cldm_tiny_t2i.yaml"):
        assert CONTROLNET_XS.layout(create_model(MODELS / config, device="meta").control_state_dict()) is None
    net = model_as_trained(TINY, control=True).eval().control_model
    # an SDXL-shaped UNet: other widths and levels
    other = model_as_trained(TINY_XL, control=True).eval().model.diffusion_model
    with pytest.raises(ValueError, match="made for another UNet: base_block_out_channels: adapter \\[32, 64\\]"):
        net.check_fits(other)
    with pytest.raises(ValueError, match="give exactly one of size_ratio and block_out_channels"):
        ControlNetXS.from_unet(other)
    with pytest.raises(ValueError, match="time_embedding_mix below 1 needs learn_time_embedding"):
        XSConfig(time_embedding_mix=0.5)
    with pytest.raises(ValueError, match="3 attention heads do not fit a control block 2 channels wide"):
        XSConfig(block_out_channels=(2, 4, 8, 8), num_attention_heads=3)
    # the file as a unit on another base: refused by the loader, naming the file
    xl = model_as_trained(TINY_XL, control=True).eval()
    path = save_state_dict(to_diffusers_file(net), tmp_path / "v21.safetensors")
    with pytest.raises(UserError, match="v21.safetensors \\(controlnet-xs\\) does not fit the model of this config"):
        load_control_network(path, xl, TINY_XL)


def to_diffusers_file(net: ControlNetXS) -> dict[str, torch.Tensor]:
    from cldm.controlnet_xs import to_diffusers
    return to_diffusers(net)


# ---- training and mixed units -------------------------------------------------------------------------------------

def test_tutorial_train_controlnet_xs_cached_bf16_checkpoints_resumes_validates_and_exports(tmp_path):
    import tool_add_control
    import tool_cache_latents
    from tool_make_fill50k import make_fill50k
    from tutorial_train import main
    data = make_fill50k(tmp_path / "train", n=8, size=32, seed=0)
    held_out = make_fill50k(tmp_path / "held_out", n=2, size=32, seed=1)
    sd = plain_sd_checkpoint(model_as_trained(TINY), tmp_path / "sd.safetensors")
    init = tool_add_control.main([str(sd), str(tmp_path / "ini.safetensors"), "--config", str(TINY)])
    cache = tool_cache_latents.main(["--config", str(TINY), "--ckpt", str(init), "--data_root", str(data),
                                     "--out", str(tmp_path / "cache")])
    out = tmp_path / "run"
    args = ["--config", str(TINY), "--cached_latents", str(cache), "--batch_size", "2", "--logger_freq", "1000",
            "--accelerator", "cpu", "--devices", "1", "--output_dir", str(out), "--frozen_dtype", "bf16",
            "--precision", "bf16-mixed", "--checkpoint_every", "1", "--learning_rate", "1e-3", "--seed", "0",
            "--gradient_checkpointing", "True",
            "--val_data", str(held_out), "--val_every", "2", "--val_samples", "2", "--val_steps", "2"]
    trainer = main([*args, "--resume_path", str(init), "--max_steps", "2"])
    first = {k: v.clone() for k, v in trainer.lightning_module.control_model.state_dict().items()}
    resumed = main([*args, "--resume", str(out / "checkpoints" / "last.ckpt"), "--max_steps", "3", "--force"])
    assert resumed.global_step == 3
    model = resumed.lightning_module
    assert any(not torch.equal(first[k], v) for k, v in model.control_model.state_dict().items())
    with open(os.path.join(resumed.loggers[1].log_dir, "metrics.csv")) as f:
        assert any(r.get("val/fill_iou") for r in csv.DictReader(f))
    # the training checkpoint and the export record the heads and mix their tensors do not show
    from ldm.checkpoint import read_metadata
    recorded = model.control_mode.recorded(model)
    assert read_metadata(out / "checkpoints" / "last.ckpt") == read_metadata(out / "control_model.safetensors") == \
        recorded and '"num_attention_heads": 2' in recorded["controlnet_xs"]
    # the export is diffusers' layout: ControlNetXSAdapter loads it strictly
    export = load_state_dict(out / "control_model.safetensors")
    theirs = diffusers.ControlNetXSAdapter.from_config(model.control_model.config.diffusers_config())
    theirs.load_state_dict(export, strict=True)
    fresh = create_model(TINY)
    fresh.load_control(out / "control_model.safetensors")
    assert all(torch.equal(v.float(), export[k].float()) for k, v in to_diffusers_file(fresh.control_model).items())


def test_controlnet_and_controlnet_xs_units_in_one_sample(tmp_path):
    """An XS file and a ControlNet file, recognised by the registry, as units of one sample() call on a ControlNet
    model: one forward is the UNet given the ControlNet's residuals and the XS hook at once; each unit acts."""
    config = MODELS / "cldm_tiny.yaml"
    model = model_as_trained(config).eval()
    randomize_zero_convs(model)
    xs = model_as_trained(MODELS / "cldm_tiny_xs.yaml", seed=1, control=True).eval()
    files = {"controlnet": save_state_dict(model.control_state_dict(), tmp_path / "cn.safetensors"),
             "controlnet-xs": save_state_dict(xs.control_state_dict(), tmp_path / "xs.safetensors")}
    nets = {mode: load_control_network(path, model, config) for mode, path in files.items()}
    assert {recognise(load_state_dict(p)).mode.name for p in files.values()} == set(files)
    g = torch.Generator().manual_seed(3)
    hints = {mode: torch.rand(2, 3, 32, 32, generator=g) for mode in files}
    units = [ControlUnit(nets["controlnet"], hints["controlnet"], strength=0.8),
             ControlUnit(nets["controlnet-xs"], hints["controlnet-xs"], strength=0.6, start=0.25)]
    unet = model.model.diffusion_model
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([50, 900])
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)
        got = model.apply_model(x, t, {"c_crossattn": [context], "control": units}, sampling_step=(1, 4))
        residuals = [0.8 * r for r in nets["controlnet"](x, hints["controlnet"], t, context)]
        hook = nets["controlnet-xs"].hook(unet, hints["controlnet-xs"], [0.6], x, t, context, None)
        torch.testing.assert_close(got, unet(x, t, context=context, control=residuals, hooks=(hook,)), rtol=0, atol=0)
        early = model.apply_model(x, t, {"c_crossattn": [context], "control": units}, sampling_step=(0, 4))
        torch.testing.assert_close(early, unet(x, t, context=context, control=residuals), rtol=0, atol=0)
    together = sample(model, PROMPTS, units=units, steps=4, seed=SEEDS, decode=False).latents
    for left_out in range(2):
        fewer = sample(model, PROMPTS, units=units[:left_out] + units[left_out + 1:], steps=4, seed=SEEDS,
                       decode=False).latents
        assert (fewer - together).abs().max() > 1e-3 * together.abs().max(), f"unit {left_out} does nothing"


def test_two_controlnet_xs_units_add_up_in_either_order():
    """Each adapter reads the UNet block's input, which both see alike, and adds to its output: two adapters without
    a learnt time embedding commute. (Learnt time embeddings are mixed in one after the other, in the units' order.)"""
    model = model_as_trained(MODELS / "cldm_tiny_xs.yaml", control=True).eval()
    other = model_as_trained(MODELS / "cldm_tiny_xs.yaml", seed=1, control=True).eval().control_model
    g = torch.Generator().manual_seed(5)
    hints = [torch.rand(2, 3, 32, 32, generator=g) for _ in range(2)]
    a, b = ControlUnit(model.control_model, hints[0], strength=0.7), ControlUnit(other, hints[1], strength=0.4)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 600])
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)

        def eps(units):
            return model.apply_model(x, t, {"c_crossattn": [context], "control": units})
        both, swapped, alone_a, alone_b = eps([a, b]), eps([b, a]), eps([a]), eps([b])
    torch.testing.assert_close(both, swapped, rtol=0, atol=1e-5)  # the sums in another order
    assert (both - alone_a).abs().max() > 1e-3 and (both - alone_b).abs().max() > 1e-3


def test_tool_convert_diffusers_for_controlnet_xs(tmp_path):
    import tool_convert_diffusers
    model = model_as_trained(TINY, control=True).eval()
    export = save_state_dict(model.control_state_dict(), tmp_path / "xs.safetensors")
    checkpoint = save_state_dict(model.state_dict(), tmp_path / "run.ckpt")
    for source in (export, checkpoint):
        folder = tool_convert_diffusers.main(["to-diffusers", str(source), str(tmp_path / "folder"), "--config",
                                              str(TINY), "--force"])
        theirs = diffusers.ControlNetXSAdapter.from_pretrained(folder)
        assert theirs.config.num_attention_heads == 2 and theirs.config.time_embedding_mix == 0.9
        ours = to_diffusers_file(model.control_model)
        assert all(torch.equal(v, ours[k]) for k, v in theirs.state_dict().items())
    back = tool_convert_diffusers.main(["from-diffusers", str(folder), str(tmp_path / "back.safetensors"),
                                        "--config", str(TINY)])
    before, after = load_state_dict(export), load_state_dict(back)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="another structure than the --config builds"):
        tool_convert_diffusers.main(["to-diffusers", str(export), str(tmp_path / "other"), "--config", str(TINY_XL)])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="config.json has num_attention_heads 4 \\(config 2\\)"):
        tool_convert_diffusers.main(["from-diffusers", str(folder), str(tmp_path / "other.safetensors"),
                                     "--config", str(TINY)])


def test_an_export_records_what_its_tensors_do_not_show(tmp_path):
    """The attention heads and the time-embedding mix are not in the tensors. The export records them in its
    safetensors header, so the file is the trained adapter as a unit on a model of another mode (the apps' case), in
    a model whose config says otherwise, and in the diffusers folder it converts to; a file without the record gets
    diffusers' defaults (4 heads, mix 1), which here compute something else."""
    import tool_convert_diffusers
    from cldm.controlnet_xs import CONTROLNET_XS
    from cldm.loader import load_model
    from cldm.train_command import write_exports
    from ldm.checkpoint import read_metadata
    model = model_as_trained(MODELS / "cldm_tiny_xs.yaml", control=True).eval()  # 2 heads
    [export] = write_exports(model, tmp_path / "xs.safetensors", "raw", force=False, write=True)
    assert read_metadata(export) == CONTROLNET_XS.recorded(model)
    controlnet_config = MODELS / "cldm_tiny.yaml"
    as_unit = load_control_network(export, model_as_trained(controlnet_config), controlnet_config)
    assert replace(as_unit.config, **BOOKKEEPING) == replace(model.control_model.config, **BOOKKEEPING)
    bare = save_state_dict(model.control_state_dict(), tmp_path / "bare.safetensors")
    unrecorded = load_control_network(bare, model_as_trained(controlnet_config), controlnet_config)
    assert unrecorded.config.num_attention_heads == 4
    g = torch.Generator().manual_seed(9)
    x, t, hint = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([40, 600]), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        cond = {"c_crossattn": [model.get_learned_conditioning(PROMPTS)]}

        def eps(net) -> torch.Tensor:
            return model.apply_model(x, t, {**cond, "control": [ControlUnit(net, hint, strength=0.8)]})
        expected = eps(model.control_model)
        torch.testing.assert_close(eps(as_unit), expected, rtol=0, atol=0)
        assert (eps(unrecorded) - expected).abs().max() > 1e-4
    # a .ckpt export, and a whole training checkpoint (Lightning's, the record beside its state_dict), alike
    recorded = CONTROLNET_XS.recorded(model)
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 3, "metadata": recorded}, lightning)
    for path in (save_state_dict(model.control_state_dict(), tmp_path / "xs.ckpt", metadata=recorded), lightning):
        assert read_metadata(path) == recorded
        net = load_control_network(path, model_as_trained(controlnet_config), controlnet_config)
        assert replace(net.config, **BOOKKEEPING) == replace(model.control_model.config, **BOOKKEEPING)
    garbled = save_state_dict(model.control_state_dict(), tmp_path / "garbled.safetensors",
                              metadata={"controlnet_xs": "{'heads': 2"})
    with pytest.raises(UserError, match="garbled.safetensors \\(controlnet-xs\\) does not fit.*'controlnet_xs' entry "
                                        "is not JSON"):
        load_control_network(garbled, model_as_trained(controlnet_config), controlnet_config)
    # an export of 2 heads and mix 0.9 under a config of 4 and 1: the model and the diffusers folder take the file's
    model = model_as_trained(TINY, control=True).eval()
    [export] = write_exports(model, tmp_path / "v21_xs.safetensors", "raw", force=False, write=True)
    config = OmegaConf.load(TINY)
    config.model.params.control_stage_config.update(num_attention_heads=4, time_embedding_mix=1.0)
    OmegaConf.save(config, tmp_path / "other_heads.yaml")
    sd = plain_sd_checkpoint(model, tmp_path / "sd.safetensors")
    loaded, _ = load_model(tmp_path / "other_heads.yaml", [sd, export])
    assert loaded.control_model.config == model.control_model.config
    folder = tool_convert_diffusers.main(["to-diffusers", str(export), str(tmp_path / "folder"),
                                          "--config", str(tmp_path / "other_heads.yaml")])
    theirs = json.loads((folder / "config.json").read_text())
    assert (theirs["num_attention_heads"], theirs["time_embedding_mix"]) == (2, 0.9)
    back = tool_convert_diffusers.main(["from-diffusers", str(folder), str(tmp_path / "back.safetensors"),
                                        "--config", str(TINY)])
    assert read_metadata(back) == read_metadata(export)

"""T2I-Adapter mode (cldm/t2i_adapter.py): the published structures (diffusers' T2IAdapter and TencentARC's
files), where the features go in the UNet, and sampling equal to diffusers' adapter pipelines."""

import csv
import json
import os
from dataclasses import asdict

import diffusers
import pytest
import torch
from diffusers_schedulers import SDXL_SCHEDULER_CONFIG, documented_scheduler

from cldm.control import ControlUnit, FeatureAddition
from cldm.loader import load_control_network
from cldm.model import create_model, load_state_dict, save_state_dict
from cldm.modes import recognise
from cldm.pipeline import sample
from cldm.t2i_adapter import (
    AdapterConfig,
    T2IAdapter,
    diffusers_to_original,
    load_t2i_adapter,
    original_to_diffusers,
    save_adapter_folder,
)
from conftest import (
    PROMPTS,
    ROOT,
    SEEDS,
    diffusers_unet,
    meta_tensors,
    model_as_trained,
    randomize_zero_convs,
    randomize_zero_init,
    reference_keys,
    sd_checkpoint,
    sd_pipeline_latents,
    sdxl_pipeline_latents,
    shapes,
)
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.modules.diffusionmodules.openaimodel import MIDDLE, BlockSite

MODELS = ROOT / "models"
TINY, TINY_XL = MODELS / "cldm_tiny_t2i.yaml", MODELS / "cldm_tiny_xl_t2i.yaml"
# The published configs: TencentARC/t2iadapter_*_sd15v2 (canny and sketch take 1 channel), the
# t2i-adapter-*-sdxl-1.0 files, and TencentARC's colour adapter converted by diffusers' script.
PUBLISHED = {
    "sd15v2": dict(adapter_type="full_adapter", in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2,
                   downscale_factor=8),
    "sd15v2_gray": dict(adapter_type="full_adapter", in_channels=1, channels=[320, 640, 1280, 1280],
                        num_res_blocks=2, downscale_factor=8),
    "sdxl": dict(adapter_type="full_adapter_xl", in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2,
                 downscale_factor=16),
    "sdxl_gray": dict(adapter_type="full_adapter_xl", in_channels=1, channels=[320, 640, 1280, 1280],
                      num_res_blocks=2, downscale_factor=16),
    "color_sd14v1": dict(adapter_type="light_adapter", in_channels=3, channels=[320, 640, 1280], num_res_blocks=4,
                         downscale_factor=8),
}


def diffusers_adapter_on_meta(name: str) -> diffusers.T2IAdapter:
    with torch.device("meta"):
        return diffusers.T2IAdapter(**PUBLISHED[name])


# ---- structure -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,name", [("cldm_v15_t2i.yaml", "sd15v2"), ("cldm_xl_t2i.yaml", "sdxl")])
def test_full_size_model_holds_diffusers_t2i_adapter(config, name):
    model = create_model(MODELS / config, device="meta")
    theirs = shapes(diffusers_adapter_on_meta(name).state_dict())
    assert shapes(model.control_state_dict()) == theirs
    assert {k: tuple(p.shape) for k, p in model.named_parameters() if p.requires_grad} == {
        "control_model." + k: v for k, v in theirs.items()}


@pytest.fixture(scope="module")
def full_size():
    """The full-size SD1.5 and SDXL T2I-Adapter models on the meta device, by the YAML that builds each."""
    return {config: create_model(MODELS / config, device="meta")
            for config in ("cldm_v15_t2i.yaml", "cldm_xl_t2i.yaml")}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_diffusers_files_load_with_their_structure(name, full_size):
    """diffusers' layout of each published adapter: recognised, and through the mode's own network() (what the
    loader calls for a unit) an adapter of their structure that fits the full-size UNet it was made for."""
    from omegaconf import OmegaConf
    theirs = diffusers_adapter_on_meta(name)
    found = recognise(meta_tensors(shapes(theirs.state_dict())))
    assert (found.mode.name, found.layout) == ("t2i-adapter", "diffusers")
    config = "cldm_xl_t2i.yaml" if name.startswith("sdxl") else "cldm_v15_t2i.yaml"
    net = found.mode.network(meta_tensors(shapes(theirs.state_dict())), full_size[config],
                             OmegaConf.load(MODELS / config))
    assert net.config == AdapterConfig(**PUBLISHED[name])
    assert shapes(net.state_dict()) == shapes(theirs.state_dict())


@pytest.mark.parametrize("reference,name", [("t2iadapter_sd15v2", "sd15v2"), ("t2iadapter_sd15v2_gray", "sd15v2_gray"),
                                            ("t2iadapter_color_sd14v1", "color_sd14v1")])
def test_tencentarc_files_load_as_diffusers_t2i_adapter(reference, name):
    original = reference_keys(f"t2i_adapter/{reference}.keys.tsv")
    for prefix in ("", "adapter."):  # TencentARC's loader takes both
        found = recognise(meta_tensors({prefix + k: v for k, v in original.items()}))
        assert (found.mode.name, found.layout) == ("t2i-adapter", "tencentarc")
        net = load_t2i_adapter(meta_tensors({prefix + k: v for k, v in original.items()}))
        assert net.config == AdapterConfig(**PUBLISHED[name])
        assert shapes(net.state_dict()) == shapes(diffusers_adapter_on_meta(name).state_dict())
    # and back: the original names and shapes
    assert shapes(diffusers_to_original(net.state_dict(), net.config)) == original


def test_feature_sites_of_sd15_and_sdxl_are_diffusers():
    """Where diffusers' UNet2DConditionModel takes the features, read off its forward: SD1.5's three
    CrossAttnDownBlock2D take theirs before the downsampling and the DownBlock2D after its last block; SDXL's
    DownBlock2D after its downsampler, its two CrossAttnDownBlock2D before theirs, the fourth after the middle."""
    v15 = create_model(MODELS / "cldm_v15_t2i.yaml", device="meta")
    xl = create_model(MODELS / "cldm_xl_t2i.yaml", device="meta")
    assert v15.control_model.feature_sites(v15.model.diffusion_model) == [BlockSite("input", i) for i in (2, 5, 8, 11)]
    assert xl.control_model.feature_sites(xl.model.diffusion_model) == [
        BlockSite("input", 3), BlockSite("input", 5), BlockSite("input", 8), MIDDLE]
    with torch.device("meta"):
        full = T2IAdapter(**PUBLISHED["sd15v2"])
    with pytest.raises(ValueError, match=r"feature 1 \(640 channels at 1/16 of the hint\) -> input block 5"):
        full.feature_sites(xl.model.diffusion_model)  # the SD1.5 adapter's spacing is not SDXL's


@pytest.mark.parametrize("name", ["sd15v2", "sdxl_gray", "color_sd14v1"])
def test_features_equal_diffusers_t2i_adapter(name):
    small = dict(PUBLISHED[name], channels=[16, 32, 64, 64][:len(PUBLISHED[name]["channels"])])
    torch.manual_seed(0)
    ours = T2IAdapter(**small)
    theirs = diffusers.T2IAdapter(**small)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # 96 px: the last pooling meets an odd size (3 -> 2), where ceil_mode matters
    hint = torch.rand(2, small["in_channels"], 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, reference = ours(hint), theirs(hint)
    assert [f.shape for f in mine] == [f.shape for f in reference]
    assert all(torch.equal(a, b) for a, b in zip(mine, reference))


def test_v1_adapters_are_refused_by_name():
    keys = reference_keys("t2i_adapter/t2iadapter_sd15v2.keys.tsv")
    keys["body.0.skep.weight"] = (320, 320, 3, 3)
    with pytest.raises(ValueError, match="v1 adapter"):
        load_t2i_adapter(meta_tensors(keys))


# ---- placement ---------------------------------------------------------------------------------------------

def test_features_land_where_diffusers_unet_adds_them(tmp_path):
    """A 3-level UNet shaped like SD1.5's ends (attention on the first two levels, none and no downsampling on the
    last): our UNet with the adapter's hook equals diffusers' with down_intrablock_additional_residuals."""
    config = (MODELS / "cldm_tiny_t2i.yaml").read_text()
    config = config.replace("channel_mult: [ 1, 2 ]", "channel_mult: [ 1, 2, 2 ]").replace(
        "channels: [ 32, 64 ]", "channels: [ 32, 64, 64 ]")
    path = tmp_path / "three_levels.yaml"
    path.write_text(config)
    model = model_as_trained(path)
    unet = model.model.diffusion_model
    assert model.control_model.feature_sites(unet) == [BlockSite("input", i) for i in (1, 3, 5)]
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 800])
    features = [torch.randn(2, c, s, s, generator=g) for c, s in ((32, 8), (64, 4), (64, 2))]
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)
        hook = FeatureAddition(dict(zip(model.control_model.feature_sites(unet), features)))
        ours = unet(x, t, context=context, hooks=(hook,))
        plain = unet(x, t, context=context)
        theirs = diffusers_unet(model, path)(x, t, encoder_hidden_states=context,
                                             down_intrablock_additional_residuals=list(features)).sample
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["prompt", "control"])
def test_soft_modes_weight_the_features_as_the_a1111_extension(mode):
    """"My prompt is more important" and "ControlNet is more important" weight an adapter's four features by
    strength * (0.25, 0.62, 0.825, 1), sd-webui-controlnet's scripts/hook.py for T2I-Adapters (not the
    ControlNet's 0.825 decay); an adapter of another depth gets that span interpolated over its levels."""
    four = T2IAdapter(**dict(PUBLISHED["sd15v2"], channels=[16, 32, 64, 64]))
    unit = ControlUnit(four, torch.rand(1, 3, 64, 64), strength=0.5, mode=mode)
    assert unit.level_scales(four.num_levels()) == pytest.approx([0.125, 0.31, 0.4125, 0.5], abs=1e-12)
    light = T2IAdapter(**dict(PUBLISHED["color_sd14v1"], channels=[16, 32, 64]))
    assert ControlUnit(light, torch.rand(1, 3, 64, 64), mode=mode).level_scales(4) == pytest.approx(
        [0.25, 0.62, 0.825, 1.0], abs=1e-12)
    # the tiny model's two-level adapter, through the UNet: the soft unit is the balanced one at (0.25, 1) x 0.5
    model = model_as_trained(TINY).eval()
    g = torch.Generator().manual_seed(3)
    x, t, hint = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([30, 700]), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        cond = {"c_crossattn": [model.get_learned_conditioning(PROMPTS)]}
        soft = model.apply_model(x, t, {**cond, "control": [model.unit(hint, strength=0.5, mode=mode)]})
        weighted = model.apply_model(x, t, {**cond, "control": [model.unit(hint, scales=[0.125, 0.5])]})
        generic = model.apply_model(x, t, {**cond, "control": [model.unit(hint, scales=[0.5 * 0.825 ** 12, 0.5])]})
    torch.testing.assert_close(soft, weighted, rtol=0, atol=1e-6)
    assert (soft - generic).abs().max() > 1e-4


# ---- sampling against diffusers' pipelines --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model = model_as_trained(TINY).eval()
    return model, diffusers_unet(model, TINY)


def their_adapter(net: T2IAdapter, folder) -> diffusers.T2IAdapter:
    """diffusers' T2IAdapter.from_pretrained on our folder export."""
    save_adapter_folder(net, folder)
    return diffusers.T2IAdapter.from_pretrained(folder).eval()


def sd_pipeline(unet, adapter, sampler: str) -> diffusers.StableDiffusionAdapterPipeline:
    pipe = diffusers.StableDiffusionAdapterPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, adapter=adapter,
        scheduler=documented_scheduler(SAMPLERS[sampler].label), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sd(model, pipe, hint, scale, steps: int = 6, cfg: float = 7.5) -> torch.Tensor:
    return sd_pipeline_latents(pipe, model, PROMPTS, SEEDS, 32, steps, cfg, image=hint,
                               adapter_conditioning_scale=scale)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_sampling_matches_stable_diffusion_adapter_pipeline(tiny, tmp_path, sampler):
    model, unet = tiny
    hint = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = sample(model, PROMPTS, units=[model.unit(hint, strength=0.7)], sampler=sampler, steps=6,
                  cfg_scale=7.5, seed=SEEDS, decode=False).latents
    theirs = run_sd(model, sd_pipeline(unet, their_adapter(model.control_model, tmp_path / "a"), sampler), hint, 0.7)
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"{sampler}: relative difference {error:.2e}"
    plain = sample(model, PROMPTS, sampler=sampler, steps=6, cfg_scale=7.5, seed=SEEDS, decode=False).latents
    assert (plain - ours).abs().max() > 1e-2 * ours.abs().max()  # the adapter acts


def test_two_adapter_units_match_multi_adapter(tiny, tmp_path):
    model, unet = tiny
    torch.manual_seed(11)
    other = T2IAdapter(**asdict(model.control_model.config)).eval()
    g = torch.Generator().manual_seed(2)
    hints = [torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)]
    units = [ControlUnit(model.control_model, hints[0], strength=0.6), ControlUnit(other, hints[1], strength=0.3)]
    ours = sample(model, PROMPTS, units=units, sampler="ddim", steps=6, cfg_scale=7.5, seed=SEEDS,
                  decode=False).latents
    multi = diffusers.MultiAdapter([their_adapter(model.control_model, tmp_path / "a"),
                                    their_adapter(other, tmp_path / "b")])
    theirs = run_sd(model, sd_pipeline(unet, multi, "ddim"), hints, [0.6, 0.3])
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"relative difference {error:.2e}"


def test_sampling_matches_stable_diffusion_xl_adapter_pipeline_with_factor(tmp_path):
    """adapter_conditioning_scale 0.8 and adapter_conditioning_factor 0.5 (the adapter on the first half of the
    steps) are a unit's strength 0.8 and end 0.5."""
    model = model_as_trained(TINY_XL).eval()
    pipe = diffusers.StableDiffusionXLAdapterPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=diffusers_unet(model, TINY_XL), adapter=their_adapter(model.control_model, tmp_path / "a"),
        scheduler=diffusers.DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    steps, cfg = 6, 6.0
    ours = sample(model, PROMPTS, units=[model.unit(hint, strength=0.8, end=0.5)], sampler="ddim", steps=steps,
                  cfg_scale=cfg, seed=SEEDS, decode=False).latents
    theirs = sdxl_pipeline_latents(pipe, model, PROMPTS, SEEDS, 64, steps, cfg, image=hint,
                                   adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5)
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"relative difference {error:.2e}"
    whole = sample(model, PROMPTS, units=[model.unit(hint, strength=0.8)], sampler="ddim", steps=steps,
                   cfg_scale=cfg, seed=SEEDS, decode=False).latents
    assert (whole - ours).abs().max() > 1e-3 * ours.abs().max()  # the window matters


# ---- files ---------------------------------------------------------------------------------------------------

def test_layouts_round_trip_bit_exact(tmp_path):
    torch.manual_seed(0)
    net = T2IAdapter(channels=[32, 64], in_channels=1)
    original = diffusers_to_original(net.state_dict(), net.config)
    assert all(k.startswith(("conv_in.", "body.")) and ".resnets." not in k for k in original)
    back = original_to_diffusers(original)
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    folder = save_adapter_folder(net, tmp_path / "folder")
    assert json.loads((folder / "config.json").read_text())["adapter_type"] == "full_adapter"
    loaded = load_t2i_adapter(folder)
    hint = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(hint), loaded(hint)))
        # a gray adapter reads a colour hint as the mean of its channels
        assert all(torch.equal(a, b) for a, b in zip(net(hint), net(hint.mean(1, keepdim=True))))
    with pytest.raises(FileExistsError):
        save_adapter_folder(net, folder)


# ---- the mode: what trains, the file, training ---------------------------------------------------------------

def test_only_the_adapter_trains_and_gradients_reach_it():
    model = model_as_trained(TINY)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "control_model." + k for k in model.control_model.state_dict()}
    with pytest.raises(ValueError, match="UNet stays locked"):
        model.sd_locked = False
    g = torch.Generator().manual_seed(0)
    batch = {"jpg": torch.rand(2, 32, 32, 3, generator=g) * 2 - 1, "hint": torch.rand(2, 32, 32, 3, generator=g),
             "txt": PROMPTS}
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.control_model.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("control_model."))
    # initialised as diffusers and TencentARC do (PyTorch's defaults, nothing zeroed): it acts from the start
    hint = batch["hint"].permute(0, 3, 1, 2)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)
        controlled = model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
        plain = model.model.diffusion_model(x, t, context=context)
    assert (controlled - plain).abs().max() > 1e-3


def test_tutorial_train_t2i_adapter_cached_bf16_checkpoints_resumes_validates_and_exports(tmp_path):
    import tool_cache_latents
    from tool_make_fill50k import make_fill50k
    from tutorial_train import main
    data = make_fill50k(tmp_path / "train", n=8, size=32, seed=0)
    held_out = make_fill50k(tmp_path / "held_out", n=2, size=32, seed=1)
    base = model_as_trained(TINY)
    init = save_state_dict(sd_checkpoint(base), tmp_path / "sd.safetensors")  # the adapter starts fresh
    cache = tool_cache_latents.main(["--config", str(TINY), "--ckpt", str(init), "--data_root", str(data),
                                     "--out", str(tmp_path / "cache")])
    out = tmp_path / "run"
    args = ["--config", str(TINY), "--cached_latents", str(cache), "--batch_size", "2", "--logger_freq", "1000",
            "--accelerator", "cpu", "--devices", "1", "--output_dir", str(out), "--frozen_dtype", "bf16",
            "--precision", "bf16-mixed", "--checkpoint_every", "1", "--learning_rate", "1e-3", "--seed", "0",
            "--val_data", str(held_out), "--val_every", "2", "--val_samples", "2", "--val_steps", "2"]
    trainer = main([*args, "--resume_path", str(init), "--max_steps", "2"])
    first = {k: v.clone() for k, v in trainer.lightning_module.control_model.state_dict().items()}
    resumed = main([*args, "--resume", str(out / "checkpoints" / "last.ckpt"), "--max_steps", "3", "--force"])
    assert resumed.global_step == 3
    model = resumed.lightning_module
    assert any(not torch.equal(first[k], v) for k, v in model.control_model.state_dict().items())
    with open(os.path.join(resumed.loggers[1].log_dir, "metrics.csv")) as f:
        assert any(r.get("val/fill_iou") for r in csv.DictReader(f))
    # the export is diffusers' layout: T2IAdapter loads it strictly
    export = load_state_dict(out / "control_model.safetensors")
    theirs = diffusers.T2IAdapter(**asdict(model.control_model.config))
    theirs.load_state_dict(export, strict=True)
    fresh = create_model(TINY)
    fresh.load_control(out / "control_model.safetensors")
    assert all(torch.equal(v.float(), export[k].float()) for k, v in fresh.control_model.state_dict().items())


def test_controlnet_t2i_adapter_and_lllite_files_in_one_sample(tmp_path):
    """Three control files of three modes, recognised by the registry, as units of one sample() call on a
    ControlNet model: each acts, and one forward is the UNet given all three contributions at once."""
    config = MODELS / "cldm_tiny.yaml"
    model = model_as_trained(config).eval()
    randomize_zero_convs(model)
    lllite = model_as_trained(MODELS / "cldm_tiny_lllite.yaml").control_model
    randomize_zero_init(lllite)
    files = {"controlnet": save_state_dict(model.control_state_dict(), tmp_path / "cn.safetensors"),
             "t2i-adapter": save_state_dict(model_as_trained(TINY, seed=1).control_state_dict(),
                                            tmp_path / "t2i.safetensors"),
             "lllite": save_state_dict(dict(lllite.state_dict()), tmp_path / "lllite.safetensors")}
    for mode, path in files.items():
        assert recognise(load_state_dict(path)).mode.name == mode
    nets = {mode: load_control_network(path, model, config) for mode, path in files.items()}
    g = torch.Generator().manual_seed(3)
    hints = {mode: torch.rand(2, 3, 32, 32, generator=g) for mode in files}
    units = [ControlUnit(nets["controlnet"], hints["controlnet"], strength=0.8),
             ControlUnit(nets["t2i-adapter"], hints["t2i-adapter"], strength=0.6, end=0.5),
             ControlUnit(nets["lllite"], hints["lllite"], strength=0.9)]
    unet = model.model.diffusion_model
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([50, 900])
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)
        got = model.apply_model(x, t, {"c_crossattn": [context], "control": units}, sampling_step=(0, 4))
        residuals = [0.8 * r for r in nets["controlnet"](x, hints["controlnet"], t, context)]
        features = nets["t2i-adapter"](hints["t2i-adapter"])
        hook = FeatureAddition(dict(zip(nets["t2i-adapter"].feature_sites(unet), [0.6 * f for f in features])))
        adapter = nets["lllite"].adapter(unet, hints["lllite"], 0.9)
        expected = unet(x, t, context=context, control=residuals, adapter=adapter, hooks=(hook,))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        late = model.apply_model(x, t, {"c_crossattn": [context], "control": units}, sampling_step=(3, 4))
        expected_late = unet(x, t, context=context, control=residuals, adapter=adapter)  # past the adapter's end
        torch.testing.assert_close(late, expected_late, rtol=0, atol=1e-6)
    together = sample(model, PROMPTS, units=units, steps=4, seed=SEEDS, decode=False).latents
    assert torch.isfinite(together).all()
    for left_out in range(3):
        fewer = sample(model, PROMPTS, units=units[:left_out] + units[left_out + 1:], steps=4, seed=SEEDS,
                       decode=False).latents
        assert (fewer - together).abs().max() > 1e-3 * together.abs().max(), f"unit {left_out} does nothing"


def test_tool_convert_diffusers_both_ways_for_t2i_adapters(tmp_path):
    import tool_convert_diffusers
    torch.manual_seed(0)
    net = T2IAdapter(**asdict(create_model(TINY_XL, device="meta").control_model.config) | {"in_channels": 1})
    original = save_state_dict(diffusers_to_original(net.state_dict(), net.config), tmp_path / "tencentarc.pth")
    folder = tool_convert_diffusers.main(["to-diffusers", str(original), str(tmp_path / "diffusers"),
                                          "--config", str(TINY_XL)])
    theirs = diffusers.T2IAdapter.from_pretrained(folder).eval()
    assert theirs.config.adapter_type == "full_adapter_xl" and theirs.config.in_channels == 1
    hint = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(hint), theirs(hint)))
    for source in (folder, folder / "diffusion_pytorch_model.safetensors"):
        back = tool_convert_diffusers.main(["from-diffusers", str(source), str(tmp_path / "back.pth"),
                                            "--config", str(TINY_XL), "--force"])
        before, after = load_state_dict(original), load_state_dict(back)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # an SDXL adapter named with an SD config: the unshuffle factor does not fit
    with pytest.raises(ValueError, match="first conv takes 256 channels: not a gray or colour hint unshuffled by"):
        tool_convert_diffusers.main(["to-diffusers", str(original), str(tmp_path / "other"), "--config", str(TINY)])
    # an adapter of other widths
    with pytest.raises(ValueError, match="another structure than the --config builds"):
        tool_convert_diffusers.main(["from-diffusers", str(folder), str(tmp_path / "other.pth"),
                                     "--config", str(MODELS / "cldm_xl_t2i.yaml")])


def test_a_tencentarc_pth_is_a_unit_and_completes_a_model_through_the_loader(tmp_path):
    """TencentARC's file as they ship it (torch.save of their names, `.pth`) through the one loader the apps and
    tool_eval_control.py use: a unit's network on a ControlNet model, and the control file of a T2I-Adapter model
    beside a plain SD checkpoint; either is the adapter it was saved from."""
    from cldm.loader import load_model
    source = model_as_trained(TINY, seed=2).control_model.eval()
    path = tmp_path / "t2iadapter_tiny_sd15v2.pth"
    torch.save(diffusers_to_original(source.state_dict(), source.config), path)
    assert recognise(load_state_dict(path)).layout == "tencentarc"
    controlnet = model_as_trained(MODELS / "cldm_tiny.yaml").eval()
    unit_net = load_control_network(path, controlnet, MODELS / "cldm_tiny.yaml")
    sd = save_state_dict(sd_checkpoint(model_as_trained(TINY)), tmp_path / "sd.safetensors")
    model, report = load_model(TINY, [sd, path])
    assert report.ok
    hint = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = source(hint)
        for net in (unit_net, model.control_model):
            assert all(torch.equal(a, b) for a, b in zip(net(hint), expected))

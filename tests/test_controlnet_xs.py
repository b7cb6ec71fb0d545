"""ControlNet-XS mode (cldm/controlnet_xs.py): the published structures (diffusers' ControlNetXSAdapter for SD2.1 and
SDXL), the exchange with the UNet against diffusers' UNetControlNetXSModel, sampling against diffusers' ControlNet-XS
pipelines, the files, training and mixed units."""

import csv
import os
from dataclasses import asdict, replace

import diffusers
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils.torch_utils import randn_tensor

from cldm.control import Contribution, ControlUnit
from cldm.controlnet_xs import ControlNetXS, XSConfig, load_controlnet_xs, save_folder
from cldm.loader import load_control_network
from cldm.model import create_model, load_state_dict, save_state_dict
from cldm.modes import recognise
from cldm.pipeline import sample
from conftest import ROOT, diffusers_unet, diffusers_vae, model_as_trained, randomize_zero_convs, randomize_zero_init

MODELS = ROOT / "models"
TINY, TINY_XL = MODELS / "cldm_tiny_v21_xs.yaml", MODELS / "cldm_tiny_xl_xs.yaml"
PROMPTS = ["a red circle on a white background", "a blue circle on a black background"]
SEEDS = [7, 8]
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
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}
PEER_SCHEDULERS = {"ddim": lambda config: diffusers.DDIMScheduler.from_config(config),
                   "dpmpp_2m_karras": lambda config: diffusers.DPMSolverMultistepScheduler.from_config(
                       config, algorithm_type="dpmsolver++", use_karras_sigmas=True)}


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def published_adapter(config: str) -> diffusers.ControlNetXSAdapter:
    unet_config, adapter_args = PUBLISHED[config]
    with torch.device("meta"):
        return diffusers.ControlNetXSAdapter.from_unet(diffusers.UNet2DConditionModel(**unet_config), **adapter_args)


def trained_like(config, seed: int = 0):
    """A model of `config` with random UNet and adapter weights, its zero convs included: the control acts."""
    model = model_as_trained(config, seed).eval()
    randomize_zero_init(model.control_model)
    return model


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
    file = {k: torch.empty(v.shape, device="meta") for k, v in theirs.state_dict().items()}
    assert str(recognise(file)) == "controlnet-xs, diffusers layout"
    net = load_controlnet_xs(file, {"num_attention_heads": 4})
    bookkeeping = dict(sample_size=None, upcast_attention=False)  # fields that change nothing computed
    assert replace(net.config, **bookkeeping) == replace(model.control_model.config, **bookkeeping)
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
    return save_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}, path)


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
    model = trained_like(TINY)
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
        assert (theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, apply_control=False).sample - plain).abs().max() > 1e-5
        with_unet_norms(theirs)
        torch.testing.assert_close(theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, apply_control=False).sample, plain,
                                   rtol=0, atol=0)
        ours = model.apply_model(x, t, {"c_crossattn": [context], "control": [model.unit(hint, strength=0.7)]})
        expected = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=0.7).sample
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def sd_pipeline(unet, adapter, sampler: str) -> diffusers.StableDiffusionControlNetXSPipeline:
    pipe = diffusers.StableDiffusionControlNetXSPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, controlnet=adapter,
        scheduler=PEER_SCHEDULERS[sampler](SD21_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with_unet_norms(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", list(PEER_SCHEDULERS))
def test_sampling_matches_stable_diffusion_controlnet_xs_pipeline(tiny, sampler):
    """controlnet_conditioning_scale 0.7 on steps 2 and 3 of 6 (control_guidance_start 0.2, end 0.7) is a unit of
    strength 0.7 from 0.2 to 0.7."""
    model, unet, adapter = tiny
    hint = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps, cfg = 6, 7.5
    ours = sample(model, PROMPTS, units=[model.unit(hint, strength=0.7, start=0.2, end=0.7)], sampler=sampler,
                  steps=steps, cfg_scale=cfg, seed=SEEDS, decode=False).latents
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = randn_tensor((2, 4, 4, 4), generator=generators)
    with torch.no_grad():
        c = model.get_learned_conditioning(PROMPTS)
        uc = model.get_learned_conditioning([""] * len(PROMPTS))
        theirs = sd_pipeline(unet, adapter, sampler)(
            prompt_embeds=c, negative_prompt_embeds=uc, image=hint, height=32, width=32, num_inference_steps=steps,
            guidance_scale=cfg, generator=generators, latents=latents, controlnet_conditioning_scale=0.7,
            control_guidance_start=0.2, control_guidance_end=0.7, output_type="latent").images
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"{sampler}: relative difference {error:.2e}"
    whole = sample(model, PROMPTS, units=[model.unit(hint, strength=0.7)], sampler=sampler, steps=steps,
                   cfg_scale=cfg, seed=SEEDS, decode=False).latents
    assert (whole - ours).abs().max() > 1e-3 * ours.abs().max()  # the window matters


def test_sampling_matches_stable_diffusion_xl_controlnet_xs_pipeline(tmp_path):
    model = trained_like(TINY_XL)
    adapter = diffusers.ControlNetXSAdapter.from_pretrained(save_folder(model.control_model, tmp_path / "a")).eval()
    pipe = diffusers.StableDiffusionXLControlNetXSPipeline(
        vae=diffusers_vae(model, TINY_XL), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=diffusers_unet(model, TINY_XL), controlnet=adapter,
        scheduler=diffusers.DDIMScheduler.from_config(SDXL_SCHEDULER))
    with_unet_norms(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    steps, cfg = 6, 6.0
    ours = sample(model, PROMPTS, units=[model.unit(hint, strength=0.8, end=0.5)], sampler="ddim", steps=steps,
                  cfg_scale=cfg, seed=SEEDS, decode=False).latents
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = randn_tensor((2, 4, 8, 8), generator=generators)
    pooled_width = model.conditioner.embedders[1].model.text_projection.shape[1]
    with torch.no_grad():
        c, uc = model.text_conditioning(PROMPTS, (64, 64)), model.text_conditioning([""] * 2, (64, 64))
        theirs = pipe(prompt_embeds=c["c_crossattn"][0], pooled_prompt_embeds=c["c_adm"][:, :pooled_width],
                      negative_prompt_embeds=uc["c_crossattn"][0],
                      negative_pooled_prompt_embeds=uc["c_adm"][:, :pooled_width], image=hint, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=cfg, generator=generators, latents=latents,
                      controlnet_conditioning_scale=0.8, control_guidance_end=0.5, output_type="latent").images
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"relative difference {error:.2e}"

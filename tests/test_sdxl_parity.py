"""The tiny SDXL-structured model computes what diffusers' SDXL computes on the same weights.

diffusers' side: StableDiffusionXLPipeline.encode_prompt over transformers' CLIP text models (tokenizers built
from open_clip's bundled vocabulary, so nothing is downloaded), UNet2DConditionModel with the "text_time"
addition embedding (the UNet converted by diffusers' own LDM converter), and ControlNetModel converted by
tool_convert_diffusers.
"""

import diffusers
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as convert
from diffusers.utils.torch_utils import randn_tensor
from diffusers_schedulers import documented_scheduler
from omegaconf import OmegaConf

import tool_convert_diffusers
from cldm.model import save_state_dict
from cldm.pipeline import sample
from conftest import (
    ROOT,
    diffusers_unet,
    model_as_trained,
    randomize_zero_convs,
    write_clip_vocabulary,
)
from ldm.models.diffusion.samplers import SAMPLERS

TINY_XL = ROOT / "models" / "cldm_tiny_xl.yaml"
BOS, EOT = 49406, 49407
SIZE = (64, 64)
PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle on a white background"]
NEGATIVE = ["blurry, low quality", "a cat"]


def hf_tokenizers(folder) -> tuple:
    """transformers' CLIPTokenizer on open_clip's vocabulary: SDXL's tokenizer (pads with <|endoftext|>) and
    tokenizer_2 (pads with "!", token 0)."""
    files = write_clip_vocabulary(folder)
    return (transformers.CLIPTokenizer(*files, model_max_length=77),
            transformers.CLIPTokenizer(*files, model_max_length=77, pad_token="!"))


def hf_text_encoders(model) -> tuple:
    """transformers' CLIPTextModel and CLIPTextModelWithProjection holding the tiny conditioner's weights."""
    clip_l, big_g = model.conditioner.embedders[:2]
    text_l = clip_l.transformer.text_model
    config_l = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=text_l.embeddings.token_embedding.weight.shape[1], intermediate_size=128,
        num_hidden_layers=len(text_l.encoder.layers), num_attention_heads=2, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOT)
    encoder_l = transformers.CLIPTextModel(config_l).eval()
    sd = {k.removeprefix("text_model."): v for k, v in clip_l.transformer.state_dict().items()}
    encoder_l.load_state_dict(sd if "embeddings.token_embedding.weight" in encoder_l.state_dict()
                              else clip_l.transformer.state_dict(), strict=True)
    width, projection = big_g.model.text_projection.shape
    config_g = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, projection_dim=projection,
        num_hidden_layers=len(big_g.model.transformer.resblocks), num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=BOS, eos_token_id=EOT)
    encoder_g = transformers.CLIPTextModelWithProjection(config_g).eval()
    sd = convert.convert_open_clip_checkpoint(
        encoder_g, {f"m.{k}": v for k, v in big_g.model.state_dict().items()}, prefix="m.")
    missing, unexpected = encoder_g.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return encoder_l, encoder_g


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = model_as_trained(TINY_XL, control=True).eval()  # its ResBlocks' and transformers' zero outputs too
    randomize_zero_convs(model)
    unet = diffusers_unet(model, TINY_XL)
    tokenizer, tokenizer_2 = hf_tokenizers(tmp_path_factory.mktemp("tokenizer"))
    encoder_l, encoder_g = hf_text_encoders(model)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=encoder_l, text_encoder_2=encoder_g, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler())
    return model, pipe


def their_conditioning(pipe, prompts, negative=None, original=SIZE, crop=(0, 0), target=SIZE):
    with torch.no_grad():
        c, uc, pooled, uc_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=negative)
    time_ids = pipe._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return c, uc, pooled, uc_pooled, time_ids.repeat(len(prompts), 1)


@pytest.mark.parametrize("zero_empty_prompt", [True, False])
def test_text_conditioning_matches_diffusers_encode_prompt(tiny, zero_empty_prompt):
    model, pipe = tiny
    pooled_width = pipe.text_encoder_2.config.projection_dim
    model.conditioner.zero_empty_prompt = zero_empty_prompt
    pipe.register_to_config(force_zeros_for_empty_prompt=zero_empty_prompt)
    try:
        c, uc, pooled, uc_pooled, _ = their_conditioning(pipe, PROMPTS)
        with torch.no_grad():
            ours = model.text_conditioning(PROMPTS, SIZE)
            ours_uc = model.text_conditioning([""] * len(PROMPTS), SIZE)
        torch.testing.assert_close(ours["c_crossattn"][0], c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours["c_adm"][:, :pooled_width], pooled, atol=1e-5, rtol=1e-5)
        # no negative prompt: zeros (Stability's sampler, diffusers' default) or the encoded "" (option off)
        torch.testing.assert_close(ours_uc["c_crossattn"][0], uc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_uc["c_adm"][:, :pooled_width], uc_pooled, atol=1e-5, rtol=1e-5)
        assert (uc == 0).all() == zero_empty_prompt and (ours_uc["c_adm"][:, :pooled_width] == 0).all() == (
            zero_empty_prompt)
        # a negative prompt is encoded, as diffusers does
        _, uc, _, uc_pooled, _ = their_conditioning(pipe, PROMPTS, NEGATIVE)
        with torch.no_grad():
            ours_uc = model.text_conditioning(NEGATIVE, SIZE)
        torch.testing.assert_close(ours_uc["c_crossattn"][0], uc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_uc["c_adm"][:, :pooled_width], uc_pooled, atol=1e-5, rtol=1e-5)
    finally:
        model.conditioner.zero_empty_prompt = True


def test_size_embedding_equals_diffusers_add_time_proj(tiny):
    model, pipe = tiny
    pooled_width = pipe.text_encoder_2.config.projection_dim
    original, crop, target = (96, 80), (8, 16), (64, 48)
    *_, time_ids = their_conditioning(pipe, PROMPTS, original=original, crop=crop, target=target)
    with torch.no_grad():
        ours = model.text_conditioning(PROMPTS, (64, 48), original_size=original, crop=crop)["c_adm"]
        theirs = pipe.unet.add_time_proj(time_ids.flatten()).reshape(len(PROMPTS), -1)
    assert ours.shape == (2, pooled_width + theirs.shape[1])
    torch.testing.assert_close(ours[:, pooled_width:], theirs, atol=1e-6, rtol=1e-6)


def test_unet_eps_with_vector_conditioning_matches_diffusers(tiny):
    model, pipe = tiny
    c, _, pooled, _, time_ids = their_conditioning(pipe, PROMPTS, original=(96, 80), crop=(8, 16))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = model.text_conditioning(PROMPTS, SIZE, original_size=(96, 80), crop=(8, 16))
        ours = model.apply_model(x, t, cond)
        theirs = pipe.unet(x, t, encoder_hidden_states=c,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other_size = model.apply_model(x, t, model.text_conditioning(PROMPTS, SIZE))
    assert ours.abs().max() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-5 * ours.abs().max().item() + 1e-6
    assert not torch.allclose(ours, other_size, atol=1e-4)  # the size conditioning reaches the UNet


def test_controlnet_xl_residuals_match_diffusers_through_our_conversion(tiny, tmp_path):
    model, pipe = tiny
    save_state_dict(model.state_dict(), tmp_path / "full.safetensors")
    tool_convert_diffusers.main(["to-diffusers", str(tmp_path / "full.safetensors"), str(tmp_path / "cn"),
                                 "--config", str(TINY_XL)])
    net, info = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn", output_loading_info=True)
    assert not any(info.values()), info
    assert "add_embedding.linear_1.weight" in net.state_dict()
    c, _, pooled, _, time_ids = their_conditioning(pipe, PROMPTS, original=(96, 80), crop=(8, 16))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    hint = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        cond = model.text_conditioning(PROMPTS, SIZE, original_size=(96, 80), crop=(8, 16))
        ours = model.control_model(x=x, hint=hint, timesteps=t, context=cond["c_crossattn"][0], y=cond["c_adm"])
        down, mid = net.eval()(x, t, encoder_hidden_states=c, controlnet_cond=hint, return_dict=False,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert len(ours) == len(down) + 1 == 10
    with torch.no_grad():
        without_sizes = model.control_model(x=x, hint=hint, timesteps=t, context=cond["c_crossattn"][0],
                                            y=model.text_conditioning(PROMPTS, SIZE)["c_adm"])
    assert not torch.allclose(ours[-1], without_sizes[-1], atol=1e-4)  # y reaches the ControlNet
    for i, (a, b) in enumerate(zip(ours, [*down, mid])):
        assert a.abs().max() > 1e-3, f"residual {i} is zero"
        assert (a - b).abs().max().item() <= 1e-5, f"residual {i} differs by {(a - b).abs().max().item()}"


def sdxl_controlnet_pipeline(model, pipe, folder, sampler: str) -> diffusers.StableDiffusionXLControlNetPipeline:
    """StableDiffusionXLControlNetPipeline on the tiny model's weights (its ControlNet converted by
    tool_convert_diffusers), with the scheduler diffusers documents for the sampler's A1111 name."""
    save_state_dict(model.control_state_dict(), folder / "control.safetensors")
    tool_convert_diffusers.main(["to-diffusers", str(folder / "control.safetensors"), str(folder / "cn"),
                                 "--config", str(TINY_XL)])
    original = OmegaConf.to_container(OmegaConf.load(TINY_XL), resolve=True)
    sd = model.state_dict()
    vae_config = convert.create_vae_diffusers_config_from_ldm(original, sd)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert.convert_ldm_vae_checkpoint(sd, vae_config))
    xl = diffusers.StableDiffusionXLControlNetPipeline(
        vae=vae.eval(), text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
        controlnet=diffusers.ControlNetModel.from_pretrained(folder / "cn").eval(),
        scheduler=documented_scheduler(SAMPLERS[sampler].label))
    xl.set_progress_bar_config(disable=True)
    return xl


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_sampling_matches_diffusers_sdxl_controlnet_pipeline(tiny, tmp_path, sampler):
    """cldm.pipeline.sample on the tiny SDXL ControlLDM = StableDiffusionXLControlNetPipeline on the same weights,
    noise and generators (no negative prompt: zeros on both sides), final latents within float32 tolerance."""
    model, pipe = tiny
    xl = sdxl_controlnet_pipeline(model, pipe, tmp_path, sampler)
    seeds, steps, scale = [7, 8], 6, 6.0
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = sample(model, PROMPTS, units=[model.unit(hint)], sampler=sampler, steps=steps, cfg_scale=scale,
                  seed=seeds, decode=False).latents
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor((2, 4, 8, 8), generator=generators)
    with torch.no_grad():
        theirs = xl(PROMPTS, image=hint, height=64, width=64, num_inference_steps=steps, guidance_scale=scale,
                    generator=generators, latents=latents, output_type="latent").images
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"{sampler}: relative difference {error:.2e}"
    plain = sample(model, PROMPTS, sampler=sampler, steps=steps, cfg_scale=scale, seed=seeds, decode=False)
    assert (plain.latents - ours).abs().max() > 1e-2 * ours.abs().max()  # the ControlNet-XL acts


SIZES = {"original_size": (96, 80), "crops_coords_top_left": (8, 16), "target_size": (48, 64),
         "negative_original_size": (32, 40), "negative_crops_coords_top_left": (4, 0), "negative_target_size": (64, 56)}


def test_size_conditioning_matches_diffusers_sdxl_controlnet_pipeline(tiny, tmp_path):
    """A diffusers SDXL ControlNet call that sets the six size arguments (and a negative prompt), reproduced by
    sample() with the same arguments; each of them changes the result.

    One image per call: with several, diffusers 0.42.1 repeats [negative, positive] size ids along the batch,
    which pairs image 2's unconditional half with the positive sizes. Ours batches as one image at a time."""
    model, pipe = tiny
    xl = sdxl_controlnet_pipeline(model, pipe, tmp_path, "euler")
    steps, scale = 4, 5.0
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def ours(prompts=PROMPTS[:1], negative=NEGATIVE[:1], seeds=(3,), **sizes):
        return sample(model, list(prompts), negative_prompt=list(negative), units=[model.unit(hint)],
                      sampler="euler", steps=steps, cfg_scale=scale, seed=list(seeds), decode=False, **sizes).latents

    generator = torch.Generator().manual_seed(3)
    latents = randn_tensor((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        theirs = xl(PROMPTS[:1], negative_prompt=NEGATIVE[:1], image=hint, height=64, width=64,
                    num_inference_steps=steps, guidance_scale=scale, generator=generator, latents=latents,
                    output_type="latent", **SIZES).images
    with_sizes = ours(**SIZES)
    error = (with_sizes - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"relative difference {error:.2e}"
    for name in SIZES:
        without = ours(**{k: v for k, v in SIZES.items() if k != name})
        assert (without - with_sizes).abs().max() > 1e-4 * with_sizes.abs().max(), f"{name} has no effect"
    # in a batch, each image gets the sizes given for it (one pair for all, or one per image)
    other_sizes = {k: (v[1], v[0]) for k, v in SIZES.items()}
    batch = ours(PROMPTS, NEGATIVE, (3, 4), **{k: [v, other_sizes[k]] for k, v in SIZES.items()})
    for got, alone in ((batch[:1], with_sizes), (batch[1:], ours(PROMPTS[1:], NEGATIVE[1:], (4,), **other_sizes))):
        assert (got - alone).abs().max() < 1e-5 * alone.abs().max()


def test_size_conditioning_is_refused_where_it_cannot_apply(tiny_model):
    with pytest.raises(ValueError, match="original_size, target_size: size conditioning applies to SDXL-type"):
        sample(tiny_model, "a", steps=1, original_size=(64, 64), target_size=(32, 32))

"""Each sampler is the same function as diffusers' own ControlNet pipelines with the scheduler diffusers documents
for its A1111 name (tests/diffusers_schedulers.py): txt2img (StableDiffusionControlNetPipeline) and img2img
(StableDiffusionControlNetImg2ImgPipeline), on the same weights, noise (the same per-image generators) and text
embeddings, final latents within float32 tolerance. Every sampler works at both ends of the step counts it
accepts and refuses the others by name."""

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline
from diffusers.utils.torch_utils import randn_tensor
from diffusers_schedulers import documented_scheduler

from cldm.diffusers_peer import build_peer
from cldm.pipeline import sample
from conftest import PROMPTS, ROOT, SEEDS, model_as_trained
from ldm.models.diffusion.ddim import Inpainting
from ldm.models.diffusion.samplers import SAMPLERS, max_steps
from ldm.models.diffusion.samplers import sample as run_sampler

TINY = ROOT / "models" / "cldm_tiny.yaml"
STEPS, SCALE = 8, 7.5


@pytest.fixture(scope="module")
def sides():
    model = model_as_trained(TINY, control=True).eval()
    return model, build_peer(model, TINY, "cpu")


def peer_pipeline(pipeline: type, peer, sampler: str):
    pipe = pipeline(vae=peer.vae, text_encoder=None, tokenizer=None, unet=peer.unet, controlnet=peer.controlnet,
                    scheduler=documented_scheduler(SAMPLERS[sampler].label), safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"prompt_embeds": model.get_learned_conditioning(PROMPTS),
                "negative_prompt_embeds": model.get_learned_conditioning([""] * len(PROMPTS))}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_the_tiny_model_has_stable_diffusions_noise_schedule(sides):
    model, _ = sides
    torch.testing.assert_close(model.betas.float(), documented_scheduler("DDIM").betas, rtol=1e-5, atol=0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_matches_diffusers_pipeline(sides, sampler):
    model, peer = sides
    hint = torch.rand(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = sample(model, PROMPTS, negative_prompt="", units=[model.unit(hint)], sampler=sampler, steps=STEPS,
                  cfg_scale=SCALE, seed=SEEDS, decode=False).latents
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    # the pipeline draws nothing for given latents, so its generators continue after the same draw as ours
    latents = randn_tensor((len(SEEDS), 4, 4, 4), generator=generators)
    with torch.no_grad():
        theirs = peer_pipeline(StableDiffusionControlNetPipeline, peer, sampler)(
            **embeddings(model), image=hint, height=32, width=32, num_inference_steps=STEPS, guidance_scale=SCALE,
            generator=generators, latents=latents, output_type="latent").images
    assert relative_error(ours, theirs) < 1e-5, sampler
    # the control acts: without it the same seeds give other latents
    plain = sample(model, PROMPTS, sampler=sampler, steps=STEPS, cfg_scale=SCALE, seed=SEEDS, decode=False)
    assert (plain.latents - ours).abs().max() > 1e-2 * ours.abs().max()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_matches_diffusers_img2img_pipeline(sides, sampler):
    """Same init image, strength and generators (the VAE's sample, then the noise, drawn from image i's), and a
    control window that is a fraction of the steps actually run (5 of 8 here, the unit acting on the first 3)."""
    model, peer = sides
    gen = torch.Generator().manual_seed(1)
    hint, init = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    strength, end = 0.7, 0.75
    steps_seen = []
    ours = sample(model, PROMPTS, negative_prompt="", units=[model.unit(hint, end=end)], sampler=sampler,
                  steps=STEPS, cfg_scale=SCALE, seed=SEEDS, decode=False, init_image=init, denoising_strength=strength,
                  callback=lambda done, total: steps_seen.append((done, total))).latents
    assert steps_seen == [(i, 5) for i in range(1, 6)]  # int(8 * 0.7) steps run
    with torch.no_grad():
        theirs = peer_pipeline(StableDiffusionControlNetImg2ImgPipeline, peer, sampler)(
            **embeddings(model), image=init, control_image=hint, height=32, width=32, strength=strength,
            num_inference_steps=STEPS, guidance_scale=SCALE, controlnet_conditioning_scale=1.0,
            control_guidance_end=end, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
            output_type="latent").images
    assert relative_error(ours, theirs) < 1e-5, sampler
    # the initial image matters, and so does the strength
    other = sample(model, PROMPTS, units=[model.unit(hint, end=end)], sampler=sampler, steps=STEPS, cfg_scale=SCALE,
                   seed=SEEDS, decode=False, init_image=init.flip(-1), denoising_strength=strength).latents
    assert (other - ours).abs().max() > 1e-2 * ours.abs().max()


def test_img2img_arguments_are_checked(sides):
    model, _ = sides
    init = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="runs no step"):
        sample(model, "a", steps=4, init_image=init, denoising_strength=0.2)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        sample(model, "a", steps=4, init_image=init, denoising_strength=1.5)
    with pytest.raises(ValueError, match="give an init_image"):
        sample(model, "a", steps=4, denoising_strength=0.5)
    with pytest.raises(ValueError, match=r"init_image: values must be in \[0, 1\]"):
        sample(model, "a", steps=4, init_image=init * 2 - 1)
    with pytest.raises(ValueError, match="init_image is 32x32, the images are 64x64"):
        sample(model, "a", steps=4, init_image=init, height=64, width=64)
    with pytest.raises(ValueError, match=r"expected RGB images as \(B, 3, H, W\)"):
        sample(model, "a", steps=4, init_image=init[:, :1])
    # the image size follows the initial image; strength 1 starts from pure noise at the first timestep
    out = sample(model, "a", steps=4, init_image=torch.rand(1, 3, 16, 32), denoising_strength=1.0, seed=0)
    assert out.images.shape == (1, 16, 32, 3)


def gaussian_data_denoiser(schedule, variance: float = 0.25):
    """The exact eps-prediction for data ~ N(0, variance): E[eps | x_t] = sqrt(1 - a) x / (a variance + 1 - a)."""
    def denoiser(x, t, step):
        a = schedule.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * variance + 1 - a)
    return denoiser


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_works_at_its_step_limits_and_refuses_the_rest(sides, sampler):
    model, _ = sides
    most = max_steps(SAMPLERS[sampler], model)
    assert most == (999 if sampler.startswith("unipc") else 1000)  # UniPC's 1001 rounded timesteps repeat one at 1000
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, most):
        out = run_sampler(gaussian_data_denoiser(model), x_T, model, sampler, steps,
                          generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out).all(), (sampler, steps)
    assert abs(out.std().item() - 0.5) < 0.05  # many small steps reach the data's spread
    for steps in {most + 1, 1001, 0} - {most}:
        with pytest.raises(ValueError, match=f"takes 1 to {most} steps on this model's 1000-step schedule"):
            run_sampler(gaussian_data_denoiser(model), x_T, model, sampler, steps)


def test_unipc_at_1000_steps_is_refused_not_nan(sides):
    model, _ = sides
    with pytest.raises(ValueError, match="the UniPC sampler takes 1 to 999 steps"):
        sample(model, "x", sampler="unipc", steps=1000, seed=1)


def test_non_finite_latents_are_an_error(sides):
    model, _ = sides
    weight = model.model.diffusion_model.out[-1].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match="NaN or infinite latents"):
            sample(model, "x", sampler="euler", steps=2, seed=1)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_inpainting_of_the_wrong_shape_is_refused_by_name(sides, sampler):
    model, _ = sides
    good = Inpainting(torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"inpainting mask has shape \(1, 1, 32, 32\); expected \(2, 1, 4, 4\) or "
                                         r"\(2, 4, 4, 4\) or \(1, 1, 4, 4\) or \(1, 4, 4, 4\)"):
        sample(model, PROMPTS, sampler=sampler, steps=2, inpainting=replace(good, mask=torch.ones(1, 1, 32, 32)))
    with pytest.raises(ValueError, match=r"inpainting x0 has shape \(2, 3, 32, 32\); expected \(2, 4, 4, 4\) or "
                                         r"\(1, 4, 4, 4\)"):
        sample(model, PROMPTS, sampler=sampler, steps=2, inpainting=replace(good, x0=torch.zeros(2, 3, 32, 32)))
    out = sample(model, PROMPTS, sampler=sampler, steps=2, inpainting=good, decode=False)
    assert torch.equal(out.latents, torch.zeros(2, 4, 4, 4))  # mask 1 everywhere: x0 kept

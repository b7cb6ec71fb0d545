"""Each sampler is the same function as in diffusers' own StableDiffusionControlNetPipeline: same weights, same
noise (the same per-image generators), same text embeddings, final latents within float32 tolerance."""

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.utils.torch_utils import randn_tensor

from benchmarks.bench_sample import peer_scheduler
from benchmarks.common import TINY, build_ours, build_peer
from cldm.pipeline import sample
from ldm.models.diffusion.samplers import SAMPLERS

PROMPTS = ["a red circle on a white background", "a blue circle on a black background"]
SEEDS = [7, 8]


@pytest.fixture(scope="module")
def sides():
    model = build_ours(TINY, torch.device("cpu")).eval()
    peer = build_peer(model, TINY, torch.device("cpu"))
    return model, peer


def diffusers_latents(model, peer, sampler: str, hint: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    # the pipeline draws nothing for given latents, so its generators continue after the same draw as ours
    latents = randn_tensor((len(SEEDS), 4, 4, 4), generator=generators)
    pipe = StableDiffusionControlNetPipeline(
        vae=peer.vae, text_encoder=None, tokenizer=None, unet=peer.unet, controlnet=peer.controlnet,
        scheduler=peer_scheduler(model, sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        prompt_embeds = model.get_learned_conditioning(PROMPTS)
        negative_embeds = model.get_learned_conditioning([""] * len(PROMPTS))
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=hint, height=32,
                width=32, num_inference_steps=steps, guidance_scale=scale, generator=generators, latents=latents,
                output_type="latent").images


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_matches_diffusers_pipeline(sides, sampler):
    model, peer = sides
    hint = torch.rand(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps, scale = 8, 7.5
    ours = sample(model, PROMPTS, negative_prompt="", units=[model.unit(hint)], sampler=sampler, steps=steps,
                  cfg_scale=scale, seed=SEEDS, decode=False).latents
    theirs = diffusers_latents(model, peer, sampler, hint, steps, scale)
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"{sampler}: relative difference {error:.2e}"
    if sampler != "ddim":  # the control acts: without it the same seeds give other latents
        plain = sample(model, PROMPTS, sampler=sampler, steps=steps, cfg_scale=scale, seed=SEEDS, decode=False)
        assert (plain.latents - ours).abs().max() > 1e-2 * ours.abs().max()

"""DDIM: exact step counts, unchanged latents, guidance with and without uncond control, seeds, inpainting, and
no silently ignored arguments."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cldm.control import ControlUnit
from conftest import REFERENCE, ROOT, model_as_trained, randomize_zero_convs
from ldm.models.diffusion.ddim import DDIMSampler, uniform_timesteps


def test_uniform_timesteps_for_every_step_count():
    for s in range(1, 1001):
        ts = uniform_timesteps(s, 1000)
        assert len(ts) == s and len(np.unique(ts)) == s
        assert ts.min() >= 0 and ts.max() <= 999
    assert uniform_timesteps(20, 1000).tolist() == list(range(1, 1000, 50))
    with pytest.raises(ValueError, match="between 1 and 1000"):
        uniform_timesteps(0, 1000)


def golden_model(config: str):
    """The models tests/reference/ddim_golden.safetensors was sampled from (commit 7c07b2b, before the sampler
    moved onto the guidance and sampler modules)."""
    model = model_as_trained(ROOT / "models" / f"{config}.yaml")
    if config == "cldm_tiny_lllite":
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in model.control_model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    else:
        randomize_zero_convs(model)
    return model.eval()


@pytest.mark.parametrize("config", ["cldm_tiny", "cldm_tiny_v21", "cldm_tiny_lllite"])
def test_latents_are_unchanged(config):
    golden = load_file(REFERENCE / "ddim_golden.safetensors")
    model = golden_model(config)
    gen = torch.Generator().manual_seed(3)
    hint = torch.rand(2, 3, 32, 32, generator=gen)
    x_T = torch.randn(2, 4, 4, 4, generator=gen)
    text = model.get_learned_conditioning(["a red circle", "a blue square"])
    empty = model.get_learned_conditioning([""] * 2)
    cond, uncond = {"c_concat": [hint], "c_crossattn": [text]}, {"c_concat": [hint], "c_crossattn": [empty]}
    sampler = DDIMSampler(model)
    got = {
        "cfg": sampler.sample(6, 2, (4, 4, 4), cond, x_T=x_T, verbose=False, unconditional_guidance_scale=7.5,
                              unconditional_conditioning=uncond)[0],
        "eta": sampler.sample(5, 2, (4, 4, 4), cond, x_T=x_T, verbose=False, eta=0.7,
                              generator=torch.Generator().manual_seed(11), unconditional_guidance_scale=4.0,
                              unconditional_conditioning=uncond)[0],
        "nocfg": sampler.sample(3, 2, (4, 4, 4), cond, x_T=x_T, verbose=False)[0],
    }
    if config == "cldm_tiny":
        model.control_scales = [0.8 * 0.825 ** float(12 - i) for i in range(13)]
        got["guess"] = sampler.sample(6, 2, (4, 4, 4), cond, x_T=x_T, verbose=False, unconditional_guidance_scale=7.5,
                                      unconditional_conditioning={"c_concat": None, "c_crossattn": [empty]})[0]
        model.control_scales = [1.0] * 13
        # sampled when the soft weights of the tiny model's 5 levels were 0.825 ** (4 - i); they follow
        # cldm.control.soft_weights since (diffusers' span at every depth), so the case states those weights
        old_soft = [0.825 ** float(4 - i) for i in range(5)]
        soft = ControlUnit(model.control_model, hint, strength=0.6, start=0.2, end=0.8, mode="prompt",
                           scales=[0.6 * w for w in old_soft])
        cond_only = ControlUnit(model.control_model, hint.flip(-1), strength=1.2, end=0.5, mode="control",
                                scales=[1.2 * w for w in old_soft])
        got["units"] = sampler.sample(10, 2, (4, 4, 4), {"c_crossattn": [text], "control": [soft, cond_only]},
                                      x_T=x_T, verbose=False, unconditional_guidance_scale=5.0,
                                      unconditional_conditioning={"c_crossattn": [empty], "control": [soft]})[0]
    for case, latents in got.items():
        assert torch.equal(latents, golden[f"{config}/{case}"]), case


def test_every_step_count_calls_the_model_once_per_step_at_the_schedule(tiny_model):
    text = tiny_model.get_learned_conditioning(["a circle"])
    calls = []
    unet = tiny_model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(int(kwargs["timesteps"][0])),
                                            with_kwargs=True)
    sampler = DDIMSampler(tiny_model)
    for steps in [1, 2, 3, 9, 27, 36, 37, 60]:
        calls.clear()
        samples, _ = sampler.sample(steps, 1, (4, 4, 4), {"c_crossattn": [text]}, verbose=False, eta=0.5)
        assert calls == uniform_timesteps(steps, 1000)[::-1].tolist(), steps
        assert torch.isfinite(samples).all()
    handle.remove()


def one_ddim_step(model, x_T, cond_eps, uncond_eps, scale):
    """x_{t-1} of a one-step DDIM (t = 1, to t = 0) from the two model outputs, written out."""
    a_t, a_prev = model.alphas_cumprod[1], model.alphas_cumprod[0]
    eps = uncond_eps + scale * (cond_eps - uncond_eps)
    pred_x0 = (x_T - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps


def test_guess_mode_gives_the_uncond_pass_no_control(tiny_model):
    randomize_zero_convs(tiny_model)
    hint = torch.rand(2, 3, 32, 32)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    text, empty = tiny_model.get_learned_conditioning(["a circle"] * 2), tiny_model.get_learned_conditioning([""] * 2)
    t = torch.tensor([1, 1])
    with torch.no_grad():
        cond_eps = tiny_model.apply_model(x_T, t, {"c_concat": [hint], "c_crossattn": [text]})
        bare_uncond = tiny_model.model.diffusion_model(x_T, t, context=empty)
        controlled_uncond = tiny_model.apply_model(x_T, t, {"c_concat": [hint], "c_crossattn": [empty]})
    assert (bare_uncond - controlled_uncond).abs().max() > 1e-3
    sampler = DDIMSampler(tiny_model)
    guess, _ = sampler.sample(1, 2, (4, 4, 4), {"c_concat": [hint], "c_crossattn": [text]}, x_T=x_T,
                              verbose=False, unconditional_guidance_scale=9.0,
                              unconditional_conditioning={"c_concat": None, "c_crossattn": [empty]})
    torch.testing.assert_close(guess, one_ddim_step(tiny_model, x_T, cond_eps, bare_uncond, 9.0))
    both, _ = sampler.sample(1, 2, (4, 4, 4), {"c_concat": [hint], "c_crossattn": [text]}, x_T=x_T,
                             verbose=False, unconditional_guidance_scale=9.0,
                             unconditional_conditioning={"c_concat": [hint], "c_crossattn": [empty]})
    torch.testing.assert_close(both, one_ddim_step(tiny_model, x_T, cond_eps, controlled_uncond, 9.0))


def test_eta_noise_follows_the_generator_and_eta_zero_is_deterministic(tiny_model):
    text = tiny_model.get_learned_conditioning(["a circle"] * 2)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sampler = DDIMSampler(tiny_model)

    def run(eta, *seeds):
        generator = [torch.Generator().manual_seed(s) for s in seeds] if len(seeds) > 1 else (
            torch.Generator().manual_seed(seeds[0]))
        return sampler.sample(4, 2, (4, 4, 4), {"c_crossattn": [text]}, x_T=x_T, eta=eta, generator=generator,
                              verbose=False)[0]

    assert torch.equal(run(0.0, 1), run(0.0, 2))  # no noise is drawn at eta 0
    assert torch.equal(run(1.0, 1), run(1.0, 1))
    assert (run(1.0, 1) - run(1.0, 2)).abs().max() > 1e-2
    per_image = run(1.0, 5, 6)  # one generator per sample: each sample's noise is its own
    swapped = run(1.0, 6, 5)
    assert not torch.allclose(per_image[0], swapped[0])
    alone = sampler.sample(4, 1, (4, 4, 4), {"c_crossattn": [text[:1]]}, x_T=x_T[1:], eta=1.0,
                           generator=[torch.Generator().manual_seed(6)], verbose=False)[0]
    torch.testing.assert_close(per_image[1:], alone)


def test_mask_and_x0_inpaint(tiny_model):
    text = tiny_model.get_learned_conditioning(["a circle"])
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 1.0  # keep the left half
    sampler = DDIMSampler(tiny_model)

    def run(m):
        return sampler.sample(5, 1, (4, 4, 4), {"c_crossattn": [text]}, x_T=x_T, mask=m, x0=x0, verbose=False,
                              generator=torch.Generator().manual_seed(2))[0]

    plain = sampler.sample(5, 1, (4, 4, 4), {"c_crossattn": [text]}, x_T=x_T, verbose=False)[0]
    inpainted = run(mask)
    assert torch.equal(inpainted[..., :2], x0[..., :2])  # kept where the mask is 1
    sampled = inpainted[..., 2:]
    assert (sampled - x0[..., 2:]).abs().min() > 1e-4  # sampled where it is 0 ...
    assert (sampled - plain[..., 2:]).abs().max() > 1e-3  # ... seeing the kept half through the UNet
    assert torch.equal(run(torch.ones_like(mask)), x0)
    with pytest.raises(ValueError, match="both mask and x0"):
        sampler.sample(5, 1, (4, 4, 4), {"c_crossattn": [text]}, mask=mask, verbose=False)


@pytest.mark.parametrize("argument,value", [("quantize_x0", True), ("noise_dropout", 0.1),
                                            ("score_corrector", object()), ("dynamic_threshold", 0.9),
                                            ("ucg_schedule", [1.0]), ("corrector_kwargs", {"a": 1})])
def test_unimplemented_arguments_are_refused_not_ignored(tiny_model, argument, value):
    text = tiny_model.get_learned_conditioning(["a circle"])
    sampler = DDIMSampler(tiny_model)
    with pytest.raises(ValueError, match=argument):
        sampler.sample(2, 1, (4, 4, 4), {"c_crossattn": [text]}, verbose=False, **{argument: value})
    sampler.sample(2, 1, (4, 4, 4), {"c_crossattn": [text]}, verbose=False, quantize_x0=False, noise_dropout=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance'"):
        sampler.sample(2, 1, (4, 4, 4), {"c_crossattn": [text]}, verbose=False, guidance=3.0)


def guided_eps(model, x, t, cond, uncond, scale):
    with torch.no_grad():
        c, uc = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    return uc + scale * (c - uc)


def test_stochastic_encode_then_decode_as_the_original_img2img(tiny_model):
    """The original's img2img: z = stochastic_encode(x0, t_enc) noised to DDIM index t_enc, then decode(z, c,
    t_enc) runs the DDIM steps from index t_enc - 1 down; each written out by hand here."""
    model = tiny_model.eval()
    randomize_zero_convs(model)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    hint = torch.rand(2, 3, 32, 32, generator=gen)
    text, empty = model.get_learned_conditioning(["a circle"] * 2), model.get_learned_conditioning([""] * 2)
    cond, uncond = {"c_concat": [hint], "c_crossattn": [text]}, {"c_concat": [hint], "c_crossattn": [empty]}
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0)
    ac = model.alphas_cumprod
    timesteps = list(range(1, 1000, 100))  # DDIM's 10 uniform steps
    t_enc = torch.tensor([2, 2])
    z = sampler.stochastic_encode(x0, t_enc, noise=noise)
    torch.testing.assert_close(z, ac[timesteps[2]].sqrt() * x0 + (1 - ac[timesteps[2]]).sqrt() * noise)
    # the original's rule: one noise level per sample; default noise from the global generator
    mixed = sampler.stochastic_encode(x0, torch.tensor([0, 9]), noise=noise)
    torch.testing.assert_close(mixed[1], ac[timesteps[9]].sqrt() * x0[1] + (1 - ac[timesteps[9]]).sqrt() * noise[1])
    torch.manual_seed(4)
    drawn = sampler.stochastic_encode(x0, t_enc)
    torch.manual_seed(4)
    torch.testing.assert_close(drawn, sampler.stochastic_encode(x0, t_enc, noise=torch.randn_like(x0)))
    # every training step: t is a training timestep
    every = sampler.stochastic_encode(x0, torch.tensor([500, 500]), use_original_steps=True, noise=noise)
    torch.testing.assert_close(every, ac[500].sqrt() * x0 + (1 - ac[500]).sqrt() * noise)

    called = []
    decoded = sampler.decode(z, cond, 2, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
                             callback=called.append)
    x = z
    for t, t_prev in ((timesteps[1], timesteps[0]), (timesteps[0], None)):
        a, a_prev = ac[t], ac[t_prev] if t_prev is not None else ac[0]
        eps = guided_eps(model, x, torch.tensor([t, t]), cond, uncond, 5.0)
        pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(decoded, x)
    assert called == [0, 1]
    with pytest.raises(ValueError, match="t_start must be between 1 and 10"):
        sampler.decode(z, cond, 11)
    with pytest.raises(RuntimeError, match="call make_schedule"):
        DDIMSampler(model).decode(z, cond, 2)


@pytest.mark.parametrize("config", ["cldm_tiny", "cldm_tiny_v21"])
def test_encode_is_ddim_inversion_at_the_schedules_timesteps(config):
    """encode(x0, c, t_enc): step i moves x from DDIM level i - 1 to level i with the model's eps at the schedule's
    timestep i (a v-prediction model's output converted to eps), as the original's ddim_hacked.py computes it."""
    model = golden_model(config)
    gen = torch.Generator().manual_seed(1)
    x0, hint = torch.randn(2, 4, 4, 4, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    text, empty = model.get_learned_conditioning(["a circle"] * 2), model.get_learned_conditioning([""] * 2)
    cond, uncond = {"c_concat": [hint], "c_crossattn": [text]}, {"c_concat": [hint], "c_crossattn": [empty]}
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=5)
    ac = model.alphas_cumprod
    timesteps = list(range(1, 1000, 200))
    encoded, out = sampler.encode(x0, cond, 3, unconditional_guidance_scale=4.0, unconditional_conditioning=uncond,
                                  return_intermediates=1)
    x, levels = x0, [ac[0], *[ac[t] for t in timesteps]]
    for i in range(3):
        t = torch.tensor([timesteps[i]] * 2)
        eps = guided_eps(model, x, t, cond, uncond, 4.0)
        if model.parameterization == "v":
            eps = ac[t].sqrt().view(-1, 1, 1, 1) * eps + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * x
        a, a_next = levels[i], levels[i + 1]
        x = (a_next / a).sqrt() * x + a_next.sqrt() * ((1 / a_next - 1).sqrt() - (1 / a - 1).sqrt()) * eps
    torch.testing.assert_close(encoded, x)
    torch.testing.assert_close(out["x_encoded"], x)
    assert out["intermediate_steps"] == [0, 1, 2] and len(out["intermediates"]) == 3
    assert (encoded - x0).abs().max() > 1e-2
    with pytest.raises(ValueError, match="t_enc must be between 0 and 5"):
        sampler.encode(x0, cond, 6)


def test_inpainting_of_the_wrong_shape_is_refused_by_name(tiny_model):
    text = tiny_model.get_learned_conditioning(["a circle"])
    sampler = DDIMSampler(tiny_model)
    mask, x0 = torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4, 4)

    def run(m, x):
        return sampler.sample(2, 1, (4, 4, 4), {"c_crossattn": [text]}, mask=m, x0=x, verbose=False)

    with pytest.raises(ValueError, match=r"inpainting mask has shape \(1, 1, 32, 32\); expected \(1, 1, 4, 4\) or "
                                         r"\(1, 4, 4, 4\): a mask at latent size"):
        run(torch.ones(1, 1, 32, 32), x0)
    with pytest.raises(ValueError, match=r"inpainting x0 has shape \(1, 3, 32, 32\); expected \(1, 4, 4, 4\): "
                                         r"latents \(encode an image"):
        run(mask, torch.zeros(1, 3, 32, 32))
    run(mask, x0)

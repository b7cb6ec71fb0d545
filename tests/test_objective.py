"""The training objective's options (min-SNR-gamma, noise offset, zero-terminal-SNR schedule) against hand
computations and diffusers' own functions, through the model's loss and its gradient, and in a training run."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import compute_snr
from omegaconf import OmegaConf

from cldm.model import create_model, load_state_dict, save_state_dict
from cldm.pipeline import sample
from conftest import ROOT, randomize_zero_convs, randomize_zero_init
from ldm.models.diffusion.objective import Objective, signal_to_noise
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.modules.diffusionmodules.util import make_beta_schedule, rescale_zero_terminal_snr
from tool_make_fill50k import make_fill50k

TINY = ROOT / "models" / "cldm_tiny.yaml"
T = torch.tensor([0, 10, 250, 999])


def tiny(**params):
    torch.manual_seed(0)
    model = create_model(TINY, params=params)
    randomize_zero_init(model.model.diffusion_model)
    randomize_zero_convs(model)
    return model.eval()  # eval: no prompt dropout; the loss is the same function


def inputs(model, seed: int = 1):
    """Latents, conditioning and noise of a batch of four."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 4, 4, generator=gen)
    cond = {"c_crossattn": [model.get_learned_conditioning(["a", "b", "c", "d"])],
            "c_concat": [torch.rand(4, 3, 32, 32, generator=gen)]}
    return x, cond, torch.randn(4, 4, 4, 4, generator=gen)


def hand_snr(model) -> np.ndarray:
    """SNR of the tiny config's schedule (SD's: betas sqrt-spaced from 0.00085 to 0.012), in float64."""
    alphas_cumprod = np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.00085, 0.012))
    return (alphas_cumprod / (1.0 - alphas_cumprod))[T.numpy()]


def per_sample_mse(model, x, cond, noise) -> torch.Tensor:
    """Each sample's mean squared error of the model's prediction, computed without p_losses."""
    a = model.alphas_cumprod[T].view(-1, 1, 1, 1)
    x_noisy = a.sqrt() * x + (1 - a).sqrt() * noise
    target = {"eps": noise, "x0": x, "v": a.sqrt() * noise - (1 - a).sqrt() * x}[model.parameterization]
    return ((model.apply_model(x_noisy, T, cond) - target) ** 2).mean(dim=[1, 2, 3])


def test_snr_equals_diffusers_compute_snr():
    model = tiny()
    # diffusers' scheduler as its SD configs describe SD's schedule
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = signal_to_noise(model, T)
    np.testing.assert_allclose(ours.numpy(), hand_snr(model), rtol=2e-6)
    # diffusers takes 1 - a_t of float32 a_t: 3e-5 off at t = 0, where a_t = 0.99915
    torch.testing.assert_close(ours, compute_snr(scheduler, T), rtol=5e-5, atol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_min_snr_gamma_loss_and_gradient_equal_the_hand_computation(parameterization):
    gamma = 5.0
    model = tiny(parameterization=parameterization, snr_gamma=gamma)
    x, cond, noise = inputs(model)
    snr = hand_snr(model)
    clipped = np.minimum(snr, gamma)
    weights = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[parameterization]
    assert weights[0] < weights[-1] or parameterization == "x0"  # the low-noise steps are damped
    loss, logged = model.p_losses(x, cond, T, noise=noise)
    mse = per_sample_mse(model, x, cond, noise)
    hand = (torch.tensor(weights, dtype=torch.float32) * mse).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=0)
    torch.testing.assert_close(logged["val/loss_simple"], mse.mean(), rtol=1e-5, atol=0)  # unweighted, for curves

    trained = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trained)
    hand_grads = torch.autograd.grad((torch.tensor(weights, dtype=torch.float32) * per_sample_mse(
        model, x, cond, noise)).mean(), trained)
    for g, h in zip(grads, hand_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5 * float(h.abs().max()))
    plain = tiny(parameterization=parameterization)  # off: the plain mean, as before
    torch.testing.assert_close(plain.p_losses(x, cond, T, noise=noise)[0], mse.mean(), rtol=1e-5, atol=0)


def test_noise_offset_adds_one_gaussian_per_sample_and_channel():
    x = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(7)
    drawn = Objective(noise_offset=0.1).noise_like(x)
    torch.manual_seed(7)
    pixel = torch.randn(3, 4, 8, 8)  # the per-pixel noise first, then the offsets, as diffusers' scripts draw them
    offset = torch.randn(3, 4, 1, 1)
    torch.testing.assert_close(drawn, pixel + 0.1 * offset, rtol=0, atol=0)
    torch.manual_seed(7)
    torch.testing.assert_close(Objective().noise_like(x), pixel, rtol=0, atol=0)

    model = tiny(noise_offset=0.1)
    x, cond, _ = inputs(model)
    torch.manual_seed(3)
    loss, _ = model.p_losses(x, cond, T)
    torch.manual_seed(3)
    noise = torch.randn_like(x) + 0.1 * torch.randn(4, 4, 1, 1)
    torch.testing.assert_close(loss, per_sample_mse(model, x, cond, noise).mean(), rtol=1e-5, atol=0)


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        Objective(snr_gamma=0)
    with pytest.raises(ValueError, match="noise_offset must be 0 or more"):
        Objective(noise_offset=-0.1)


def test_zero_terminal_snr_schedule_equals_diffusers():
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    ours = rescale_zero_terminal_snr(betas)
    np.testing.assert_allclose(ours, diffusers_rescale(torch.from_numpy(betas)).numpy(), rtol=1e-12, atol=1e-15)
    alphas_cumprod = np.cumprod(1.0 - ours)
    assert alphas_cumprod[-1] == 0.0 and alphas_cumprod[0] == pytest.approx(1 - betas[0], rel=1e-12)

    model = tiny(parameterization="v", zero_terminal_snr=True)
    # diffusers' own scheduler for SD 2.1-v with its zero-terminal-SNR switch
    peer = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="v_prediction", rescale_betas_zero_snr=True)
    # diffusers builds the schedule in float32, ours in float64 rounded once
    torch.testing.assert_close(model.betas, peer.betas, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.alphas_cumprod, peer.alphas_cumprod, rtol=0, atol=2e-6)
    assert model.alphas_cumprod[-1] == 0 and model.sqrt_alphas_cumprod[-1] == 0
    # the rescaled schedule follows from the config: not saved, and not replaced by a file's unrescaled one
    assert "alphas_cumprod" not in model.state_dict() and "alphas_cumprod" in tiny().state_dict()
    with pytest.raises(ValueError, match="zero_terminal_snr needs a v-prediction model"):
        tiny(zero_terminal_snr=True)


def test_zero_terminal_snr_v_training_with_min_snr_and_noise_offset(tmp_path):
    """The three options together through tutorial_train: the rescaled schedule survives the initial weights and the
    resume, the last timestep's loss is finite (weight 0 under min-SNR for v), and the logged samples are finite."""
    from tutorial_train import main
    config = OmegaConf.load(TINY)
    config.model.params.parameterization = "v"
    yaml = tmp_path / "tiny_v.yaml"
    OmegaConf.save(config, yaml)
    initial = save_state_dict(tiny(parameterization="v").state_dict(), tmp_path / "ini.ckpt")  # unrescaled schedule
    data = make_fill50k(tmp_path / "fill", n=8, size=32, seed=0)
    common = ["--config", str(yaml), "--data_root", str(data), "--batch_size", "4", "--output_dir",
              str(tmp_path / "run"), "--sample_steps", "2", "--accelerator", "cpu", "--devices", "1",
              "--zero_terminal_snr", "True", "--snr_gamma", "5", "--noise_offset", "0.05", "--logger_freq", "2",
              "--learning_rate", "1e-4"]
    trainer = main([*common, "--resume_path", str(initial), "--max_steps", "2"])
    model = trainer.lightning_module
    assert model.alphas_cumprod[-1] == 0 and model.objective == Objective(snr_gamma=5.0, noise_offset=0.05)
    x, cond, noise = inputs(model)
    t = torch.full((4,), 999)
    assert model.p_losses(x, cond, t, noise)[0] == 0  # SNR 0: weight 0
    grids = sorted((tmp_path / "run" / "image_log" / "train").glob("samples_cfg_scale_*_gs-000002_*.png"))
    assert grids
    saved = load_state_dict(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert "alphas_cumprod" not in saved
    resumed = main([*common, "--resume", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--max_steps", "3",
                    "--force"])
    assert resumed.global_step == 3 and resumed.lightning_module.alphas_cumprod[-1] == 0


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_samples_a_zero_terminal_snr_model(sampler):
    """diffusers' schedulers on betas that end at 1 give inf sigmas (NaN latents) unless told the schedule is
    zero-terminal; ours starts from the pure noise of the last timestep."""
    model = tiny(parameterization="v", zero_terminal_snr=True)
    latents = sample(model, ["a red circle"], sampler=sampler, steps=3, seed=1, decode=False).latents
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("steps", [20, 50])
def test_ddim_samples_a_zero_terminal_snr_model_from_the_last_timestep_as_diffusers(steps):
    """Lin et al. sample such a model from its last timestep (SNR 0, pure noise), with diffusers' DDIMScheduler
    set to rescale_betas_zero_snr and timestep_spacing "trailing"; the original's uniform spacing would start at
    t = 951 of 1000 (20 steps), where the model is told some signal remains in what is pure noise."""
    from diffusers import DDIMScheduler

    from ldm.models.diffusion.ddim import sample_ddim
    model = tiny(parameterization="v", zero_terminal_snr=True)
    seen: list[int] = []

    def denoiser(x, t, step=None):  # a smooth stand-in for the UNet's v prediction
        seen.append(int(t[0]))
        return 0.4 * x + torch.sin(x) * (t.view(-1, 1, 1, 1) / 1000.0) - 0.05
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample_ddim(denoiser, x.clone(), model, steps)
    assert seen[0] == 999 and len(seen) == steps

    # the peer as its documentation configures it for zero terminal SNR (SD 2.x's v-prediction schedule)
    peer = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                         timestep_spacing="trailing")
    peer.set_timesteps(steps)
    latents = x.clone().double()
    for t in peer.timesteps:
        latents = peer.step(denoiser(latents.float(), t.view(1).expand(2)).double(), t, latents).prev_sample
    assert [int(t) for t in peer.timesteps] == seen[steps:]
    torch.testing.assert_close(ours, latents.float(), rtol=1e-4, atol=1e-5)

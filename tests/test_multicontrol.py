"""Per-control strength, start/end windows, control modes and several ControlNets at once."""

import pytest
import torch

from cldm.control import ControlUnit, ResidualControl, unconditional_units
from cldm.pipeline import sample
from conftest import randomize_zero_convs
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.util import instantiate_from_config


class StepRecorder(ResidualControl):
    """Wraps a control network and records the timesteps it was called at."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def residuals(self, x, hint, timesteps, context, y=None):
        self.calls.append(float(timesteps[0]))
        return self.net.residuals(x, hint, timesteps, context, y)


def second_controlnet(model):
    cfg = model_config().control_stage_config
    torch.manual_seed(5)
    net = instantiate_from_config(cfg)
    for name, p in net.named_parameters():
        if not p.any():
            with torch.no_grad():
                p.normal_(0, 0.1)
    return net


def model_config():
    from omegaconf import OmegaConf

    from conftest import ROOT
    return OmegaConf.load(ROOT / "models" / "cldm_tiny.yaml").model.params


def inputs(model, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 4, 4, generator=g)
    t = torch.tensor([50, 700])[:n]
    text = model.get_learned_conditioning(["a red circle", "a blue circle"][:n])
    hints = torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, 3, 32, 32, generator=g)
    return x, t, text, hints


def test_two_controls_add_up(tiny_model):
    randomize_zero_convs(tiny_model)
    other = second_controlnet(tiny_model)
    x, t, text, (h1, h2) = inputs(tiny_model)
    a = ControlUnit(tiny_model.control_model, h1, strength=0.7)
    b = ControlUnit(other, h2, strength=1.3)
    unet = tiny_model.model.diffusion_model
    with torch.no_grad():
        both = tiny_model.apply_model(x, t, {"c_crossattn": [text], "control": [a, b]})
        ra, rb = (u.contribute(x, t, text, None, unet).residuals for u in (a, b))
        expected = unet(x, t, context=text, control=[p + q for p, q in zip(ra, rb)])
        only_a = tiny_model.apply_model(x, t, {"c_crossattn": [text], "control": [a]})
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-6)
    assert (both - only_a).abs().max() > 1e-4


def test_strength_scales_residuals_linearly(tiny_model):
    randomize_zero_convs(tiny_model)
    x, t, text, (h1, _) = inputs(tiny_model)
    with torch.no_grad():
        unet = tiny_model.model.diffusion_model
        one = ControlUnit(tiny_model.control_model, h1, strength=1.0).contribute(x, t, text, None, unet).residuals
        two = ControlUnit(tiny_model.control_model, h1, strength=2.0).contribute(x, t, text, None, unet).residuals
    for r1, r2 in zip(one, two):
        torch.testing.assert_close(r2, 2 * r1)


def test_main_control_matches_an_equivalent_unit(tiny_model):
    randomize_zero_convs(tiny_model)
    x, t, text, (h1, _) = inputs(tiny_model)
    tiny_model.control_scales = [0.5] * len(tiny_model.control_scales)
    with torch.no_grad():
        main = tiny_model.apply_model(x, t, {"c_crossattn": [text], "c_concat": [h1]})
        unit = tiny_model.apply_model(x, t, {"c_crossattn": [text],
                                             "control": [ControlUnit(tiny_model.control_model, h1, strength=0.5)]})
    torch.testing.assert_close(main, unit, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_start_end_window_acts_on_the_same_steps_under_every_sampler(tiny_model, sampler):
    randomize_zero_convs(tiny_model)
    _, _, _, (h1, _) = inputs(tiny_model, 1)
    every_step = StepRecorder(tiny_model.control_model)
    units = [ControlUnit(every_step, h1, strength=0.0)]
    windows = {(0.2, 0.5): [2, 3, 4], (0.0, 0.3): [0, 1, 2], (0.75, 1.0): [8, 9], (0.05, 0.95): range(1, 9)}
    for start, end in windows:
        units.append(ControlUnit(StepRecorder(tiny_model.control_model), h1, start=start, end=end))
    sample(tiny_model, "a circle", units=units, sampler=sampler, steps=10, cfg_scale=1.0, seed=0, decode=False)
    assert len(every_step.calls) == 10 and len(set(every_step.calls)) == 10
    for unit, active in zip(units[1:], windows.values()):
        assert unit.model.calls == [every_step.calls[i] for i in active], (unit.start, unit.end)


def test_control_modes_and_validation(tiny_model):
    hint = torch.rand(1, 3, 32, 32)
    balanced = ControlUnit(tiny_model.control_model, hint, strength=0.8)
    prompt = ControlUnit(tiny_model.control_model, hint, strength=0.8, mode="prompt")
    control = ControlUnit(tiny_model.control_model, hint, strength=0.8, mode="control")
    assert balanced.level_scales(13) == [0.8] * 13
    assert prompt.level_scales(13)[-1] == pytest.approx(0.8)
    assert prompt.level_scales(13)[0] == pytest.approx(0.8 * 0.825 ** 12)
    assert control.level_scales(13) == prompt.level_scales(13)
    assert unconditional_units([balanced, prompt, control]) == [balanced, prompt]
    with pytest.raises(ValueError, match="mode"):
        ControlUnit(tiny_model.control_model, hint, mode="loud")
    with pytest.raises(ValueError, match="start"):
        ControlUnit(tiny_model.control_model, hint, start=0.6, end=0.4)


@pytest.mark.parametrize("blocks, layers", [(4, 2), (3, 2), (2, 1)])  # SD's 13 levels, SDXL's 10, the tiny 5
def test_soft_weights_follow_diffusers_guess_mode_at_every_depth(tiny_model, blocks, layers):
    """diffusers' ControlNetModel with guess_mode=True weights its residuals by its own rule; the per-level ratio
    to guess_mode=False is that rule, and ours is within 0.6 % of it at every depth (the 0.825 of SD's 13 levels
    rounds diffusers' 10^(-1/12)). On 13 levels ours is the original's and the A1111 extension's exactly."""
    from diffusers import ControlNetModel
    torch.manual_seed(0)
    net = ControlNetModel(in_channels=4, down_block_types=("DownBlock2D",) * blocks, block_out_channels=(32,) * blocks,
                          layers_per_block=layers, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=2,
                          conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    with torch.no_grad():
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.copy_(torch.randn_like(p))
        inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 3, 8), controlnet_cond=torch.rand(1, 3, 64, 64),
                      return_dict=False)
        plain_down, plain_mid = net(**inputs)
        guess_down, guess_mid = net(**inputs, guess_mode=True)
    theirs = [float((g * p).sum() / (p * p).sum()) for g, p in zip([*guess_down, guess_mid], [*plain_down, plain_mid])]
    n = blocks * (layers + 1) + 1
    assert len(theirs) == n
    ours = ControlUnit(tiny_model.control_model, torch.rand(1, 3, 32, 32), mode="prompt").level_scales(n)
    assert ours[-1] == 1.0 and theirs[-1] == pytest.approx(1.0)
    assert max(abs(a / b - 1) for a, b in zip(ours, theirs)) < 0.006
    if n == 13:  # sd-webui-controlnet's scripts/hook.py: param.weight * 0.825 ** (12 - i)
        assert ours == [0.825 ** float(12 - i) for i in range(13)]

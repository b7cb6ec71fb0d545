"""The control contract's block hooks (ldm's BlockHook, cldm.control's BlockControl and FeatureAddition): what the
UNet hands a hook, in which order, and what it does with the hook's answers."""

import torch

from cldm.control import BlockControl, Contribution, ControlUnit, FeatureAddition
from conftest import ROOT, model_as_trained
from ldm.modules.diffusionmodules.openaimodel import MIDDLE, BlockHook, BlockSite
from ldm.modules.diffusionmodules.util import timestep_embedding


def unet_inputs(model, n: int = 2):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, 4, 4, generator=g)
    t = torch.tensor([30, 600][:n])
    with torch.no_grad():
        context = model.get_learned_conditioning(["a red circle", "a blue square"][:n])
    return x, t, context


class Recorder(BlockHook):
    """Records every call; optionally changes one thing."""

    def __init__(self, shift_output_input: float = 0.0):
        self.calls: list[tuple] = []
        self.shift = shift_output_input

    def time_embedding(self, emb):
        self.calls.append(("time", emb))
        return emb

    def block_input(self, site, h):
        h = h + self.shift if site == BlockSite("output", 0) else h
        self.calls.append(("in", site, h))
        return h

    def block_output(self, site, x, h):
        self.calls.append(("out", site, x, h))
        return h


def test_a_hook_that_changes_nothing_leaves_the_unet_bit_identical(tiny_model):
    unet = tiny_model.model.diffusion_model
    x, t, context = unet_inputs(tiny_model)
    with torch.no_grad():
        plain = unet(x, t, context=context)
        hooked = unet(x, t, context=context, hooks=(BlockHook(), Recorder()))
    assert torch.equal(plain, hooked)


def test_hooks_see_every_block_in_order_with_its_input_and_output(tiny_model):
    unet = tiny_model.model.diffusion_model
    x, t, context = unet_inputs(tiny_model)
    hook = Recorder()
    with torch.no_grad():
        unet(x, t, context=context, hooks=(hook,))
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    sites = [BlockSite("input", i) for i in range(n_in)] + [MIDDLE] + [BlockSite("output", i) for i in range(n_out)]
    assert hook.calls[0][0] == "time"
    assert [c[:2] for c in hook.calls[1:]] == [(kind, s) for s in sites for kind in ("in", "out")]
    blocks = [c for c in hook.calls if c[0] == "out"]
    assert torch.equal(blocks[0][2], x)  # conv_in sees the latents
    for before, after in zip(blocks[:n_in], blocks[1:n_in + 1]):  # each encoder block takes the last one's output
        assert torch.equal(after[2], before[3])
    # an output block's x is what block_input returned, with the skip concatenated
    entered = {c[1]: c[2] for c in hook.calls if c[0] == "in"}
    for _, site, block_x, _ in blocks[n_in + 1:]:
        width = entered[site].shape[1]
        assert torch.equal(block_x[:, :width], entered[site])
    with torch.no_grad():
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    assert torch.equal(hook.calls[0][1], emb)


def test_what_block_input_returns_is_what_the_decoder_uses(tiny_model):
    unet = tiny_model.model.diffusion_model
    x, t, context = unet_inputs(tiny_model)
    shifted = Recorder(shift_output_input=0.5)
    with torch.no_grad():
        plain = unet(x, t, context=context)
        out = unet(x, t, context=context, hooks=(shifted,))
    assert (out - plain).abs().max() > 1e-3
    first_out = next(c for c in shifted.calls if c[0] == "out" and c[1] == BlockSite("output", 0))
    entered = next(c[2] for c in shifted.calls if c[0] == "in" and c[1] == BlockSite("output", 0))
    assert torch.equal(first_out[2][:, :entered.shape[1]], entered)


def test_time_embedding_hook_changes_what_every_block_sees(tiny_model):
    class Silence(BlockHook):
        def time_embedding(self, emb):
            return torch.zeros_like(emb)

    unet = tiny_model.model.diffusion_model
    x, t, context = unet_inputs(tiny_model)
    with torch.no_grad():
        a = unet(x, t, context=context, hooks=(Silence(),))
        b = unet(x, torch.tensor([999, 1]), context=context, hooks=(Silence(),))
        c = unet(x, t, context=context)
    assert torch.equal(a, b)  # the timestep no longer reaches the blocks
    assert (a - c).abs().max() > 1e-3


def test_feature_addition_feeds_the_skip_and_the_next_block(tiny_model):
    unet = tiny_model.model.diffusion_model
    x, t, context = unet_inputs(tiny_model)
    site = BlockSite("input", 1)
    feature = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = unet(x, t, context=context, hooks=(FeatureAddition({site: feature}),))
        # by hand: the same loops, the feature added to input block 1's output
        h, hs = x, []
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
        for i, block in enumerate(unet.input_blocks):
            h = block(h, emb, context)
            h = h + feature if i == 1 else h
            hs.append(h)
        h = unet.middle_block(h, emb, context)
        expected = unet.decode(h, emb, context, hs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_feature_addition_refuses_a_feature_of_the_wrong_shape(tiny_model):
    unet = tiny_model.model.diffusion_model
    x, t, context = unet_inputs(tiny_model)
    hook = FeatureAddition({BlockSite("input", 1): torch.zeros(2, 32, 8, 8)})
    try:
        unet(x, t, context=context, hooks=(hook,))
    except ValueError as err:
        assert "input block 1" in str(err) and "(2, 32, 8, 8)" in str(err)
    else:
        raise AssertionError("a feature of the wrong shape was added")


class Shift(BlockControl):
    """A toy block control: adds a learnt constant, times the unit's weight, to the middle block's output."""

    def __init__(self):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(0.25))

    def num_levels(self) -> int:
        return 1

    def hook(self, unet, hint, scales, x, timesteps, context, y):
        return FeatureAddition({MIDDLE: self.value * scales[0] * torch.ones(x.shape[0], 64, 2, 2)})


def test_block_controls_compose_and_train_through_apply_model():
    model = model_as_trained(ROOT / "models" / "cldm_tiny.yaml")
    x, t, context = unet_inputs(model)
    hint = torch.rand(1, 3, 32, 32)
    units = [ControlUnit(Shift(), hint, strength=0.5), ControlUnit(Shift(), hint, strength=2.0)]
    total = sum((u.contribute(x, t, context, None, model.model.diffusion_model) for u in units), Contribution())
    assert len(total.hooks) == 2
    unet = model.model.diffusion_model
    with torch.no_grad():
        got = model.apply_model(x, t, {"c_crossattn": [context], "control": units})
        once = unet(x, t, context=context, hooks=(FeatureAddition({MIDDLE: torch.full((2, 64, 2, 2), 0.625)}),))
    torch.testing.assert_close(got, once, rtol=1e-6, atol=1e-6)
    # zero weight: no hook at all
    assert ControlUnit(Shift(), hint, strength=0.0).contribute(x, t, context, None, unet).hooks == ()
    # gradients reach the control's parameters although the UNet is locked
    shift = Shift()
    eps = model.apply_model(x, t, {"c_crossattn": [context], "control": [ControlUnit(shift, hint)]})
    eps.square().mean().backward()
    assert shift.value.grad is not None and shift.value.grad.abs() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_embedding_shows_hooks_what_every_block_gets():
    """After time_embedding, a hook is shown the embedding the blocks get: on SDXL with the vector y's added."""
    class Shown(BlockHook):
        def __init__(self):
            self.seen = []

        def time_embedding(self, emb):
            return emb * 2

        def embedding(self, emb):
            self.seen.append(emb)

    model = model_as_trained(ROOT / "models" / "cldm_tiny_xl.yaml")
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30, 600])
    with torch.no_grad():
        cond = model.text_conditioning(["a red circle", "a blue square"], (64, 64))
        hook = Shown()
        unet(x, t, context=cond["c_crossattn"][0], y=cond["c_adm"], hooks=(hook,))
        expected = 2 * unet.time_embed(timestep_embedding(t, unet.model_channels)) + unet.label_emb(cond["c_adm"])
    assert len(hook.seen) == 1
    torch.testing.assert_close(hook.seen[0], expected, rtol=0, atol=0)

"""ControlLDM behaviour on a tiny random model: zero-conv identity, scales, mid-only control, what trains."""

import torch

from conftest import randomize_zero_convs


def make_batch(n: int = 2, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "jpg": torch.rand(n, size, size, 3, generator=g) * 2 - 1,
        "hint": torch.rand(n, size, size, 3, generator=g),
        "txt": ["red circle with blue background", "green circle with white background"][:n],
    }


def eps_pair(model, batch):
    """(ControlLDM eps, plain UNet eps) on the same noisy latents, timestep and text."""
    x, cond = model.get_input(batch, model.first_stage_key)
    torch.manual_seed(3)
    x_noisy = torch.randn_like(x)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        controlled = model.apply_model(x_noisy, t, cond)
        plain = model.model.diffusion_model(x_noisy, t, context=cond["c_crossattn"][0])
    return controlled, plain


def test_fresh_control_is_exact_identity(tiny_model):
    controlled, plain = eps_pair(tiny_model, make_batch())
    assert torch.equal(controlled, plain)


def test_control_changes_output_and_scale_zero_removes_it(tiny_model):
    randomize_zero_convs(tiny_model)
    batch = make_batch()
    controlled, plain = eps_pair(tiny_model, batch)
    assert (controlled - plain).abs().max() > 1e-3
    tiny_model.control_scales = [0.0] * 13
    controlled, plain = eps_pair(tiny_model, batch)
    assert torch.equal(controlled, plain)


def test_only_mid_control_uses_only_the_last_residual(tiny_model):
    randomize_zero_convs(tiny_model)
    batch = make_batch()
    x, cond = tiny_model.get_input(batch, "jpg")
    x_noisy, t = torch.randn_like(x), torch.tensor([100, 900])
    context, hint = cond["c_crossattn"][0], cond["c_concat"][0]
    unet = tiny_model.model.diffusion_model
    with torch.no_grad():
        residuals = tiny_model.control_model(x=x_noisy, hint=hint, timesteps=t, context=context)
        mid_only = [torch.zeros_like(r) for r in residuals[:-1]] + [residuals[-1]]
        expected = unet(x_noisy, t, context=context, control=mid_only)
        tiny_model.only_mid_control = True
        got = tiny_model.apply_model(x_noisy, t, cond)
        everything = unet(x_noisy, t, context=context, control=residuals)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (everything - got).abs().max() > 1e-4


def grads_after_step(model):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = model.shared_step(make_batch())
    loss.backward()
    return {name for name, p in model.named_parameters() if p.grad is not None}


def test_sd_locked_trains_only_the_control_model(tiny_model):
    randomize_zero_convs(tiny_model)
    with_grad = grads_after_step(tiny_model)
    assert with_grad and all(n.startswith("control_model.") for n in with_grad)
    assert with_grad == {n for n, p in tiny_model.named_parameters() if n.startswith("control_model.")}
    assert set(map(id, tiny_model.trainable_parameters())) == set(map(id, tiny_model.control_model.parameters()))


def test_unlocked_mode_also_trains_the_unet_decoder(tiny_model):
    randomize_zero_convs(tiny_model)
    tiny_model.sd_locked = False
    with_grad = grads_after_step(tiny_model)
    prefixes = ("control_model.", "model.diffusion_model.output_blocks.", "model.diffusion_model.out.")
    assert all(n.startswith(prefixes) for n in with_grad)
    assert any(n.startswith("model.diffusion_model.output_blocks.") for n in with_grad)
    assert any(n.startswith("model.diffusion_model.out.") for n in with_grad)
    assert not any(n.startswith(("first_stage_model.", "cond_stage_model.")) for n in with_grad)
    tiny_model.learning_rate = 1e-4
    opt = tiny_model.configure_optimizers()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    expected = {id(p) for n, p in tiny_model.named_parameters() if n.startswith(prefixes)}
    assert in_opt == expected


def test_locked_parts_never_require_grad(tiny_model):
    locked = [n for n, _ in tiny_model.named_parameters()
              if n.startswith(("first_stage_model.", "cond_stage_model.", "model."))]
    assert len(locked) > 100  # the VAE, the text encoder and the UNet, whatever their layer names
    assert not [n for n in locked if tiny_model.get_parameter(n).requires_grad]
    trains = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in tiny_model.named_parameters() if n.startswith("control_model.")}

"""cldm/control_files.py: a control file of any kind (full ControlNet in each of its layouts, control-LoRA, LLLite)
becomes a network that steers the loaded model exactly as the model it was saved from; other files get one message
that names them."""

import pytest
import torch

from cldm.control import ControlUnit
from cldm.control_files import CONTROL_LORA, CONTROLNET, LLLITE, control_kind, controlnet_params, load_control_network
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.model import create_model, save_state_dict
from conftest import ROOT, model_as_trained, randomize_zero_convs
from ldm.checkpoint import CheckpointError, UserError

TINY = ROOT / "models" / "cldm_tiny.yaml"
TINY_LORA = ROOT / "models" / "cldm_tiny_lora.yaml"
TINY_LLLITE = ROOT / "models" / "cldm_tiny_lllite.yaml"
TINY_V21 = ROOT / "models" / "cldm_tiny_v21.yaml"


def build(config, seed: int = 0):
    model = model_as_trained(config, seed).eval()
    return model


def randomize_all(module: torch.nn.Module, seed: int = 4, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def same_base(source, config):
    """A model of `config` with the base weights (UNet, VAE, text encoder) of `source`."""
    model = create_model(config).eval()
    base = {k: v for k, v in source.state_dict().items() if not k.startswith("control_model.")}
    model.load_state_dict(base, strict=False)
    return model


def eps(model, units=(), own_hint=None):
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([40, 700])
    cond = {"c_crossattn": [torch.randn(2, 7, 32, generator=gen)], "control": list(units)}
    if own_hint is not None:
        cond["c_concat"] = [own_hint]
    with torch.no_grad():
        return model.apply_model(x, t, cond)


HINT = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("layout", ["control_only", "whole_checkpoint", "unprefixed", "diffusers"])
def test_full_controlnet_in_each_layout_steers_like_its_model(tmp_path, layout):
    source = build(TINY)
    randomize_zero_convs(source)
    control = source.control_state_dict()
    unprefixed = {k.removeprefix("control_model."): v for k, v in control.items()}
    table = diffusers_module_names(source.control_model)
    files = {"control_only": control, "whole_checkpoint": source.state_dict(), "unprefixed": unprefixed,
             "diffusers": {rename_module(k, table): v for k, v in unprefixed.items()}}
    assert control_kind(files[layout]) == CONTROLNET
    path = save_state_dict(files[layout], tmp_path / "control.safetensors")
    target = same_base(source, TINY_LLLITE)  # a model whose own control is not a ControlNet at all
    net = load_control_network(path, target, TINY_LLLITE)
    assert not any(p.requires_grad for p in net.parameters())
    expected = eps(source, own_hint=HINT)
    assert (expected - eps(source)).abs().max() > 1e-3  # the control acts: the test can fail
    torch.testing.assert_close(eps(target, [ControlUnit(net, HINT)]), expected, rtol=0, atol=1e-6)


def test_control_lora_file_on_a_full_controlnet_model(tmp_path):
    source = build(TINY_LORA)
    randomize_all(source.control_model)
    path = save_state_dict(source.control_state_dict(), tmp_path / "control_lora.safetensors")
    target = same_base(source, TINY)
    net = load_control_network(path, target, TINY)
    assert control_kind(source.control_state_dict()) == CONTROL_LORA
    unet = target.model.diffusion_model
    assert net.middle_block[0].in_layers[2].weight is unet.middle_block[0].in_layers[2].weight  # tied, not copied
    expected = eps(source, own_hint=HINT)
    assert (expected - eps(source)).abs().max() > 1e-3
    torch.testing.assert_close(eps(target, [ControlUnit(net, HINT)]), expected, rtol=0, atol=1e-5)


def test_lllite_file_on_a_full_controlnet_model(tmp_path):
    source = build(TINY_LLLITE)
    randomize_all(source.control_model, std=0.2)
    path = save_state_dict(source.control_state_dict(), tmp_path / "lllite.safetensors")
    assert control_kind(source.control_state_dict()) == LLLITE
    target = same_base(source, TINY)
    net = load_control_network(path, target, TINY)
    expected = eps(source, own_hint=HINT)
    assert (expected - eps(source)).abs().max() > 1e-3
    torch.testing.assert_close(eps(target, [ControlUnit(net, HINT)]), expected, rtol=0, atol=1e-6)


def test_controlnet_params_follow_the_config():
    assert controlnet_params(TINY) == {**controlnet_params(TINY_LLLITE), "hint_channels": 3}
    assert controlnet_params(TINY_LORA) == controlnet_params(TINY)
    assert controlnet_params(ROOT / "models" / "cldm_xl_lora.yaml") == controlnet_params(ROOT / "models" /
                                                                                        "cldm_xl.yaml")
    assert controlnet_params(TINY, hint_channels=1)["hint_channels"] == 1


def test_files_that_are_no_control_get_one_clear_message(tmp_path):
    model = build(TINY)
    base = {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    cases = {
        "sd_base.safetensors": (base, "is a Stable Diffusion checkpoint without control weights"),
        "vae.safetensors": ({"encoder.conv_in.weight": torch.zeros(1)}, "holds no control weights"),
    }
    nan = dict(model.control_state_dict())
    nan["control_model.zero_convs.0.0.weight"] = torch.full_like(nan["control_model.zero_convs.0.0.weight"],
                                                                   float("nan"))
    cases["nan.safetensors"] = (nan, "non-finite weights")
    other = build(TINY_V21)  # linear projections: the SD1.x-shaped tiny ControlNet does not fit it
    cases["v21_control.safetensors"] = (other.control_state_dict(), r"\(controlnet\) does not fit the model")
    lllite = build(TINY_LLLITE).control_state_dict()
    module = next(iter(lllite)).partition(".")[0]  # one module, moved to a layer the UNet does not have
    wrong = {k.replace(module, module.replace("_blocks_", "_blocks_9")) if k.startswith(module) else k: v
             for k, v in lllite.items()}
    cases["lllite_elsewhere.safetensors"] = (wrong, r"\(lllite\) does not fit the model")
    for name, (state, message) in cases.items():
        path = save_state_dict(state, tmp_path / name)
        with pytest.raises(UserError, match=message) as info:
            load_control_network(path, model, TINY)
        assert name in str(info.value)
    (tmp_path / "page.safetensors").write_text("<!doctype html><html><body>Sign in</body></html>")
    with pytest.raises(CheckpointError, match="looks like an HTML page"):
        load_control_network(tmp_path / "page.safetensors", model, TINY)

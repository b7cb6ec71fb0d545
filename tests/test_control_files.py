"""cldm/loader.py and cldm/modes.py: a control file of any kind (full ControlNet in each of its layouts,
control-LoRA, LLLite) is recognised by its mode and becomes a network that steers the loaded model exactly as the
model it was saved from; other files get one message that names them."""

import pytest
import torch
from omegaconf import OmegaConf

from cldm.cldm import CONTROLNET, controlnet_params
from cldm.control import ControlUnit
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.lllite import LLLITE
from cldm.loader import load_control_network
from cldm.lora import CONTROL_LORA
from cldm.model import create_model, save_state_dict
from cldm.modes import recognise
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
    assert recognise(files[layout]).mode is CONTROLNET
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
    assert recognise(source.control_state_dict()).mode is CONTROL_LORA
    unet = target.model.diffusion_model
    assert net.middle_block[0].in_layers[2].weight is unet.middle_block[0].in_layers[2].weight  # tied, not copied
    expected = eps(source, own_hint=HINT)
    assert (expected - eps(source)).abs().max() > 1e-3
    torch.testing.assert_close(eps(target, [ControlUnit(net, HINT)]), expected, rtol=0, atol=1e-5)


def test_lllite_file_on_a_full_controlnet_model(tmp_path):
    source = build(TINY_LLLITE)
    randomize_all(source.control_model, std=0.2)
    path = save_state_dict(source.control_state_dict(), tmp_path / "lllite.safetensors")
    assert recognise(source.control_state_dict()).mode is LLLITE
    target = same_base(source, TINY)
    net = load_control_network(path, target, TINY)
    expected = eps(source, own_hint=HINT)
    assert (expected - eps(source)).abs().max() > 1e-3
    torch.testing.assert_close(eps(target, [ControlUnit(net, HINT)]), expected, rtol=0, atol=1e-6)


def test_controlnet_params_follow_the_config():
    def params(config, **kwargs):
        return controlnet_params(OmegaConf.load(config), **kwargs)
    assert params(TINY) == {**params(TINY_LLLITE), "hint_channels": 3}
    assert params(TINY_LORA) == params(TINY)
    assert params(ROOT / "models" / "cldm_xl_lora.yaml") == params(ROOT / "models" / "cldm_xl.yaml")
    assert params(TINY, hint_channels=1)["hint_channels"] == 1


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


def test_each_layout_is_recognised_by_exactly_its_mode():
    """Every layout of every mode is told by its own mode alone; a file holding two kinds is refused by name."""
    controlnet = build(TINY).control_state_dict()
    lora_model = build(TINY_LORA)
    randomize_all(lora_model.control_model)
    lora = lora_model.control_state_dict()
    lllite = build(TINY_LLLITE).control_state_dict()
    table = diffusers_module_names(lora_model.control_model)
    v2 = {rename_module(k[:-len(".down")], table) + ".lora_layer.down.weight" if k.endswith(".down") else k: v
          for k, v in lora.items() if k != "lora_controlnet"}
    files = [
        (CONTROLNET, "original", controlnet),
        (CONTROLNET, "unprefixed", {k.removeprefix("control_model."): v for k, v in controlnet.items()}),
        (CONTROL_LORA, "control-lora", lora),
        (CONTROL_LORA, "ControlLoRA v2", v2),
        (CONTROL_LORA, "offset pairs",
         {"control_model." + k: v for k, v in lora_model.control_model.state_dict().items()}),
        (LLLITE, "kohya", lllite),
        (LLLITE, "kohya", {"control_model." + k: v for k, v in lllite.items()}),
    ]
    for mode, layout, state in files:
        found = recognise(state)
        assert (found.mode, found.layout) == (mode, layout)
    both = {**controlnet, **lllite}
    with pytest.raises(UserError, match=r"both.safetensors holds the keys of 2 kinds of control file at once "
                                        r"\(controlnet, original layout; lllite, kohya layout\)"):
        recognise(both, "both.safetensors")


def test_control_lora_with_transposed_up_matrices_is_refused_by_name(tmp_path):
    """An `up` stored (r, out) instead of (out, r) has the same number of elements: reshaped into the layer it
    would steer with garbage. ComfyUI's up.flatten(1) @ down.flatten(1) fails on it; so do we, naming the key."""
    source = build(TINY_LORA)
    randomize_all(source.control_model)
    file = dict(source.control_state_dict())
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.up"
    assert file[key].shape == (32, 8)
    file[key] = file[key].t().contiguous()
    path = save_state_dict(file, tmp_path / "transposed.safetensors")
    target = same_base(source, TINY)
    with pytest.raises(UserError, match=r"transposed.safetensors \(control-lora\) does not fit the model.*"
                                        r"attn1.to_q.up \(8, 32\)") as info:
        load_control_network(path, target, TINY)
    assert "transposed up" in str(info.value)
    with pytest.raises(ValueError, match=r"to_q.up \(8, 32\) and .*to_q.down \(8, 32\) are not an offset"):
        build(TINY_LORA).load_control(file)


def test_every_configs_export_is_recognised_by_its_own_mode_alone():
    """Every tiny and demo YAML under models/ (on the meta device): its model's export is a file of the config's own
    mode and of no other, and every registered mode has such a config. (The full-size ones: each mode's tests.)"""
    from cldm.modes import MODES, config_mode
    seen = set()
    for config in sorted([*(ROOT / "models").glob("cldm_tiny*.yaml"), *(ROOT / "models").glob("cldm_demo*.yaml")]):
        model = create_model(config, device="meta")
        found = recognise(model.control_state_dict(), config.name)
        assert found.mode is config_mode(config) is model.control_mode, f"{config.name}: {found}"
        seen.add(found.mode.name)
    assert seen == {mode.name for mode in MODES}

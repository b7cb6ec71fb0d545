"""tool_convert_diffusers: diffusers' ControlNetModel loads our export and computes the same residuals."""

import json

import diffusers
import pytest
import torch

import tool_convert_diffusers as tool
from cldm.cli import run_tool
from cldm.diffusers_convert import build_mapping
from cldm.model import create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT

TINY_CONFIGS = ["cldm_tiny.yaml", "cldm_tiny_v21.yaml"]


@pytest.fixture(scope="module", params=TINY_CONFIGS)
def exported(request, tmp_path_factory):
    """A tiny ControlLDM with every ControlNet weight random (zero convs too), saved whole and exported."""
    config = ROOT / "models" / request.param
    torch.manual_seed(0)
    model = create_model(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.control_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    tmp = tmp_path_factory.mktemp(config.stem)
    save_state_dict(model.state_dict(), tmp / "full.ckpt")
    tool.main(["to-diffusers", str(tmp / "full.ckpt"), str(tmp / "diffusers"), "--config", str(config)])
    return config, model, tmp


def test_diffusers_loads_export_and_matches_residuals(exported):
    config, model, tmp = exported
    net, info = diffusers.ControlNetModel.from_pretrained(tmp / "diffusers", output_loading_info=True)
    assert not any(info.values()), info
    net.eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 4, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 7, 32, generator=gen)
    hint = torch.rand(2, 3, 32, 32, generator=gen)  # in [0, 1] at pixel size, as both models take it
    with torch.no_grad():
        ours = model.control_model(x=x, hint=hint, timesteps=t, context=context)
        down, mid = net(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=1.0,
                        return_dict=False)
    theirs = [*down, mid]
    assert len(theirs) == len(ours) == 5
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, i
        assert a.abs().max() > 1e-3, f"residual {i} is zero: the zero convs did not get random weights"
        assert (a - b).abs().max().item() <= 1e-5, f"residual {i} differs by {(a - b).abs().max().item()}"


def test_round_trip_is_bit_exact_and_loads_into_controlldm(exported):
    config, model, tmp = exported
    out = tmp / "control.safetensors"
    tool.main(["from-diffusers", str(tmp / "diffusers"), str(out), "--config", str(config)])
    back = load_state_dict(out)
    want = {f"control_model.{k}": v for k, v in model.control_model.state_dict().items()}
    assert back.keys() == want.keys()
    assert all(torch.equal(back[k], want[k]) and back[k].dtype == want[k].dtype for k in want)
    fresh = create_model(config)
    assert load_checkpoint(fresh, back, prefixes=("control_model.",)).ok


@pytest.mark.parametrize("name, heads, linear, context", [("cldm_v15.yaml", 8, False, 768),
                                                          ("cldm_v21.yaml", [5, 10, 20, 20], True, 1024)])
def test_full_size_mapping_matches_diffusers_layout(name, heads, linear, context):
    """The SD1.5 / SD2.1 mapping lands on exactly the keys and shapes diffusers builds from our config."""
    mapping = build_mapping(ROOT / "models" / name)
    assert (mapping.config["attention_head_dim"], mapping.config["use_linear_projection"],
            mapping.config["cross_attention_dim"]) == (heads, linear, context)
    assert mapping.config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    with torch.device("meta"):
        net = diffusers.ControlNetModel.from_config(mapping.config)
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert theirs == {mapping.keys[k]: shape for k, shape in mapping.shapes.items()}
    assert mapping.keys["input_hint_block.14.weight"] == "controlnet_cond_embedding.conv_out.weight"
    assert mapping.keys["zero_convs.11.0.bias"] == "controlnet_down_blocks.11.bias"
    skip = mapping.keys["input_blocks.4.0.skip_connection.weight"]
    assert skip == "down_blocks.1.resnets.0.conv_shortcut.weight"


def test_pooled_config_sets_global_pool_conditions():
    config = build_mapping(ROOT / "models" / "cldm_v15_avg_pool.yaml").config
    assert config["global_pool_conditions"] is True


def test_refusals_name_the_problem(exported):
    config, model, tmp = exported
    run = lambda *args: tool.main([*map(str, args), "--config", str(config)])  # noqa: E731
    with pytest.raises(FileExistsError, match="config.json already exists; pass --force"):
        run("to-diffusers", tmp / "full.ckpt", tmp / "diffusers")
    sd = model.state_dict()
    del sd["control_model.middle_block.1.proj_in.weight"]
    save_state_dict(sd, tmp / "broken.ckpt", force=True)
    with pytest.raises(ValueError, match=r"missing key middle_block\.1\.proj_in\.weight"):
        run("to-diffusers", tmp / "broken.ckpt", tmp / "other")
    assert not (tmp / "other").exists()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        run("from-diffusers", tmp, tmp / "x.safetensors")
    config = next(ROOT / "models" / name for name in TINY_CONFIGS if name != config.name)
    with pytest.raises(ValueError, match="use_linear_projection: folder has"):
        run("from-diffusers", tmp / "diffusers", tmp / "y.safetensors")
    written = json.loads((tmp / "diffusers" / "config.json").read_text())
    assert written["_class_name"] == "ControlNetModel" and written["conditioning_channels"] == 3


def test_a_folder_of_nan_weights_or_a_mistyped_config_is_one_line_and_exit_1(exported, tmp_path, capsys):
    """from-diffusers wrote a ControlNet of NaN weights with exit 0, and a config.json whose down_block_types is a
    number ended in a TypeError traceback."""
    config, _, tmp = exported
    folder = tmp_path / "folder"
    folder.mkdir()
    weights = load_state_dict(tmp / "diffusers" / "diffusion_pytorch_model.safetensors")
    key = "controlnet_down_blocks.0.weight"
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_state_dict(weights, folder / "diffusion_pytorch_model.safetensors")
    written = json.loads((tmp / "diffusers" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(written))
    out = tmp_path / "control.safetensors"

    def run(*args) -> str:
        code = run_tool(tool.main, [*map(str, args), "--config", str(config)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err and not out.exists(), err
        return err.splitlines()[0]

    assert run("from-diffusers", folder, out) == (f"error: {folder / 'diffusion_pytorch_model.safetensors'} has "
                                                  f"non-finite weights (NaN or inf) in 1 tensors, e.g. {key}")
    (folder / "config.json").write_text(json.dumps({**written, "down_block_types": 4}))
    assert run("from-diffusers", folder, out) == (f"error: {folder / 'config.json'}: down_block_types is 4, expected "
                                                  "a list, as a ControlNetModel config.json has it")
    (folder / "config.json").write_text(json.dumps({**written, "layers_per_block": True, "attention_head_dim": [2]}))
    assert "layers_per_block is true, expected a whole number" in run("from-diffusers", folder, out)
    # a NaN ControlNet is not exported the other way either
    nan = {k: torch.full_like(v, float("nan")) if k == "control_model.zero_convs.0.0.weight" else v
           for k, v in load_state_dict(tmp / "full.ckpt").items()}
    save_state_dict(nan, tmp_path / "nan.ckpt")
    out = tmp_path / "nan_diffusers"
    assert "nan.ckpt has non-finite weights" in run("to-diffusers", tmp_path / "nan.ckpt", out)


@pytest.mark.parametrize("config,mode", [("cldm_tiny_lora.yaml", "control-lora"), ("cldm_tiny_lllite.yaml", "lllite")])
def test_the_configs_mode_converts_and_one_without_a_diffusers_class_is_refused_by_name(config, mode, tmp_path,
                                                                                       capsys):
    """The tool asks the config's ControlMode to convert (a new mode converts its own files without touching the
    tool); control-LoRA and LLLite have no diffusers class, which the mode says in one line."""
    model = create_model(ROOT / "models" / config)
    save_state_dict(model.control_state_dict(), tmp_path / "control.safetensors")
    for command, source, out in (("to-diffusers", tmp_path / "control.safetensors", tmp_path / "folder"),
                                 ("from-diffusers", tmp_path, tmp_path / "back.safetensors")):
        code = run_tool(tool.main, [command, str(source), str(out), "--config", str(ROOT / "models" / config)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err and not out.exists(), err
        assert err.splitlines()[0] == f"error: {mode} files have no diffusers class to convert to or from"

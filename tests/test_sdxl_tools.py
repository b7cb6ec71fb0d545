"""SDXL files through the tools, on the tiny SDXL config: a base in sd_xl_base_1.0's layout loads and gets a
ControlNet (tool_add_control_sdxl), transfers (tool_transfer_control) and converts to diffusers and back."""

import pytest
import torch
from test_tools_add_control import run_script

import tool_convert_diffusers
import tool_transfer_control
from cldm.model import CONTROL_PREFIX, create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained
from ldm.checkpoint import BASE_PREFIXES, UNET_PREFIX

TINY_XL = ROOT / "models" / "cldm_tiny_xl.yaml"


def sgm_base(seed: int = 0, optional_keys: bool = True) -> dict[str, torch.Tensor]:
    """A tiny base in sd_xl_base_1.0.safetensors' layout (float16), with or without its two optional keys."""
    model = model_as_trained(TINY_XL, seed)
    sd = {k: v.half() for k, v in model.state_dict().items() if not k.startswith(CONTROL_PREFIX)}
    if optional_keys:
        sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["denoiser.sigmas"] = ((1 - model.alphas_cumprod) / model.alphas_cumprod).sqrt()
    return sd


@pytest.mark.parametrize("optional_keys", [True, False])
def test_sgm_layout_base_loads_with_nothing_missing_or_unexpected(optional_keys):
    model = create_model(TINY_XL)
    report = load_checkpoint(model, sgm_base(optional_keys=optional_keys), prefixes=BASE_PREFIXES)
    assert report.ok, report


def test_add_control_sdxl_copies_the_unet_encoder_label_emb_included(tmp_path, capsys, caplog, monkeypatch):
    assert run_script("tool_add_control_sdxl.py", ["--help"], monkeypatch) == 0
    assert "cldm_xl.yaml" in capsys.readouterr().out
    base = sgm_base()
    src = save_state_dict(base, tmp_path / "sd_xl_base.safetensors")
    out = tmp_path / "control_sdxl_ini.safetensors"
    with caplog.at_level("INFO"):
        assert run_script("tool_add_control_sdxl.py", [src, out, "--config", TINY_XL], monkeypatch) == 0
    result = load_state_dict(out)
    fresh = create_model(TINY_XL)
    assert result.keys() == fresh.state_dict().keys()
    assert load_checkpoint(fresh, result, strict=True).ok
    copied = [k for k in result
              if k.startswith(CONTROL_PREFIX) and UNET_PREFIX + k.removeprefix(CONTROL_PREFIX) in base]
    assert {"control_model.label_emb.0.0.weight", "control_model.label_emb.0.2.bias"} <= set(copied)
    assert all(torch.equal(result[k], base[UNET_PREFIX + k.removeprefix(CONTROL_PREFIX)]) for k in copied)
    assert all(result[k].dtype == torch.float16 for k in copied)  # the file's dtype, not float32
    assert not result["control_model.zero_convs.8.0.weight"].any()
    assert not result["control_model.middle_block_out.0.bias"].any()
    added = {line.removeprefix("These weights are newly added: ") for line in caplog.messages
             if line.startswith("These weights are newly added: ")}
    assert added == {k for k in result if k.startswith(CONTROL_PREFIX) and k not in copied}


def test_add_control_sdxl_on_an_sd15_checkpoint_says_sdxl(tmp_path, capsys, monkeypatch):
    """The hint asked "(SD1.x vs SD2.x)" of an SDXL config."""
    sd15 = {k: v for k, v in model_as_trained(ROOT / "models" / "cldm_tiny.yaml").state_dict().items()
            if not k.startswith(CONTROL_PREFIX)}
    src = save_state_dict(sd15, tmp_path / "v1-5.safetensors")
    out = tmp_path / "control_sdxl_ini.safetensors"
    assert run_script("tool_add_control_sdxl.py", [src, out, "--config", TINY_XL], monkeypatch) == 1
    error, hint = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: {src} does not fit {TINY_XL}: ") and not out.exists()
    assert hint == (f"hint: --config {TINY_XL} builds on SDXL: is the checkpoint an SDXL one? (SD1.x, SD2.x and "
                    "SDXL each have their configs)")


def test_transfer_control_on_sdxl(tmp_path, capsys):
    base, target = sgm_base(0), sgm_base(1, optional_keys=False)
    gen = torch.Generator().manual_seed(5)
    control = {k: torch.randn(v.shape, generator=gen) for k, v in create_model(TINY_XL).state_dict().items()
               if k.startswith(CONTROL_PREFIX)}
    paths = {name: save_state_dict(sd, tmp_path / f"{name}.safetensors")
             for name, sd in (("control", control), ("base", base), ("target", target))}
    out = tmp_path / "transferred.safetensors"
    tool_transfer_control.main(["--control", str(paths["control"]), "--base", str(paths["base"]),
                                "--target", str(paths["target"]), "--out", str(out), "--config", str(TINY_XL)])
    result = load_state_dict(out)
    key = "control_model.label_emb.0.0.weight"
    twin = UNET_PREFIX + key.removeprefix(CONTROL_PREFIX)
    expected = control[key] + (target[twin].float() - base[twin].float())
    torch.testing.assert_close(result[key], expected, rtol=0, atol=0)
    assert torch.equal(result["control_model.zero_convs.0.0.weight"], control["control_model.zero_convs.0.0.weight"])
    assert torch.equal(result["conditioner.embedders.1.model.text_projection"],
                       target["conditioner.embedders.1.model.text_projection"])


def test_diffusers_round_trip_keeps_label_emb_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model(TINY_XL)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.control_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_state_dict(model.control_state_dict(), tmp_path / "control.safetensors")
    tool_convert_diffusers.main(["to-diffusers", str(tmp_path / "control.safetensors"), str(tmp_path / "cn"),
                                 "--config", str(TINY_XL)])
    exported = load_state_dict(tmp_path / "cn" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(exported["add_embedding.linear_1.weight"], model.control_model.label_emb[0][0].weight)
    assert torch.equal(exported["add_embedding.linear_2.bias"], model.control_model.label_emb[0][2].bias)
    tool_convert_diffusers.main(["from-diffusers", str(tmp_path / "cn"), str(tmp_path / "back.safetensors"),
                                 "--config", str(TINY_XL)])
    back = load_state_dict(tmp_path / "back.safetensors")
    want = model.control_state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    # an SD1.5 config refuses the SDXL folder by name, rather than converting it wrongly
    with pytest.raises(ValueError, match="addition_embed_type"):
        tool_convert_diffusers.main(["from-diffusers", str(tmp_path / "cn"), str(tmp_path / "x.safetensors"),
                                     "--config", str(ROOT / "models" / "cldm_tiny_v21.yaml")])


def test_eval_control_samples_sdxl_through_the_pipeline(tmp_path):
    """tool_eval_control on a tiny SDXL ControlLDM whose ControlNet acts: with and without control differ."""
    import tool_eval_control
    from conftest import randomize_zero_convs
    from tool_make_fill50k import make_fill50k
    model = model_as_trained(TINY_XL)
    model.control_model.load_state_dict(model.model.diffusion_model.state_dict(), strict=False)
    randomize_zero_convs(model)
    ckpt = save_state_dict(model.state_dict(), tmp_path / "full.safetensors")
    data = make_fill50k(tmp_path / "val", n=2, size=64, seed=1)
    args = ["--config", str(TINY_XL), "--ckpt", str(ckpt), "--data_root", str(data), "--n", "2", "--metrics", "ssim",
            "--steps", "2", "--device", "cpu", "--sampler", "euler"]
    summary = tool_eval_control.main(args)
    assert summary["n"] == 2 and summary["metrics"]["ssim"]["paired_diff"]["mean"] != 0.0
    # the size conditioning reaches the samples, and the summary records it
    sized = tool_eval_control.main(args + ["--original_size", "512", "384", "--crops_coords_top_left", "16", "0"])
    assert sized["original_size"] == (512, 384) and sized["crops_coords_top_left"] == (16, 0)
    assert sized["metrics"]["ssim"]["control"]["mean"] != summary["metrics"]["ssim"]["control"]["mean"]
    # an SD config has no size conditioning: refused by name, not ignored
    sd = model_as_trained(ROOT / "models" / "cldm_tiny.yaml")
    sd_ckpt = save_state_dict(sd.state_dict(), tmp_path / "sd.safetensors")
    sd_data = make_fill50k(tmp_path / "val32", n=1, size=32, seed=1)
    with pytest.raises(ValueError, match="target_size: size conditioning applies to SDXL-type models only"):
        tool_eval_control.main(["--config", str(ROOT / "models" / "cldm_tiny.yaml"), "--ckpt", str(sd_ckpt),
                                "--data_root", str(sd_data), "--n", "1", "--metrics", "ssim", "--steps", "1",
                                "--device", "cpu", "--target_size", "64", "64"])

"""cldm/loader.py, the one model loader: base and control files of any mode into the model of a config, one report;
tool_eval_control.py on the full, LoRA-offset, LLLite, T2I-Adapter and ControlNet-XS exports of real (tiny) training
runs."""

import pytest
import torch

import tool_add_control
import tool_eval_control
from cldm.cldm import CONTROLNET
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.loader import MissingWeightsError, load_model
from cldm.model import CONTROL_PREFIX, load_state_dict, save_state_dict
from cldm.train_command import main as train
from conftest import ROOT, model_as_trained, randomize_zero_convs
from ldm.checkpoint import CheckpointError, UserError
from tool_make_fill50k import make_fill50k

TINY = ROOT / "models" / "cldm_tiny.yaml"
TINY_LORA = ROOT / "models" / "cldm_tiny_lora.yaml"
TINY_LLLITE = ROOT / "models" / "cldm_tiny_lllite.yaml"
TINY_T2I = ROOT / "models" / "cldm_tiny_t2i.yaml"
TINY_XS = ROOT / "models" / "cldm_tiny_xs.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Stable Diffusion checkpoint of the tiny base (with an EMA key, as SD1.5's) and a few images."""
    tmp = tmp_path_factory.mktemp("loader")
    sd = {k: v for k, v in model_as_trained(TINY).state_dict().items() if not k.startswith(CONTROL_PREFIX)}
    save_state_dict(sd | {"model_ema.decay": torch.tensor(0.9999)}, tmp / "sd.ckpt")
    make_fill50k(tmp / "data", n=4, size=32, seed=0)
    return tmp


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [TINY, TINY_LORA, TINY_LLLITE, TINY_T2I, TINY_XS],
                         ids=["full", "lora", "lllite", "t2i", "xs"])
def test_eval_control_evaluates_the_export_of_a_training_run(files, tmp_path, config):
    """The mode's export of a 2-step run plus the SD checkpoint it trained on give the trained model exactly, and
    tool_eval_control scores it (it refused the LoRA and LLLite exports: weights "in none of" the files)."""
    initial = files / "sd.ckpt"
    if config == TINY:  # a full ControlNet starts from the UNet's copy
        initial = tmp_path / "ini.safetensors"
        tool_add_control.main([str(files / "sd.ckpt"), str(initial), "--config", str(config)])
    out = tmp_path / "run"
    train(["--config", str(config), "--resume_path", str(initial), "--data_root", str(files / "data"),
           "--batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-2", "--seed", "0",
           "--logger_freq", "1000", "--checkpoint_every", "1000", "--accelerator", "cpu", "--devices", "1",
           "--output_dir", str(out)])
    export = out / "control_model.safetensors"
    trained = load_state_dict(out / "checkpoints" / "last.ckpt")

    model, report = load_model(config, [files / "sd.ckpt", export])
    assert same_weights(model.state_dict(), trained)
    assert report.unexpected == {str(files / "sd.ckpt"): ["model_ema.decay"], str(export): []}

    summary = tool_eval_control.main(["--config", str(config), "--ckpt", str(files / "sd.ckpt"), str(export),
                                      "--data_root", str(files / "data"), "--n", "2", "--metrics", "ssim",
                                      "--steps", "2", "--device", "cpu", "--batch_size", "2"])
    assert summary["n"] == 2 and summary["checkpoints"] == [str(files / "sd.ckpt"), str(export)]
    # the trained control acts (an untrained one of any mode is an exact no-op: the difference would be 0)
    assert summary["metrics"]["ssim"]["paired_diff"]["mean"] != 0.0


def test_a_full_controlnet_in_any_layout_completes_the_base(files, tmp_path):
    source = model_as_trained(TINY)
    randomize_zero_convs(source)
    control = {k.removeprefix(CONTROL_PREFIX): v for k, v in source.control_state_dict().items()}
    table = diffusers_module_names(source.control_model)
    diffusers = save_state_dict({rename_module(k, table): v for k, v in control.items()}, tmp_path / "cn.safetensors")
    assert CONTROLNET.layout(load_state_dict(diffusers)) == "diffusers"
    model, report = load_model(TINY, [files / "sd.ckpt", diffusers])
    assert same_weights(model.control_model.state_dict(), source.control_model.state_dict())
    assert report.unexpected[str(diffusers)] == []
    assert same_weights(model.control_model.state_dict(), source.control_model.state_dict())
    # the same file alone: the base is missing, said once with what to give
    with pytest.raises(MissingWeightsError, match=r"cn.safetensors lacks \d+ weights of .*cldm_tiny.yaml, e.g. "
                                                  r"\['model.diffusion_model.") as info:
        load_model(TINY, [diffusers])
    assert "Stable Diffusion checkpoint" in info.value.advice


def test_files_the_loader_refuses_by_name(files, tmp_path):
    lllite = save_state_dict(model_as_trained(TINY_LLLITE).control_state_dict(), tmp_path / "lllite.safetensors")
    with pytest.raises(UserError, match=r"lllite.safetensors is an? lllite file \(kohya layout\), but the model of "
                                        r"this config takes controlnet files") as info:
        load_model(TINY, [files / "sd.ckpt", lllite])
    assert "_lllite.yaml" in info.value.advice
    # an SD checkpoint alone for a full ControlNet: its control network is in no file
    with pytest.raises(MissingWeightsError, match=r"sd.ckpt lacks \d+ weights of .*, e.g. \['control_model.") as info:
        load_model(TINY, [files / "sd.ckpt"])
    assert "tool_add_control.py" in info.value.advice
    nan = dict(model_as_trained(TINY_LORA).control_state_dict())
    key = next(k for k in nan if k.endswith(".down"))
    nan[key] = torch.full_like(nan[key], float("nan"))
    with pytest.raises(CheckpointError, match=rf"nan.safetensors has non-finite weights .* e.g. {key}"):
        load_model(TINY_LORA, [files / "sd.ckpt", save_state_dict(nan, tmp_path / "nan.safetensors")])
    other = save_state_dict({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(UserError, match="vae.safetensors holds no control weights: expected a full ControlNet"):
        load_model(TINY, [files / "sd.ckpt", other])
    # a model's own control file loaded directly is checked for its mode too
    with pytest.raises(UserError, match=r"lllite.safetensors is not a controlnet file"):
        model_as_trained(TINY).load_control(lllite)

"""The original configs build models whose state dicts match the published checkpoints key for key."""

import pytest
import torch
from omegaconf import OmegaConf

from cldm.cldm import ControlNet
from cldm.model import create_model
from conftest import REFERENCE, ROOT, reference_keys
from ldm.util import instantiate_from_config


def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_project_config_equals_reference(version):
    ours = OmegaConf.to_container(OmegaConf.load(ROOT / "models" / f"cldm_{version}.yaml"))
    ref = OmegaConf.to_container(OmegaConf.load(REFERENCE / f"cldm_{version}.yaml"))

    def check(a, b, path):
        if isinstance(b, dict):
            for k in b:
                assert k in a, f"{path}.{k} missing"
                check(a[k], b[k], f"{path}.{k}")
        else:
            assert a == b, f"{path}: {a!r} != {b!r}"

    check(ours, ref, "")


# parameters of the published checkpoints: ControlNet, UNet
PUBLISHED_COUNTS = {"v15": (361_279_120, 859_520_964), "v21": (364_228_240, 865_910_724)}


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_unet_and_controlnet_keys_match_reference(version):
    cfg = OmegaConf.load(ROOT / "models" / f"cldm_{version}.yaml").model.params
    ref = reference_keys(f"cldm_{version}.keys.tsv")
    with torch.device("meta"):
        unet = instantiate_from_config(cfg.unet_config)
        control = instantiate_from_config(cfg.control_stage_config)
    assert shapes(unet, "model.diffusion_model.") == {k: v for k, v in ref.items()
                                                      if k.startswith("model.diffusion_model.")}
    assert shapes(control, "control_model.") == {k: v for k, v in ref.items() if k.startswith("control_model.")}
    counts = (sum(p.numel() for p in control.parameters()), sum(p.numel() for p in unet.parameters()))
    assert counts == PUBLISHED_COUNTS[version]


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_control_ldm_keys_match_reference(version):
    model = create_model(ROOT / "models" / f"cldm_{version}.yaml", device="meta")
    ref = reference_keys(f"cldm_{version}.keys.tsv")
    ours = shapes(model)
    ref_required = {k: v for k, v in ref.items() if not k.endswith("embeddings.position_ids")}
    ours_required = {k: v for k, v in ours.items() if not k.endswith("embeddings.position_ids")}
    assert ours_required == ref_required
    assert set(ours) <= set(ref)


CONFIGS = sorted(p.name for p in (ROOT / "models").glob("*.yaml"))


def control_target(name: str) -> str | None:
    return OmegaConf.load(ROOT / "models" / name).model.params.get("control_stage_config", {}).get("target")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_a_model_that_trains_its_mode_only(name):
    model = create_model(ROOT / "models" / name, device="meta")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = ("model.diffusion_model.output_blocks.", "model.diffusion_model.out.")
    assert trains and all(n.startswith(("control_model.", *decoder)) for n in trains), name
    assert any(n.startswith("control_model.") for n in trains)


FULL_COPIES = [name for name in CONFIGS if control_target(name) == "cldm.cldm.ControlNet"]


@pytest.mark.parametrize("name", FULL_COPIES)
def test_a_full_controlnet_copies_the_unets_encoder_shape_for_shape(name):
    assert {"cldm_v15.yaml", "cldm_v21.yaml", "cldm_xl.yaml", "cldm_tiny.yaml"} <= set(FULL_COPIES)
    model = create_model(ROOT / "models" / name, device="meta")
    assert type(model.control_model) is ControlNet
    unet = dict(model.model.diffusion_model.named_parameters())
    copied = [(n, p) for n, p in model.control_model.named_parameters()
              if n.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block."))]
    assert copied and all(unet[n].shape == p.shape for n, p in copied)


@pytest.mark.parametrize(("setting", "refusal"), [
    ({"use_positional_encodings": True}, "use_positional_encodings .* is not supported"),
    ({"num_timesteps_cond": 2}, "num_timesteps_cond 2: noising the conditioning .* is not supported"),
])
def test_settings_of_the_original_that_would_be_ignored_are_refused(setting, refusal):
    """The original's configs load with their sampler and logging settings, which do nothing here; a setting that
    would change training if it took effect is refused instead of ignored."""
    model = create_model(ROOT / "models" / "cldm_tiny.yaml", device="meta",
                         params={"monitor": "val/loss_simple_ema", "log_every_t": 200, "clip_denoised": False})
    assert not hasattr(model, "monitor") and not hasattr(model, "log_every_t")
    with pytest.raises(ValueError, match=refusal):
        create_model(ROOT / "models" / "cldm_tiny.yaml", device="meta", params=setting)

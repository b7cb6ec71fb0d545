"""Stability's control-LoRAs on SDXL: their layout on the meta device (ranks 128 and 256), a file in that layout
loads with its per-tensor ranks and computes what ComfyUI computes, our LoRA-offset mode trains on SDXL and
saves that layout, and tool_fuse_control_lora fuses it."""

import pytest
import torch
from omegaconf import OmegaConf

import tool_fuse_control_lora
from cldm.lora import LoRAControlNet
from cldm.model import create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained, reference_keys, shapes
from ldm.util import instantiate_from_config
from tool_make_fill50k import make_fill50k

XL_LORA, TINY_XL_LORA = ROOT / "models" / "cldm_xl_lora.yaml", ROOT / "models" / "cldm_tiny_xl_lora.yaml"
TINY_XL = ROOT / "models" / "cldm_tiny_xl.yaml"
SHARED = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
NEW = ("input_hint_block.", "zero_convs.", "middle_block_out.")


@pytest.mark.parametrize("rank, reference, elements", [(128, "control_lora_xl.keys.tsv", 197_779_104),
                                                       (256, "control_lora_xl_rank256.keys.tsv", 387_137_184)])
def test_our_file_has_the_layout_of_stabilitys_files(rank, reference, elements):
    config = OmegaConf.load(XL_LORA)
    config.model.params.control_stage_config.params.update(lora_linear_rank=rank, lora_conv_rank=rank)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    file = model.control_state_dict()
    assert shapes(file) == reference_keys(f"sdxl/{reference}")
    assert sum(v.numel() for v in file.values()) == elements
    assert tuple(file["input_blocks.0.0.down"].shape) == (4, 4, 3, 3)  # the rank capped at 4 input channels


def unet_encoder(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.model.diffusion_model.state_dict().items() if k.startswith(SHARED)}


def lora_model(seed: int = 0):
    model = model_as_trained(TINY_XL_LORA, seed)
    return model


def stability_file(model, rank: int = 6) -> dict[str, torch.Tensor]:
    """A control-LoRA as Stability's tool writes one from a trained ControlNet-XL: every >= 2-d copy weight as
    fp16 `.up`/`.down` of rank min(rank, in, out), every 1-d copy tensor whole, new layers whole, marker."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for key, w in unet_encoder(model).items():
        if w.dim() >= 2:
            r, name, spatial = min(rank, *w.shape[:2]), key.removesuffix(".weight"), (1,) * (w.dim() - 2)
            out[f"{name}.up"] = (torch.randn(w.shape[0], r, *spatial, generator=gen) * 0.1).half()
            out[f"{name}.down"] = (torch.randn(r, *w.shape[1:], generator=gen) * 0.1).half()
        else:
            out[key] = w + 0.05 * torch.randn(w.shape, generator=gen)
    for key, value in model.control_model.state_dict().items():
        if key.startswith(NEW):
            out[key] = (torch.randn(value.shape, generator=gen) * 0.05).half()
    out["lora_controlnet"] = torch.tensor([])
    return out


def comfy_controlnet(file: dict[str, torch.Tensor], unet: dict[str, torch.Tensor]):
    """What ComfyUI's ControlLora builds: the UNet's tensors, the file's whole tensors, W + up @ down."""
    weights = {k: v.float() for k, v in unet.items()}
    weights |= {k: v.float() for k, v in file.items() if k != "lora_controlnet" and not k.endswith((".up", ".down"))}
    for key in [k for k in file if k.endswith(".up")]:
        name = key.removesuffix(".up")
        w = weights[f"{name}.weight"]
        weights[f"{name}.weight"] = w + (file[key].float().flatten(1) @ file[f"{name}.down"].float().flatten(1)
                                         ).reshape(w.shape)
    net = instantiate_from_config(OmegaConf.load(TINY_XL).model.params.control_stage_config)
    net.load_state_dict({k: weights[k] for k in net.state_dict()}, strict=True)
    return net.eval()


def control_inputs(model, seed: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cond = model.text_conditioning(["a red circle", "a blue square"], (64, 64), original_size=(96, 80))
    return dict(x=torch.randn(2, 4, 8, 8, generator=gen), hint=torch.rand(2, 3, 64, 64, generator=gen),
                timesteps=torch.tensor([20, 800]), context=cond["c_crossattn"][0], y=cond["c_adm"])


def assert_same_residuals(net_a, net_b, inputs, atol: float = 1e-5) -> None:
    with torch.no_grad():
        a, b = net_a(**inputs), net_b(**inputs)
    assert len(a) == len(b) == 10
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert ra.abs().max() > 1e-3, f"residual {i} is zero: the test would prove nothing"
        assert (ra - rb).abs().max().item() <= atol, f"residual {i} differs by {(ra - rb).abs().max().item()}"


def test_a_stability_layout_file_loads_with_its_ranks_and_computes_what_comfyui_computes():
    model = lora_model()
    unet_before = {k: v.clone() for k, v in unet_encoder(model).items()}
    file = stability_file(model)
    assert tuple(file["input_blocks.0.0.down"].shape) == (4, 4, 3, 3) and "label_emb.0.0.up" in file
    report = model.load_control(file)
    assert report.ok, report
    layers = dict(model.control_model.lora_layers())
    assert layers["input_blocks.0.0"].rank == 4 and layers["label_emb.0.0"].rank == 6
    assert all(torch.equal(v, unet_before[k]) for k, v in unet_encoder(model).items())  # the UNet is untouched
    inputs = control_inputs(model)
    assert_same_residuals(model.control_model, comfy_controlnet(file, unet_before), inputs)
    again = lora_model()
    assert again.load_control(model.control_state_dict()).ok
    assert_same_residuals(again.control_model, model.control_model, inputs, atol=0)


def test_init_is_a_no_op_and_gradients_reach_only_the_modes_tensors():
    model = lora_model()
    inputs = control_inputs(model)
    x, t = inputs["x"], inputs["timesteps"]
    cond = {"c_crossattn": [inputs["context"]], "c_adm": inputs["y"], "c_concat": [inputs["hint"]]}
    with torch.no_grad():
        plain = model.model.diffusion_model(x, t, context=inputs["context"], y=inputs["y"])
        assert torch.equal(model.apply_model(x, t, cond), plain)
    net = model.control_model
    trainable = {f"control_model.{n}" for n in net.trainable_names()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert {"control_model.label_emb.0.0.up", "control_model.label_emb.0.2.down"} <= trainable
    unet_label_emb = model.model.diffusion_model.label_emb
    assert isinstance(net, LoRAControlNet) and net.label_emb[0][0].weight is unet_label_emb[0][0].weight
    model.train()
    gen = torch.Generator().manual_seed(1)
    batch = {"jpg": torch.rand(2, 64, 64, 3, generator=gen) * 2 - 1, "hint": torch.rand(2, 64, 64, 3, generator=gen),
             "txt": ["a red circle", "a blue circle"]}
    with torch.no_grad():
        for name in net.trainable_names():  # a trained state: the offsets' up layers away from zero
            net.get_parameter(name).add_(torch.randn(net.get_parameter(name).shape, generator=gen) * 0.02)
    loss, _ = model.shared_step(batch)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= trainable and "control_model.label_emb.0.0.down" in with_grad


def test_trains_on_sdxl_saves_the_layout_and_fuses(tmp_path):
    from tutorial_train import main
    model = lora_model()
    base = save_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")},
                           tmp_path / "sdxl_base.safetensors")
    data = make_fill50k(tmp_path / "fill50k", n=4, size=64, seed=0)
    out = tmp_path / "run"
    common = ["--config", str(TINY_XL_LORA), "--data_root", str(data), "--batch_size", "2", "--seed", "0",
              "--logger_freq", "1000", "--learning_rate", "1e-3", "--accelerator", "cpu", "--devices", "1",
              "--output_dir", str(out)]
    main([*common, "--resume_path", str(base), "--max_steps", "2", "--checkpoint_every", "2"])
    export = load_state_dict(out / "control_model.safetensors")
    expected = set(stability_file(model, rank=8))  # the same keys as Stability's tool would write at rank 8
    assert set(export) == expected
    resumed = main([*common, "--max_steps", "3", "--resume", str(out / "checkpoints" / "last.ckpt"), "--force"])
    assert resumed.global_step == 3
    trained = resumed.lightning_module  # whose control file the resumed run exported again

    fused = tmp_path / "fused.safetensors"
    tool_fuse_control_lora.main([str(out / "control_model.safetensors"), str(fused), "--base", str(base),
                                 "--config", str(TINY_XL_LORA)])
    plain = create_model(TINY_XL)
    assert load_checkpoint(plain, base, prefixes=("model.", "conditioner.", "first_stage_model.")).ok
    assert load_checkpoint(plain, fused, prefixes=("control_model.",)).ok
    inputs = control_inputs(trained)
    assert_same_residuals(trained.control_model.eval(), plain.control_model.eval(), inputs)

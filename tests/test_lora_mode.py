"""LoRA-offset mode (ControlLoRA v2): counts, exact identity at init, shared storage, what trains, the file
layouts (ours = Stability's control-lora as ComfyUI applies it; ControlLoRA v2's diffusers names), fusing,
training."""

import csv
import os

import pytest
import torch
from omegaconf import OmegaConf
from test_control import make_batch
from torch.utils.data import DataLoader

import tool_fuse_control_lora
from cldm.control import ControlUnit
from cldm.diffusers_convert import build_mapping
from cldm.loader import load_control_network
from cldm.lora import LoRAControlNet, LoRAConv2d, LoRALinear
from cldm.model import CONTROL_PREFIX, create_model, load_checkpoint, load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained, sd_checkpoint
from ldm.checkpoint import BASE_PREFIXES
from ldm.util import instantiate_from_config
from tool_make_fill50k import make_fill50k
from tutorial_dataset import MyDataset

TINY = ROOT / "models" / "cldm_tiny.yaml"
TINY_LORA = ROOT / "models" / "cldm_tiny_lora.yaml"



def lora_model(seed: int = 0):
    """The tiny LoRA-mode model on a UNet with no zero-initialised layers (as a trained one)."""
    model = model_as_trained(TINY_LORA, seed)
    return model


def randomize_trainable(model, std: float = 0.05, seed: int = 4) -> None:
    """Random non-zero values for every trainable tensor: offsets, hint block, zero convs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def unet_encoder(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.model.diffusion_model.state_dict().items()
            if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}


def plain_controlnet(weights: dict[str, torch.Tensor]):
    """cldm_tiny.yaml's ordinary ControlNet with the given weights (every key required)."""
    net = instantiate_from_config(OmegaConf.load(TINY).model.params.control_stage_config)
    net.load_state_dict({k: weights[k] for k in net.state_dict()}, strict=True)
    return net.eval()


def comfy_controlnet(file: dict[str, torch.Tensor], unet: dict[str, torch.Tensor]):
    """The ControlNet ComfyUI builds from a control-lora file (comfy/controlnet.py ControlLora): the UNet's
    tensors, then the file's full tensors, and W + up.flatten(1) @ down.flatten(1) where a pair is given."""
    weights = {k: v.float() for k, v in unet.items()}
    weights |= {k: v.float() for k, v in file.items()
                if k != "lora_controlnet" and not k.endswith((".up", ".down"))}
    for key in [k for k in file if k.endswith(".up")]:
        name = key[:-len(".up")]
        w = weights[f"{name}.weight"]
        offset = file[key].float().flatten(1) @ file[f"{name}.down"].float().flatten(1)
        weights[f"{name}.weight"] = w + offset.reshape(w.shape)
    return plain_controlnet(weights)


def control_inputs(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, 4, 4, generator=gen), hint=torch.rand(2, 3, 32, 32, generator=gen),
                timesteps=torch.tensor([20, 800]), context=torch.randn(2, 7, 32, generator=gen))


def assert_same_state(a, b) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())


def eps_pair(model, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps with the model's control, eps of the bare UNet) on random latents, text features and hint."""
    gen = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 7, 32, generator=gen)
    hint, t = torch.rand(2, 3, 32, 32, generator=gen), torch.tensor([30, 600])
    with torch.no_grad():
        return (model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]}),
                model.model.diffusion_model(x, t, context=context))


def assert_same_residuals(net_a, net_b, atol: float = 1e-5) -> None:
    inputs = control_inputs()
    with torch.no_grad():
        a, b = net_a(**inputs), net_b(**inputs)
    assert len(a) == len(b) == 5
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert ra.abs().max() > 1e-3, f"residual {i} is zero: the test would prove nothing"
        assert (ra - rb).abs().max().item() <= atol, f"residual {i} differs by {(ra - rb).abs().max().item()}"


def test_sd15_trainable_count_and_layers_on_meta():
    model = create_model(ROOT / "models" / "cldm_v15_lora.yaml", device="meta")
    assert sum(p.numel() for p in model.trainable_parameters()) == 26_346_256
    layers = dict(model.control_model.lora_layers())
    assert len(layers) == 122
    assert sum(isinstance(m, LoRALinear) for m in layers.values()) == 82
    for suffix in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_out.0",
                   "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "emb_layers.1", "skip_connection",
                   "op", "in_layers.2"):
        assert any(name.endswith(suffix) for name in layers), suffix
    assert "input_blocks.0.0" in layers and "time_embed.2" in layers
    op = layers["input_blocks.3.0.op"]
    assert op.down.shape == (32, 320, 3, 3) and op.up.shape == (320, 32, 1, 1) and op.stride == (2, 2)
    q = layers["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    assert q.down.shape == (32, 768) and q.up.shape == (320, 32)
    # The file holds exactly the trainable tensors, the copy's 1-d tensors (norms, biases) as Stability's
    # files do, and ComfyUI's marker.
    file = model.control_state_dict()
    trainable = {f"control_model.{n}" for n in model.control_model.trainable_names()}
    one_d = {f"control_model.{n}" for n in model.control_model.shared_names if n in file}
    assert "control_model.input_blocks.11.0.in_layers.0.weight" in one_d  # sd-webui-controlnet's SD1.x marker
    assert {f"control_model.{k}" for k in file} - trainable == {"control_model.lora_controlnet"} | one_d
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("cls,base,x", [
    (LoRALinear, torch.nn.Linear(12, 10), torch.randn(3, 5, 12)),
    (LoRAConv2d, torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
])
def test_layer_is_weight_plus_scaled_up_down(cls, base, x):
    layer = cls(base, rank=4, alpha=2.0)
    assert torch.equal(layer(x), base(x))  # up starts at zero
    assert layer.down.std().item() == pytest.approx(1 / 4, rel=0.5)
    with torch.no_grad():
        layer.up.normal_()
    w = base.weight + 0.5 * (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(base.weight.shape)
    expected = (torch.nn.functional.linear(x, w, base.bias) if cls is LoRALinear
                else torch.nn.functional.conv2d(x, w, base.bias, stride=2, padding=1))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.fused_weight(), w, rtol=0, atol=1e-6)


def test_init_leaves_the_unet_output_exactly_unchanged():
    controlled, plain = eps_pair(lora_model())
    assert torch.equal(controlled, plain)


def test_copy_shares_the_unets_storage():
    model = lora_model()
    unet, net = model.model.diffusion_model, model.control_model
    assert net.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight is \
        unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight

    def storages(params):
        return {p.untyped_storage().data_ptr() for p in params}

    everything = [p for _, p in model.named_parameters(remove_duplicate=False)]
    base = [p for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith("control_model.")]
    trainable = model.trainable_parameters()
    assert len(storages(everything)) == len(storages(base)) + len(trainable)
    assert storages(everything) == storages(base) | storages(trainable)
    # Checkpoints hold the UNet once: the control model saves only its trainable tensors.
    saved = {k for k in model.state_dict() if k.startswith("control_model.")}
    assert saved == {f"control_model.{n}" for n in net.trainable_names()}


def test_gradients_reach_only_the_modes_tensors():
    model = lora_model()
    randomize_trainable(model)
    model.train()
    loss, _ = model.shared_step(make_batch())
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {f"control_model.{n}" for n in model.control_model.trainable_names()}
    assert with_grad == trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    in_optimizer = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert in_optimizer == {id(model.get_parameter(n)) for n in trainable}


def test_control_file_round_trip_is_exact_and_comfyui_reads_it_the_same(tmp_path):
    model = lora_model()
    randomize_trainable(model)
    path = save_state_dict(model.control_state_dict(), tmp_path / "control_lora.safetensors")
    file = load_state_dict(path)
    assert "lora_controlnet" in file and "input_blocks.1.1.proj_in.up" in file
    assert "zero_convs.0.0.weight" in file and "input_hint_block.14.bias" in file
    # no copy weight in full, only offsets and the copy's norms and biases
    assert not any(k.startswith("control_model.") or k.startswith("input_blocks.") and k.endswith(".weight")
                   and file[k].dim() > 1 for k in file)

    other = lora_model()
    report = other.load_control(path)
    assert report.ok, report
    assert_same_state(other, model)
    # A Lightning checkpoint's state dict (UNet once, control model's own tensors) loads strictly and exactly.
    randomize_trainable(model, seed=9)
    other.load_state_dict(model.state_dict(), strict=True)
    assert_same_state(other, model)
    assert torch.equal(eps_pair(model)[0], eps_pair(other)[0])

    randomize_trainable(model)
    assert_same_residuals(model.control_model, comfy_controlnet(file, unet_encoder(model)))


def stability_file(model, rank: int = 4) -> dict[str, torch.Tensor]:
    """A control-lora file as Stability's/ComfyUI's ControlLoraSave writes it for a trained ControlNet: every
    >= 2-d copy weight as `.up`/`.down` in fp16, every 1-d copy tensor (norms, biases) in full, the rest
    (hint block, zero convs) in fp16, and the marker."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for key, w in unet_encoder(model).items():
        if w.dim() >= 2:
            name, spatial = key[:-len(".weight")], (1,) * (w.dim() - 2)
            out[f"{name}.up"] = (torch.randn(w.shape[0], rank, *spatial, generator=gen) * 0.1).half()
            out[f"{name}.down"] = (torch.randn(rank, *w.shape[1:], generator=gen) * 0.1).half()
        else:
            out[key] = w + 0.05 * torch.randn(w.shape, generator=gen)
    for key, value in model.control_model.state_dict().items():
        if key.startswith(("input_hint_block", "zero_convs", "middle_block_out")):
            out[key] = (torch.randn(value.shape, generator=gen) * 0.05).half()
    out["lora_controlnet"] = torch.tensor([])
    return out


def test_stability_layout_file_loads_with_its_ranks_norms_and_biases():
    model = lora_model()
    unet_before = {k: v.clone() for k, v in unet_encoder(model).items()}
    file = stability_file(model)
    report = model.load_control(file)
    assert report.ok, report
    assert {layer.rank for _, layer in model.control_model.lora_layers()} == {4}
    # Trained norms and biases become the copy's own tensors; the UNet keeps its own.
    assert len(model.control_model.overrides) == sum(v.dim() == 1 for v in unet_before.values())
    assert all(torch.equal(v, unet_before[k]) for k, v in unet_encoder(model).items())
    assert_same_residuals(model.control_model, comfy_controlnet(file, unet_before))
    # Saved again, the overrides go with the file, and it loads back exactly.
    again = lora_model()
    assert again.load_control(model.control_state_dict()).ok
    assert_same_residuals(again.control_model, model.control_model, atol=0)


def controllora_v2_file(model, rank: int = 4, conv_offsets: bool = True
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ControlLoRA v2 file (diffusers names, offsets as `<module>.lora_layer.{down,up}.weight`) and the same
    tensors in ldm names. Renamed by tool_convert_diffusers' mapping, which is tested against diffusers."""
    gen = torch.Generator().manual_seed(8)
    ldm = {}
    for name, layer in model.control_model.lora_layers():
        if isinstance(layer, LoRAConv2d) and not conv_offsets:
            continue
        w, spatial = layer.weight, (1,) * (layer.weight.dim() - 2)
        ldm[f"{name}.down"] = torch.randn(rank, *w.shape[1:], generator=gen) * 0.1
        ldm[f"{name}.up"] = torch.randn(w.shape[0], rank, *spatial, generator=gen) * 0.1
    for key, value in model.control_model.state_dict().items():
        if key.startswith(("input_hint_block", "zero_convs", "middle_block_out")):
            ldm[key] = torch.randn(value.shape, generator=gen) * 0.05
    names = build_mapping(TINY).keys
    diffusers = {}
    for key, value in ldm.items():
        module, _, part = key.rpartition(".")
        if part in ("down", "up"):
            key = names[f"{module}.weight"].replace(".weight", f".lora_layer.{part}.weight")
        else:
            key = names[key]
        diffusers[key] = value
    return diffusers, ldm


@pytest.mark.parametrize("conv_offsets", [True, False])
def test_controllora_v2_diffusers_named_file_loads(conv_offsets):
    model = lora_model()
    file, as_ldm = controllora_v2_file(model, conv_offsets=conv_offsets)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_layer.down.weight" in file
    report = model.load_control(file)
    assert report.ok, report
    ranks = {type(layer): layer.rank for _, layer in model.control_model.lora_layers()}
    assert ranks == {LoRALinear: 4, LoRAConv2d: 4 if conv_offsets else 0}
    assert_same_residuals(model.control_model, comfy_controlnet(as_ldm, unet_encoder(model)))


def test_fused_export_is_a_plain_controlnet_with_the_same_eps(tmp_path):
    model = lora_model()
    randomize_trainable(model)
    base = save_state_dict(sd_checkpoint(model), tmp_path / "sd.ckpt")
    lora = save_state_dict(model.control_state_dict(), tmp_path / "control_lora.safetensors")
    fused = tmp_path / "fused.safetensors"
    tool_fuse_control_lora.main([str(lora), str(fused), "--base", str(base), "--config", str(TINY_LORA)])
    with pytest.raises(FileExistsError, match="--force"):
        tool_fuse_control_lora.main([str(lora), str(fused), "--base", str(base), "--config", str(TINY_LORA)])

    plain = create_model(TINY)
    assert load_checkpoint(plain, base, prefixes=BASE_PREFIXES).ok
    assert load_checkpoint(plain, fused, prefixes=(CONTROL_PREFIX,)).ok
    ours, _ = eps_pair(model)
    theirs, unchanged = eps_pair(plain)
    assert (ours - unchanged).abs().max() > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_lora_controlnet_as_another_control_unit(tmp_path):
    model = lora_model()
    randomize_trainable(model)
    path = save_state_dict(model.control_state_dict(), tmp_path / "control_lora.safetensors")
    unet = model.model.diffusion_model
    net = load_control_network(path, model, TINY_LORA)
    assert isinstance(net, LoRAControlNet) and net.middle_block[0].in_layers[2].weight is \
        unet.middle_block[0].in_layers[2].weight
    gen = torch.Generator().manual_seed(6)
    x, t, hint = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([30, 600]), torch.rand(2, 3, 32, 32)
    text = [torch.randn(2, 7, 32, generator=gen)]
    with torch.no_grad():
        main = model.apply_model(x, t, {"c_crossattn": text, "c_concat": [hint]})
        unit = model.apply_model(x, t, {"c_crossattn": text, "control": [ControlUnit(net, hint)]})
        both = model.apply_model(x, t, {"c_crossattn": text, "c_concat": [hint],
                                        "control": [ControlUnit(net, hint, strength=0.5)]})
        model.control_scales = [1.5] * 5
        stronger = model.apply_model(x, t, {"c_crossattn": text, "c_concat": [hint]})
    assert torch.equal(main, unit)
    torch.testing.assert_close(both, stronger, rtol=0, atol=1e-5)


def held_out_loss(model, batch: dict) -> float:
    """The training loss on fixed latents, timesteps and noise: comparable before and after training."""
    model.eval()
    torch.manual_seed(11)
    with torch.no_grad():
        x, c = model.get_input(batch, model.first_stage_key)
        t = torch.linspace(50, 950, len(x)).long()
        return model.p_losses(x, c, t, noise=torch.randn_like(x))[0].item()


def test_tutorial_train_trains_lora_mode_from_a_plain_sd_checkpoint(tmp_path):
    from tutorial_train import main
    model = lora_model()
    initial = save_state_dict(sd_checkpoint(model), tmp_path / "sd.ckpt")
    data = make_fill50k(tmp_path / "fill50k", n=8, size=32, seed=0)
    out = tmp_path / "run"
    trainer = main(["--config", str(TINY_LORA), "--resume_path", str(initial), "--data_root", str(data),
                    "--batch_size", "4", "--max_steps", "30", "--learning_rate", "5e-3", "--seed", "0",
                    "--log_every_n_steps", "1", "--logger_freq", "1000", "--checkpoint_every", "1000",
                    "--accelerator", "cpu", "--devices", "1", "--output_dir", str(out)])
    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        curve = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert len(curve) == 30
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10
    batch = next(iter(DataLoader(MyDataset(data), batch_size=8)))
    before, after = held_out_loss(model, batch), held_out_loss(trainer.lightning_module, batch)
    assert after < 0.9 * before

    trained = trainer.lightning_module
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trained.parameters() if p.requires_grad}
    net = trained.control_model
    assert in_optimizer == {id(net.get_parameter(n)) for n in net.trainable_names()}
    export = load_state_dict(out / "control_model.safetensors")
    assert set(export) == set(trained.control_state_dict())
    fresh = lora_model(seed=1)
    fresh.load_state_dict(load_state_dict(out / "checkpoints" / "last.ckpt"), strict=True)
    assert_same_state(fresh, trained)

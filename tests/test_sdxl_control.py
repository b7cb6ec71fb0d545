"""ControlNet-XL on the tiny SDXL config: the same y reaches UNet and ControlNet, step-0 identity, what trains,
control units, and a tutorial_train run with checkpoint and resume."""

import numpy as np
import pytest
import torch

from cldm.control import ControlUnit
from cldm.model import create_model, load_checkpoint, load_state_dict
from cldm.pipeline import sample
from conftest import ROOT, model_as_trained, randomize_zero_convs
from tool_make_fill50k import make_fill50k

TINY_XL = ROOT / "models" / "cldm_tiny_xl.yaml"


def make_batch(n: int = 2, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"jpg": torch.rand(n, size, size, 3, generator=g) * 2 - 1, "hint": torch.rand(n, size, size, 3, generator=g),
            "txt": ["red circle with blue background", "green circle with white background"][:n]}


@pytest.fixture
def tiny_xl():
    """The tiny SDXL ControlLDM as tool_add_control makes it: a UNet with all weights non-zero (as trained) and
    the ControlNet's copy of its encoder, zero convs at zero."""
    model = model_as_trained(TINY_XL)
    copy = model.control_model.load_state_dict(model.model.diffusion_model.state_dict(), strict=False)
    assert not copy.unexpected_keys or all(k.startswith(("output_blocks.", "out.")) for k in copy.unexpected_keys)
    return model


def noisy(model, batch, seed=3):
    x, cond = model.get_input(batch, model.first_stage_key)
    torch.manual_seed(seed)
    return torch.randn_like(x), torch.tensor([10, 500]), cond


def test_get_input_gives_the_vector_and_the_size_conditioning(tiny_xl):
    batch = make_batch()
    _, cond = tiny_xl.get_input(batch, "jpg")
    assert set(cond) == {"c_crossattn", "c_adm", "c_concat"}
    assert cond["c_crossattn"][0].shape == (2, 77, 64) and cond["c_adm"].shape == (2, 64)
    # no size keys in the batch: original = target = the image's (h, w), crop (0, 0), as text_conditioning gives
    expected = tiny_xl.text_conditioning(batch["txt"], (64, 64))
    torch.testing.assert_close(cond["c_adm"], expected["c_adm"])
    torch.testing.assert_close(cond["c_crossattn"][0], expected["c_crossattn"][0])
    # size keys a data set provides are used
    sized = {**batch, "original_size_as_tuple": torch.tensor([[512.0, 384.0]] * 2),
             "crop_coords_top_left": torch.tensor([[16.0, 0.0]] * 2)}
    _, cond_sized = tiny_xl.get_input(sized, "jpg")
    expected = tiny_xl.text_conditioning(batch["txt"], (64, 64), original_size=(512, 384), crop=(16, 0))
    torch.testing.assert_close(cond_sized["c_adm"], expected["c_adm"])
    assert not torch.allclose(cond_sized["c_adm"], cond["c_adm"])
    # dropped prompts ("") are zeros under zero_empty_prompt, text part of the vector included
    _, dropped = tiny_xl.get_input({**batch, "txt": ["", batch["txt"][1]]}, "jpg")
    assert not dropped["c_crossattn"][0][0].any() and not dropped["c_adm"][0, :16].any()
    assert dropped["c_adm"][0, 16:].any() and dropped["c_crossattn"][0][1].any()


def test_fresh_controlnet_xl_is_exact_identity_and_y_reaches_both_nets(tiny_xl):
    x, t, cond = noisy(tiny_xl, make_batch())
    unet = tiny_xl.model.diffusion_model
    with torch.no_grad():
        plain = unet(x, t, context=cond["c_crossattn"][0], y=cond["c_adm"])
        assert torch.equal(tiny_xl.apply_model(x, t, cond), plain)
        randomize_zero_convs(tiny_xl)
        controlled = tiny_xl.apply_model(x, t, cond)
        residuals = tiny_xl.control_model(x=x, hint=cond["c_concat"][0], timesteps=t,
                                          context=cond["c_crossattn"][0], y=cond["c_adm"])
        assert torch.equal(controlled, unet(x, t, context=cond["c_crossattn"][0], y=cond["c_adm"],
                                            control=residuals))
        assert (controlled - plain).abs().max() > 1e-3
        # the vector changes the ControlNet's residuals, not only the UNet's eps
        other = tiny_xl.control_model(x=x, hint=cond["c_concat"][0], timesteps=t,
                                      context=cond["c_crossattn"][0], y=cond["c_adm"] + 1)
        assert not torch.allclose(other[-1], residuals[-1])


def test_control_units_strength_and_guess_mode_on_sdxl(tiny_xl):
    randomize_zero_convs(tiny_xl)
    x, t, cond = noisy(tiny_xl, make_batch())
    hint = cond.pop("c_concat")[0]
    with torch.no_grad():
        plain = tiny_xl.apply_model(x, t, cond)
        full = tiny_xl.apply_model(x, t, {**cond, "control": [ControlUnit(tiny_xl.control_model, hint)]})
        off = tiny_xl.apply_model(x, t, {**cond, "control": [ControlUnit(tiny_xl.control_model, hint, 0.0)]})
        soft = tiny_xl.apply_model(x, t, {**cond, "control": [ControlUnit(tiny_xl.control_model, hint,
                                                                           mode="control")]})
    assert torch.equal(off, plain) and (full - plain).abs().max() > 1e-3
    assert (soft - full).abs().max() > 1e-5  # 10 residuals weighted by soft_weights(10)


@pytest.mark.parametrize("sd_locked", [True, False])
def test_gradients_reach_only_the_trainable_set(tiny_xl, sd_locked):
    randomize_zero_convs(tiny_xl)
    tiny_xl.sd_locked = sd_locked
    loss, _ = tiny_xl.shared_step(make_batch())
    loss.backward()
    with_grad = {n for n, p in tiny_xl.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in tiny_xl.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    assert any(n.startswith("control_model.label_emb.") for n in with_grad)
    assert all(n.startswith("control_model.") for n in trainable) == sd_locked
    assert not any(n.startswith(("conditioner.", "first_stage_model.", "model.diffusion_model.input_blocks",
                                 "model.diffusion_model.label_emb")) for n in trainable)


def test_tutorial_train_checkpoint_and_resume_on_tiny_sdxl(tmp_path):
    from tutorial_train import main
    data = make_fill50k(tmp_path / "fill50k", n=4, size=64, seed=0)
    out = tmp_path / "run"
    common = ["--config", str(TINY_XL), "--data_root", str(data), "--batch_size", "2",
              "--output_dir", str(out), "--sample_steps", "2", "--accelerator", "cpu", "--devices", "1",
              "--drop_prompt_rate", "0.5", "--seed", "0",
              "--sd_locked", "False"]  # a random UNet's zero output layer must train, or no gradient flows
    trainer = main([*common, "--resume_path", "none", "--max_steps", "2", "--logger_freq", "2",
                    "--checkpoint_every", "2"])
    assert trainer.global_step == 2
    logged = {p.name.split("_gs-")[0] for p in (out / "image_log" / "train").iterdir()}
    assert {"reconstruction", "control", "samples_cfg_scale_9.00"} <= logged
    last = out / "checkpoints" / "last.ckpt"
    saved = load_state_dict(last)
    assert "betas" not in saved  # the sgm layout: the schedule comes from the config
    resumed = main([*common, "--max_steps", "3", "--resume", str(last), "--force", "--logger_freq", "100"])
    assert resumed.global_step == 3
    fresh = create_model(TINY_XL)
    assert load_checkpoint(fresh, out / "control_model.safetensors", prefixes=("control_model.",)).ok


def test_cached_latents_and_text_give_the_online_loss(tiny_xl, tmp_path, monkeypatch):
    from torch.utils.data import default_collate

    import tool_cache_latents
    from cldm.data.latent_cache import CachedDataset, cache_latents
    from tutorial_dataset import MyDataset
    randomize_zero_convs(tiny_xl)
    data = make_fill50k(tmp_path / "fill50k", n=4, size=64, seed=0)
    cache = cache_latents(tiny_xl, MyDataset(data), tmp_path / "cache", batch_size=3)
    # the command line too (it moves the SDXL conditioner, not a cond_stage_model, to the device)
    tool_cache_latents.main(["--config", str(TINY_XL), "--ckpt", "none", "--data_root", str(data),
                             "--out", str(tmp_path / "cli_cache")])
    assert (tmp_path / "cli_cache" / "txt_pooled.npy").is_file()
    online = default_collate([MyDataset(data)[i] for i in range(4)])
    cached = default_collate([CachedDataset(cache)[i] for i in range(4)])
    assert cached["txt_emb"].shape == (4, 77, 64) and cached["txt_pooled"].shape == (4, 16)
    assert torch.equal(cached["target_size_as_tuple"], torch.tensor([[64.0, 64.0]] * 4))
    assert not cached["txt_emb_empty"].any() and not cached["txt_pooled_empty"].any()  # "" is zeros
    tiny_xl.train()
    for rate in (0.0, 0.5):
        tiny_xl.drop_prompt_rate = rate
        torch.manual_seed(1)
        loss_online, _ = tiny_xl.shared_step(online)
        torch.manual_seed(1)
        loss_cached, _ = tiny_xl.shared_step(cached)
        assert (loss_online - loss_cached).abs().item() <= 1e-5, rate

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran on a cached batch")

    monkeypatch.setattr(tiny_xl, "encode_first_stage", refuse)
    monkeypatch.setattr(tiny_xl.conditioner, "encode_text", refuse)
    assert torch.isfinite(tiny_xl.shared_step(cached)[0])


def test_the_readers_size_conditioning_reaches_the_vector(tiny_xl):
    """A resized and cropped training image conditions SDXL on its stored size and its crop, as kohya's SDXL
    training does: the readers' Resize.frame records them under sgm's batch keys."""
    from torch.utils.data import default_collate

    from cldm.data.images import Resize, to_item
    g = torch.Generator().manual_seed(0)
    stored = (torch.rand(96, 80, 3, generator=g) * 255).byte().numpy()  # h 96, w 80
    target, hint, sizes = Resize(64, "random_crop").frame(stored, stored.copy(), np.random.default_rng(3))
    assert target.shape[:2] == (64, 64) and (target == hint).all()
    crop = tuple(int(v) for v in sizes["crop_coords_top_left"])
    assert tuple(sizes["original_size_as_tuple"]) == (96, 80) and crop[1] == 0 and 0 <= crop[0] <= 13
    batch = default_collate([to_item(target, hint, "a red circle", sizes)] * 2)
    _, cond = tiny_xl.get_input(batch, "jpg")
    expected = tiny_xl.text_conditioning(["a red circle"] * 2, (64, 64), original_size=(96, 80), crop=crop)
    torch.testing.assert_close(cond["c_adm"], expected["c_adm"])


def test_log_images_samples_with_the_size_conditioning_the_batch_records(tiny_xl):
    randomize_zero_convs(tiny_xl)
    model = tiny_xl.eval()
    sizes = {"original_size_as_tuple": torch.tensor([[512.0, 384.0], [96.0, 128.0]]),
             "crop_coords_top_left": torch.tensor([[16.0, 0.0], [0.0, 8.0]])}
    batch = {**make_batch(), **sizes}
    logged = model.log_images(batch, N=2, ddim_steps=2, unconditional_guidance_scale=3.0, seed=5)
    guided = logged["samples_cfg_scale_3.00"]
    hint = batch["hint"].permute(0, 3, 1, 2)
    expected = sample(model, batch["txt"], units=[model.unit(hint)], steps=2, cfg_scale=3.0, seed=5,
                      original_size=sizes["original_size_as_tuple"],
                      crops_coords_top_left=sizes["crop_coords_top_left"])
    torch.testing.assert_close(guided, expected.tensors)
    default = sample(model, batch["txt"], units=[model.unit(hint)], steps=2, cfg_scale=3.0, seed=5)
    assert (default.tensors - guided).abs().max() > 1e-4  # the recorded sizes changed the samples

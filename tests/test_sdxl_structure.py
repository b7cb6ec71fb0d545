"""SDXL configs build models whose state dicts match the reference key lists of the published files."""

import pytest
import torch

from cldm.model import create_model
from conftest import ROOT, reference_keys
from ldm.checkpoint import OPTIONAL_KEY_SUFFIXES
from ldm.modules.diffusionmodules.openaimodel import UNetModel

XL = ROOT / "models" / "cldm_xl.yaml"


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def xl():
    return create_model(XL, device="meta")


def test_base_keys_equal_sd_xl_base_layout(xl):
    """Every key of sd_xl_base_1.0.safetensors, with its shape; only the two optional ones may be absent."""
    ref = reference_keys("sdxl/sd_xl_base.keys.tsv")
    ours = {k: v for k, v in shapes(xl).items() if not k.startswith("control_model.")}
    assert ours == {k: v for k, v in ref.items() if not k.endswith(OPTIONAL_KEY_SUFFIXES)}
    assert len(ref) == 2516 and len(ours) == 2514


def test_controlnet_keys_equal_controlnet_xl_layout(xl):
    ref = reference_keys("sdxl/controlnet_xl.keys.tsv")
    assert {f"control_model.{k}": v for k, v in shapes(xl.control_model).items()} == ref
    assert len(ref) == 844


def test_parameter_counts_equal_the_reference(xl):
    clip_l, big_g = xl.conditioner.embedders[:2]
    assert numel(xl.model.diffusion_model) == 2_567_463_684
    assert numel(clip_l) == 123_060_480
    assert numel(big_g) == 694_659_841  # logit_scale included
    assert numel(xl.first_stage_model) == 83_653_863
    assert numel(xl.control_model) == 1_251_014_160
    # the whole base: 3,468,838,945 elements with the 77 position ids and the 1000 sigmas a file may carry
    assert numel(xl) - numel(xl.control_model) + 77 + 1000 == 3_468_838_945


def test_the_schedule_is_not_in_sgm_layout_checkpoints(xl):
    """sgm files have no ldm schedule buffers: ours follow from the config and are not saved for SDXL."""
    sd = xl.state_dict()
    assert "betas" not in sd and "alphas_cumprod" not in sd and "logvar" not in sd
    assert xl.alphas_cumprod.shape == (1000,)
    sd15 = create_model(ROOT / "models" / "cldm_tiny.yaml", device="meta").state_dict()
    assert "betas" in sd15 and "logvar" in sd15  # the SD1.x layout keeps them, as the original's files do


def test_sdxl_unet_layout(xl):
    unet = xl.model.diffusion_model
    assert len(unet.input_blocks) == 9 and len(unet.output_blocks) == 9
    depth = {i: len(b[1].transformer_blocks) for i, b in enumerate(unet.input_blocks) if len(b) > 1}
    assert depth == {4: 2, 5: 2, 7: 10, 8: 10}
    assert len(unet.middle_block[1].transformer_blocks) == 10
    attn = unet.input_blocks[7][1].transformer_blocks[0].attn1
    assert attn.heads == 20 and attn.to_q.weight.shape == (1280, 1280)  # 64-wide heads
    assert isinstance(unet.input_blocks[4][1].proj_in, torch.nn.Linear)


def tiny_unet(**overrides) -> UNetModel:
    spec = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                context_dim=16, legacy=False)
    return UNetModel(**{**spec, **overrides})


def test_num_heads_upsample_leaves_spatial_transformers_alone():
    """As in the original, num_heads_upsample only concerns the old AttentionBlock: a checkpoint computes the
    same eps whether or not its config sets it."""
    torch.manual_seed(0)
    plain = tiny_unet()
    upsample = tiny_unet(num_heads_upsample=4)
    heads = [m.heads for m in upsample.output_blocks.modules() if hasattr(m, "to_q")]
    assert heads and set(heads) == {2}
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.05)
    upsample.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 3, 16)
    with torch.no_grad():
        assert torch.equal(plain(x, t, ctx), upsample(x, t, ctx))


def test_vector_conditioning_adds_label_emb_to_the_time_embedding():
    torch.manual_seed(0)
    unet = tiny_unet(num_classes="sequential", adm_in_channels=12)
    assert [k for k in unet.state_dict() if k.startswith("label_emb")] == [
        "label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"]
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 3, 16)
    y = torch.randn(2, 12)
    with torch.no_grad():
        eps = unet(x, t, ctx, y=y)
        assert not torch.allclose(eps, unet(x, t, ctx, y=y + 1))
        # y enters only through emb = time_embed(t) + label_emb(y): with label_emb(y) = 0, y has no effect
        unet.label_emb[0][2].weight.zero_()
        unet.label_emb[0][2].bias.zero_()
        assert torch.equal(unet(x, t, ctx, y=y), unet(x, t, ctx, y=y + 1))
    with pytest.raises(ValueError, match="needs y"):
        unet(x, t, ctx)
    with pytest.raises(ValueError, match="no vector conditioning"):
        tiny_unet()(x, t, ctx, y=y)
    with pytest.raises(ValueError, match="adm_in_channels"):
        tiny_unet(num_classes="sequential")
    with pytest.raises(ValueError, match="num_classes must be"):
        tiny_unet(num_classes=10, adm_in_channels=12)


def test_conditioner_builds_and_runs_offline_on_meta(xl, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with torch.device("meta"):
        cond = xl.text_conditioning(["a cat", ""], (1024, 1024))
    assert cond["c_crossattn"][0].shape == (2, 77, 2048) and cond["c_adm"].shape == (2, 2816)
    assert cond["c_adm"].device.type == "meta"


def test_conditioner_refuses_what_it_would_ignore():
    from ldm.modules.encoders.conditioner import GeneralConditioner
    size = {"target": "ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND", "params": {"outdim": 8}}
    text = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"width": 32, "layers": 1, "heads": 2}}
    with pytest.raises(ValueError, match="ucg_rate"):
        GeneralConditioner([{**text, "input_key": "txt", "ucg_rate": 0.1}])
    with pytest.raises(ValueError, match="must come before"):
        GeneralConditioner([{**size, "input_key": "target_size_as_tuple"}, {**text, "input_key": "txt"}])
    with pytest.raises(ValueError, match="no embedder reads the text key"):
        GeneralConditioner([{**size, "input_key": "target_size_as_tuple"}])
    conditioner = GeneralConditioner([{**text, "input_key": "txt"}, {**size, "input_key": "target_size_as_tuple"}])
    with pytest.raises(KeyError, match="target_size_as_tuple"):
        conditioner({"txt": ["a cat"]})

"""Text encoders: checkpoint names, offline tokenization, HuggingFace parity and layer options."""

import socket

import pytest
import torch

from conftest import reference_keys
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

BOS, EOT = 49406, 49407
TINY = dict(width=32, layers=3, heads=4)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def reference(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in reference_keys(name).items() if k.startswith(prefix)}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def tiny_clip(**kwargs) -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(**TINY, **kwargs)


def tiny_openclip(**kwargs) -> FrozenOpenCLIPEmbedder:
    torch.manual_seed(0)
    return FrozenOpenCLIPEmbedder(**TINY, embed_dim=16, **kwargs)


def test_clip_matches_reference_keys_on_meta(no_network):
    with torch.device("meta"):
        enc = FrozenCLIPEmbedder()
    ref = reference("cldm_v15.keys.tsv", "cond_stage_model.")
    ref.pop("transformer.text_model.embeddings.position_ids")
    assert shapes(enc) == ref
    assert sum(p.numel() for p in enc.parameters()) == 123_060_480


def test_openclip_matches_reference_keys_on_meta(no_network):
    with torch.device("meta"):
        enc = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert shapes(enc) == reference("cldm_v21.keys.tsv", "cond_stage_model.")
    assert all(p.device.type == "meta" for p in enc.parameters())


def test_meta_forward_follows_parameter_device(no_network):
    # tokens are made on the CPU: a meta output shows they moved to the parameters' device
    with torch.device("meta"):
        clip, openclip = FrozenCLIPEmbedder(), FrozenOpenCLIPEmbedder(layer="penultimate")
    assert clip(["a cat"]).shape == (1, 77, 768) and clip(["a cat"]).device.type == "meta"
    assert openclip(["a cat"]).shape == (1, 77, 1024) and openclip(["a cat"]).device.type == "meta"


def test_clip_loads_huggingface_state_dict_with_or_without_position_ids():
    enc, src = tiny_clip(), tiny_clip()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    sd = src.transformer.state_dict()
    assert "text_model.embeddings.position_ids" not in sd
    result = enc.transformer.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    sd_with_ids = {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    result = enc.transformer.load_state_dict(sd_with_ids, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "text_model.embeddings.position_ids" in sd_with_ids  # the caller's dict is left alone
    # as an SD1.x checkpoint nests it, under a parent module
    parent = torch.nn.Module()
    parent.cond_stage_model = enc
    nested = {f"cond_stage_model.transformer.{k}": v for k, v in sd_with_ids.items()}
    result = parent.load_state_dict(nested, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(enc(["a photo"]), src(["a photo"]))


@pytest.mark.parametrize("layer", ["last", "hidden", "pooled"])
def test_clip_matches_huggingface(layer):
    import transformers
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOT)
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(config).eval()
    sd = hf.state_dict()
    # transformers 5.x names CLIPTextModel's weights without the `text_model.` prefix SD checkpoints use
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
    enc = tiny_clip(layer=layer, layer_idx=-2 if layer == "hidden" else None)
    enc.transformer.load_state_dict(sd, strict=True)

    prompts = ["a photograph of an astronaut riding a horse", "a cat"]
    tokens = enc.tokenize(prompts)
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        ours = enc(prompts)
    expected = {"last": out.last_hidden_state, "hidden": out.hidden_states[-2],
                "pooled": out.pooler_output[:, None]}
    torch.testing.assert_close(ours, expected[layer], atol=1e-5, rtol=1e-5)


def test_tokenization_is_offline_and_pads_like_sd(no_network):
    prompts = ["a cat", "a dog " * 100]
    clip = FrozenCLIPEmbedder(**TINY).tokenize(prompts)
    openclip = FrozenOpenCLIPEmbedder(**TINY).tokenizer(prompts)
    for tokens, pad in ((clip, EOT), (openclip, 0)):
        assert tokens.shape == (2, 77) and tokens.dtype == torch.long
        assert (tokens[:, 0] == BOS).all()
        short, long = tokens
        assert short[3] == EOT and (short[4:] == pad).all()  # <bos> a cat <eot> <pad>...
        assert long[-1] == EOT and not (long[1:-1] == EOT).any() and not (long == 0).any()


def test_clip_padding_keeps_token_zero_inside_prompt():
    # token 0 is "!" in CLIP's vocabulary: only the positions after the first end-of-text are padding
    enc = FrozenCLIPEmbedder(**TINY)
    raw = enc.tokenizer(["!!!!"])
    tokens = enc.tokenize(["!!!!"])
    n = int((raw[0] != 0).sum())
    assert torch.equal(tokens[0, :n], raw[0, :n]) and (tokens[0, n:] == EOT).all()


@pytest.mark.parametrize("make", [tiny_clip, tiny_openclip])
def test_word_order_changes_the_embedding(make):
    enc = make()
    with torch.no_grad():
        a, b = enc(["a red cat on a blue box", "a blue cat on a red box"])
    assert not torch.allclose(a, b, atol=1e-4)


def test_clip_layer_options_and_shapes():
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        last = tiny_clip()(prompts)
        pooled = tiny_clip(layer="pooled")(prompts)
        hidden = tiny_clip(layer="hidden", layer_idx=-2)(prompts)
        penultimate = tiny_clip(layer="penultimate")(prompts)
        enc = tiny_clip()
        assert torch.equal(enc.encode(prompts), last)
        final_ln = enc.transformer.text_model.final_layer_norm
    assert last.shape == hidden.shape == penultimate.shape == (2, 77, 32)
    assert pooled.shape == (2, 1, 32)
    torch.testing.assert_close(pooled[:, 0], last[:, 3])  # <bos> a cat <eot>: pooled at the first <eot>
    torch.testing.assert_close(penultimate, final_ln(hidden))  # clip skip 2: layer -2, then the final norm
    assert not torch.allclose(penultimate, last)
    with pytest.raises(ValueError):
        tiny_clip(layer="hidden")
    with pytest.raises(ValueError):
        tiny_clip(layer="middle")


def test_openclip_layer_options_and_shapes():
    prompts = ["a cat", "a dog"]
    last_enc = tiny_openclip(layer="last")
    with torch.no_grad():
        last = last_enc(prompts)
        penultimate = tiny_openclip(layer="penultimate")(prompts)
        # "last" equals open_clip's own full text transformer followed by ln_final
        model = last_enc.model
        tokens = last_enc.tokenizer(prompts)
        x = model.token_embedding(tokens) + model.positional_embedding
        reference_last = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    assert last.shape == penultimate.shape == (2, 77, 32)
    torch.testing.assert_close(last, reference_last)
    assert not torch.allclose(penultimate, last)
    assert not hasattr(model, "visual")
    with pytest.raises(ValueError):
        tiny_openclip(layer="hidden")


@pytest.mark.parametrize("make", [tiny_clip, tiny_openclip])
def test_frozen(make):
    enc = make()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    unfrozen = make(freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameters())

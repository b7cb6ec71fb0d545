"""The KL autoencoder: checkpoint layout of SD1.5's VAE, shapes, the posterior, attention, safe loading."""

import math
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import UnsafeCheckpointError
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.util import instantiate_from_config

REFERENCE = Path(__file__).parent / "reference"
PREFIX = "first_stage_model."

TINY_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
}


def tiny_vae(ddconfig: dict = TINY_DDCONFIG, **kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4, **kwargs).eval()


def reference_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / "cldm_v15.keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        if key.startswith(PREFIX):
            dims = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
            shapes[key.removeprefix(PREFIX)] = dims
    return shapes


def test_sd15_vae_matches_reference_keys_and_shapes():
    config = OmegaConf.load(REFERENCE / "cldm_v15.yaml").model.params.first_stage_config
    with torch.device("meta"):
        vae = instantiate_from_config(config)
    assert isinstance(vae, AutoencoderKL)
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == reference_shapes()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.monitor == "val/rec_loss"


def test_tiny_vae_round_trip_shapes():
    vae = tiny_vae()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        factor = 2 ** (len(TINY_DDCONFIG["ch_mult"]) - 1)
        assert posterior.mean.shape == (1, 4, 32 // factor, 32 // factor)
        assert vae.decode(posterior.sample()).shape == x.shape
        dec, post = vae(x, sample_posterior=False)
    assert dec.shape == x.shape and torch.equal(dec, vae.decode(post.mode()))
    # attention sits at the 16x16 level only: the encoder's second level and the decoder's deepest
    assert [len(d.attn) for d in vae.encoder.down] == [0, 1]
    assert [len(u.attn) for u in vae.decoder.up] == [0, 2]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ckpt_path_loads_weights(tmp_path, suffix):
    source = tiny_vae()
    path = tmp_path / f"vae{suffix}"
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    torch.manual_seed(1)
    loaded = AutoencoderKL(TINY_DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_ckpt_path_refuses_code_execution(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="Refusing"):
        tiny_vae(ckpt_path=str(path))
    assert not marker.exists()


def test_posterior_mode_and_deterministic_sample():
    params = torch.randn(2, 8, 4, 4)
    dist = DiagonalGaussianDistribution(params)
    assert torch.equal(dist.mode(), params[:, :4])
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(), det.mean)
    assert torch.equal(det.kl(), torch.zeros(2))


def test_posterior_sample_uses_generator_and_logvar_clamp():
    params = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    dist = DiagonalGaussianDistribution(params)
    sample = dist.sample(torch.Generator().manual_seed(3))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert sample.dtype == torch.float64
    torch.testing.assert_close(sample, dist.mean + dist.std * noise)
    extreme = DiagonalGaussianDistribution(torch.tensor([0.0, 1e3]).reshape(1, 2, 1, 1))
    assert extreme.logvar.item() == 20.0


def test_posterior_kl_and_nll_closed_form():
    # N(1, 4) against N(0, 1): 0.5 * (var + mean^2 - 1 - log var) per element
    mean, logvar = torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), math.log(4.0))
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    torch.testing.assert_close(dist.kl(), torch.tensor([18 * 0.5 * (4.0 + 1.0 - 1.0 - math.log(4.0))]))
    assert torch.equal(dist.kl(dist), torch.zeros(1))

    p, q = (DiagonalGaussianDistribution(torch.randn(2, 6, 3, 3, dtype=torch.float64)) for _ in range(2))
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(q.mean, q.std)).sum([1, 2, 3])
    torch.testing.assert_close(p.kl(q), expected)
    torch.testing.assert_close(normal_kl(p.mean, p.logvar, q.mean, q.logvar).sum([1, 2, 3]), expected)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(p.nll(x), -normal(p.mean, p.std).log_prob(x).sum([1, 2, 3]))


def test_attn_block_equals_naive_attention():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 6)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (proj(h).flatten(2) for proj in (block.q, block.k, block.v))  # b c n
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # b n n
        naive = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(x.shape))
        torch.testing.assert_close(block(x), naive, atol=1e-5, rtol=1e-5)


def test_matches_diffusers_decoder_and_encoder():
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # diffusers' VAE has attention only in the middle blocks
    ours = tiny_vae({**TINY_DDCONFIG, "attn_resolutions": []})
    theirs = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=32,
    ).eval()
    converted = convert_ldm_vae_checkpoint(ours.state_dict(), theirs.config)
    missing, unexpected = theirs.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)
        mean = theirs.encode(x).latent_dist.mean
        torch.testing.assert_close(ours.encode(x).mean, mean, atol=1e-5, rtol=1e-5)

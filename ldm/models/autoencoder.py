"""The KL-regularized autoencoder that maps images to the latent space of Stable Diffusion."""

import logging
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.checkpoint import LoadReport, load_checkpoint, load_state_dict
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)


class AutoencoderKL(pl.LightningModule):
    """Encoder -> quant_conv -> Gaussian posterior over `embed_dim` channels -> post_quant_conv -> Decoder."""

    def __init__(
        self,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Iterable[str] = (),
        monitor: str | None = None,
    ):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True: the encoder gives mean and logvar")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Iterable[str] = ()) -> LoadReport:
        sd = load_state_dict(path)
        ignore_keys = tuple(ignore_keys)
        sd = {k: v for k, v in sd.items() if not k.startswith(ignore_keys)} if ignore_keys else sd
        report = load_checkpoint(self, sd)
        log.info("Restored AutoencoderKL from %s: %s", path, report)
        return report

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

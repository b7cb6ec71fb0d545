"""ImageLogger: every N global steps, sample the model on the current batch and save image grids."""

import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only


class ImageLogger(Callback):
    """Writes `image_log/{split}/{key}_gs-{step:06}_e-{epoch:06}_b-{batch:06}.png` grids from `log_images`.

    Logs when the global step is a multiple of `batch_frequency` (once per step, also under gradient
    accumulation), on rank zero only, and also sends the grids to a TensorBoard logger when one is attached.
    """

    def __init__(self, batch_frequency: int = 2000, max_images: int = 4, clamp: bool = True,
                 rescale: bool = True, disabled: bool = False, log_first_step: bool = False,
                 log_images_kwargs: dict | None = None, save_dir: str | os.PathLike | None = None):
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"batch_frequency must be >= 1, got {batch_frequency}")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_first_step = log_first_step
        self.log_images_kwargs = log_images_kwargs or {}
        self.save_dir = save_dir
        self.last_logged_step = -1

    def to_grid(self, images: torch.Tensor) -> np.ndarray:
        """A batch in [-1, 1] (or [0, 1] with rescale=False) as one HWC uint8 grid, 4 per row."""
        grid = torchvision.utils.make_grid(images, nrow=4)
        if self.rescale:
            grid = (grid + 1.0) / 2.0
        return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    @rank_zero_only
    def log_local(self, save_dir: str | os.PathLike, split: str, images: dict[str, torch.Tensor],
                  global_step: int, current_epoch: int, batch_idx: int) -> list[Path]:
        root = Path(save_dir) / "image_log" / split
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, batch in images.items():
            path = root / f"{k}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(self.to_grid(batch)).save(path)
            paths.append(path)
        return paths

    @rank_zero_only
    def log_to_loggers(self, trainer: pl.Trainer, split: str, images: dict[str, torch.Tensor]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for k, batch in images.items():
                    grid = torch.from_numpy(self.to_grid(batch)).permute(2, 0, 1)
                    logger.experiment.add_image(f"{split}/{k}", grid, trainer.global_step)

    def should_log(self, global_step: int) -> bool:
        if self.disabled or self.max_images <= 0 or global_step == self.last_logged_step:
            return False
        if self.log_first_step and self.last_logged_step < 0:
            return True
        return global_step > 0 and global_step % self.batch_freq == 0

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int,
                split: str = "train") -> None:
        # Every rank samples (so collective ops inside log_images stay in step); rank zero writes.
        if not callable(getattr(pl_module, "log_images", None)):
            return
        was_training = pl_module.training
        pl_module.eval()
        # under the training's autocast, which frozen weights in half precision (--frozen_dtype) compute in
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            images = pl_module.log_images(batch, N=self.max_images, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        images = {k: v[:self.max_images].detach().float().cpu() for k, v in images.items()
                  if isinstance(v, torch.Tensor)}
        if self.clamp:
            images = {k: v.clamp(-1.0, 1.0) for k, v in images.items()}
        self.log_local(self.save_dir or trainer.default_root_dir, split, images, trainer.global_step,
                       trainer.current_epoch, batch_idx)
        self.log_to_loggers(trainer, split, images)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        if self.should_log(trainer.global_step):
            self.last_logged_step = trainer.global_step
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

"""DDPM and LatentDiffusion as LightningModules: the noise schedule, the training loss and the conditioning.

Trimmed to what Stable Diffusion and ControlNet use: eps / v / x0 parameterization, the SD schedules,
a frozen first stage (VAE) and text encoder, and optional EMA of the diffusion model.
"""

import contextlib
import logging
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from einops import rearrange
from omegaconf import ListConfig
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.batch import MEAN, STD, TEXT_EMBEDDING, TEXT_POOLED, CachedItem, ImageItem
from ldm.checkpoint import DENOISER_PREFIX, LoadReport, UserError, load_checkpoint, load_state_dict, nonfinite_keys
from ldm.models.diffusion.objective import DenoisedLoss, Objective
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, rescale_zero_terminal_snr
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import OptimizerEma
from ldm.modules.encoders.conditioner import size_conditions
from ldm.util import default, exists, instantiate_from_config, local_tensor

log = logging.getLogger(__name__)
warn = rank_zero_only(log.warning)
info = rank_zero_only(log.info)

# Optimizers DDPM.make_optimizer builds (its `optimizer_name`), and the devices with a fused AdamW kernel.
OPTIMIZERS = ("adamw", "adamw8bit")
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# torch.compile modes that compile_denoiser accepts from the command lines.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The buffers that follow from the config's schedule (register_schedule, and logvar unless learned): saved in the
# original's checkpoints, not in sgm's or when the schedule is rescaled to zero terminal SNR.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")


class TrainingStopped(UserError):
    """Training that cannot be right (a non-finite loss or weights, no gradient at all), stopped with why."""


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """torch.random.fork_rng of the CPU's generator and, on an accelerator, of that device's."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for .train() that keeps frozen parts in eval mode."""
    return self


# How the wrapper feeds the conditioning to the denoiser, as in the original ldm; "crossattn-adm" adds the
# vector `c_adm` as the UNet's y (SDXL's pooled text and size embeddings).
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "crossattn-adm")


class DiffusionWrapper(nn.Module):
    """Holds the denoiser as `diffusion_model` (hence the `model.diffusion_model.*` keys)."""

    def __init__(self, diff_model_config: Any, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unsupported conditioning_key {conditioning_key!r}; expected one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None,
                c_crossattn: list | None = None, c_adm: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioning_key == "crossattn-adm":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=c_adm)
        if c_adm is not None:
            raise ValueError(f"c_adm (a vector conditioning) given to a model with conditioning_key "
                             f"{self.conditioning_key!r}; only 'crossattn-adm' uses it")
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))


class DDPM(pl.LightningModule):
    """Gaussian diffusion in pixel space (the base of LatentDiffusion)."""

    nonfinite_steps = 0
    gradients_checked = False

    def __init__(self, unet_config: Any, timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: str | None = None, ignore_keys: list[str] = (),
                 load_only_unet: bool = False, monitor: str = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3,
                 log_every_t: int = 100, clip_denoised: bool = True, linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas: list | None = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None, parameterization: str = "eps",
                 scheduler_config: Any = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0, persistent_schedule: bool = True,
                 optimizer: str = "adamw", max_nan_steps: int = 0, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, zero_terminal_snr: bool = False, ema_decay: float = 0.9999):
        """`persistent_schedule`: whether the schedule buffers (and logvar) are saved in checkpoints, as the
        original ldm does; sgm-layout models (SDXL) leave them out, as sgm does: they follow from the config.
        `optimizer`: one of OPTIMIZERS; `max_nan_steps`: steps with a non-finite loss skipped before training stops
        (tutorial_train's --optimizer and --max_nan_steps). `snr_gamma`, `noise_offset`: the training objective's
        options (objective.py); `zero_terminal_snr`: rescale the schedule so that its last timestep is pure noise
        (v-prediction only; util.rescale_zero_terminal_snr), its buffers then follow from the config and are not
        saved (SD's files hold the unrescaled ones). `use_ema`: keep an EMA of the trained weights with `ema_decay`
        (ldm/modules/ema.py), which ema_scope swaps in.
        `monitor`, `log_every_t`, `clip_denoised`: the original's settings for its own checkpoint callback and DDPM
        sampler, which are not used here (checkpoints and samplers have their own options); accepted so that its
        configs load. `use_positional_encodings` is not supported and refused."""
        super().__init__()
        if use_positional_encodings:
            raise ValueError("use_positional_encodings (latent position channels in the conditioning) is not "
                             "supported")
        if zero_terminal_snr and parameterization != "v":
            raise ValueError(f"zero_terminal_snr needs a v-prediction model (parameterization: v), not "
                             f"{parameterization!r}: at zero SNR the input is pure noise, so an eps prediction says "
                             f"nothing of the image")
        persistent_schedule = persistent_schedule and not zero_terminal_snr
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name = optimizer
        self.max_nan_steps = max_nan_steps
        self.objective = Objective(snr_gamma, noise_offset)
        self.zero_terminal_snr = zero_terminal_snr
        self.persistent_schedule = persistent_schedule
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.ema = OptimizerEma(ema_decay) if use_ema else None
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.schedule_config = dict(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                                    linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s,
                                    zero_terminal_snr=zero_terminal_snr)
        self.learn_logvar = learn_logvar
        self.logvar_init = logvar_init
        self.init_schedule()
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    def init_schedule(self) -> None:
        """The schedule buffers and logvar at their initial values, from the config, on the current default
        device (a model built on the meta device gets real ones this way, as tool_add_control needs)."""
        self.register_schedule(**self.schedule_config)
        logvar = torch.full(fill_value=self.logvar_init, size=(self.num_timesteps,))
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=self.persistent_schedule)

    def register_schedule(self, given_betas: list | None = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3, zero_terminal_snr: bool = False) -> None:
        """The 12 schedule buffers of the original, in float32."""
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)
        register = partial(self.register_buffer, persistent=self.persistent_schedule)
        register("betas", to_torch(betas))
        register("alphas_cumprod", to_torch(alphas_cumprod))
        register("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        register("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        register("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        register("log_one_minus_alphas_cumprod", to_torch(np.log(1.0 - alphas_cumprod)))
        with np.errstate(divide="ignore"):  # infinite at the last step of a zero-terminal-SNR schedule
            register("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod)))
            register("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod - 1)))
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        register("posterior_variance", to_torch(posterior_variance))
        # The variance is 0 at t=0, so its log is clipped.
        register("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        register("posterior_mean_coef1", to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        register("posterior_mean_coef2",
                 to_torch((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)))
        if self.parameterization == "eps":
            lvlb_weights = self.betas ** 2 / (2 * self.posterior_variance * to_torch(alphas)
                                              * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb_weights = 0.5 * torch.sqrt(to_torch(alphas_cumprod)) / (2.0 * (1 - to_torch(alphas_cumprod)))
        else:
            lvlb_weights = torch.ones_like(self.betas ** 2 / (2 * self.posterior_variance * to_torch(alphas)
                                                              * (1 - self.alphas_cumprod)))
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)

    @contextmanager
    def ema_scope(self, context: str | None = None):
        """The EMA of the trained weights in place of them (with use_ema, while training: the averages live in the
        optimizer's state); otherwise the weights as they are."""
        optimizer = self.ema_optimizer()
        if optimizer is None:
            yield None
            return
        with OptimizerEma.swapped(optimizer):
            yield None

    def ema_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer that holds the EMA: the trainer's, with use_ema; None otherwise."""
        trainer = self._trainer
        return trainer.optimizers[0] if self.use_ema and trainer is not None and trainer.optimizers else None

    def init_from_ckpt(self, path: str, ignore_keys: list[str] = (), only_model: bool = False) -> LoadReport:
        """The config's `ckpt_path`: weights from a file (only the denoiser's with only_model), reported by name."""
        sd = load_state_dict(path)
        ignore_keys = tuple(ignore_keys)
        sd = {k: v for k, v in sd.items() if not k.startswith(ignore_keys)} if ignore_keys else sd
        if only_model:
            sd = {k.removeprefix(DENOISER_PREFIX): v for k, v in sd.items()}
        report = load_checkpoint(self.model if only_model else self, sd)
        log.info("Restored %s from %s: %s", type(self).__name__, path, report)
        return report

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
        else:
            loss = torch.nn.functional.mse_loss(target, pred, reduction="none")
        return loss.mean() if mean else loss

    def get_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None,
                    sampling_step: tuple[int, int] | None = None) -> torch.Tensor:
        """Denoiser output; `sampling_step` (index, total) is given while sampling, for step-dependent models."""
        return self.model(x_noisy, t)

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The one-step estimate of x0 from x_t and the model's output at t (eps, v or x0, by the parameterization),
        in float32 or wider: (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), or sqrt(a_t) x_t - sqrt(1 - a_t) v."""
        dtype = torch.promote_types(torch.promote_types(x_t.dtype, model_output.dtype), torch.float32)
        x_t, model_output = x_t.to(dtype), model_output.to(dtype)
        if self.parameterization == "x0":
            return model_output
        if self.parameterization == "v":
            return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                    - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * model_output)
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * model_output)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None,
                 denoised_loss: DenoisedLoss | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss: each sample's denoising loss (MSE or L1 of eps, v or x0) weighted by the objective
        (min-SNR-gamma), reweighted by logvar, plus the optional VLB term and the optional `denoised_loss` on the
        one-step x0 estimate (a reward); the noise drawn by the objective (noise offset) unless given. Logged:
        loss_simple (the unweighted denoising loss, comparable across objectives), loss_vlb, the denoised loss's
        values and loss (what is optimised)."""
        noise = default(noise, lambda: self.objective.noise_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.get_target(x_start, noise, t)
        prefix = "train" if self.training else "val"
        loss_per_sample = self.get_loss(model_output.float(), target.float(), mean=False).mean(dim=[1, 2, 3])
        loss_dict = {f"{prefix}/loss_simple": loss_per_sample.mean()}
        weighted = loss_per_sample * self.objective.sample_weights(self, t)
        logvar_t = self.logvar[t]
        loss = self.l_simple_weight * (weighted / torch.exp(logvar_t) + logvar_t).mean()
        if self.learn_logvar:
            loss_dict.update({f"{prefix}/loss_gamma": loss, "logvar": self.logvar.data.mean()})
        loss_vlb = (self.lvlb_weights[t] * loss_per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        if denoised_loss is not None:
            term, logged = denoised_loss(self.predict_start(x_noisy, t, model_output), t)
            loss = loss + term
            loss_dict.update({f"{prefix}/{name}": value for name, value in logged.items()})
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """Images arrive as BHWC (or BHW) and leave as contiguous float BCHW."""
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, None, t, *args, **kwargs)

    def shared_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self(self.get_input(batch, self.first_stage_key))

    def samples_in(self, batch: ImageItem | CachedItem) -> int:
        """Samples in a batch of images or of cached latents."""
        return len(batch[MEAN] if MEAN in batch else batch[self.first_stage_key])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss, loss_dict = self.shared_step(batch)
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            self.skip_nonfinite_step(loss, loss_dict)
            return None  # no backward, no update: the step is skipped on every rank
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                      batch_size=self.samples_in(batch))
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=True, logger=True,
                     on_step=True, on_epoch=False)
        return loss

    def skip_nonfinite_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Count a step whose loss is NaN or infinite (on some rank); stop once more than max_nan_steps. The message
        names the logged terms that are not finite (the reward's, for one)."""
        self.nonfinite_steps += 1
        bad = [f"{name} {value.item()}" for name, value in terms.items()
               if not name.endswith("/loss") and not torch.isfinite(value).all()]
        where = f"the loss is {loss.item()} at global step {self.global_step}" + (f" ({', '.join(bad)})" if bad else "")
        if self.nonfinite_steps > self.max_nan_steps:
            raise TrainingStopped(f"Training stopped: {where}, after {self.nonfinite_steps - 1} skipped "
                                  f"non-finite steps (--max_nan_steps {self.max_nan_steps}); this step was not "
                                  f"applied", "lower the learning rate, check the data, or use a wider precision")
        warn(f"Skipped a step: {where} ({self.nonfinite_steps} of at most {self.max_nan_steps})")

    def on_train_start(self) -> None:
        self.nonfinite_steps = 0
        self.gradients_checked = False
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is None:
            return
        if not self.use_ema:
            dropped = OptimizerEma.drop(optimizer)
            if dropped:
                warn("use_ema is off: the averages of %d tensors the checkpoint holds are dropped", dropped)
            return
        trained = sum(len(group["params"]) for group in optimizer.param_groups)
        resumed = (f": {len(OptimizerEma.averaged(optimizer))} continue the checkpoint's averages, the others start "
                   f"from their weights" if self.trainer.ckpt_path else "")
        info("EMA of the %d trained tensors, decay %g%s", trained, self.ema_decay, resumed)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop at the first update when no trainable tensor has a gradient: such a run could never learn."""
        if self.gradients_checked:
            return
        self.gradients_checked = True
        grads = [local_tensor(p.grad) for p in self.trainable_parameters() if p.grad is not None]
        # under sharded training each rank holds a part of every gradient: the decision is every rank's
        if grads and not self.any_rank(any(bool(g.any()) for g in grads)):
            raise TrainingStopped(f"Training stopped: all {len(grads)} trainable tensors got an exactly zero "
                                  f"gradient at global step {self.global_step}, so the model cannot learn",
                                  self.cannot_learn_advice())

    def any_rank(self, value: bool) -> bool:
        """Whether `value` holds on any process of the run (every process calls this at the same point)."""
        return value if self._trainer is None else self.trainer.strategy.reduce_boolean_decision(value, all=False)

    def cannot_learn_advice(self) -> str:
        return ("a zero-initialised layer after the trainable ones blocks the gradient (a random network's "
                "output layer, for one): start from trained weights, or let that layer train")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to save weights that went NaN or infinite: the last good checkpoint stays in place."""
        bad = nonfinite_keys({name: local_tensor(p) for name, p in self.named_parameters() if p.requires_grad})
        if self.any_rank(bool(bad)):
            bad = bad or ["on another rank"]
            raise TrainingStopped(f"Training stopped: {len(bad)} trainable tensors are no longer finite at global "
                                  f"step {self.global_step} (e.g. {bad[0]}); they were not saved",
                                  "lower the learning rate, check the data, or use a wider precision")

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The loss on a held-out batch (val/loss_simple, ...), and with the EMA weights (..._ema); every rank gets
        the same value. The latents, timesteps and noise come from a seed per batch, in a forked generator: the
        same draws at every validation and for both weights, and the training's random stream left as it was."""
        n = self.samples_in(batch)
        for suffix, scope in (("", contextlib.nullcontext), ("_ema", self.ema_scope)):
            with fork_rng(self.device), scope():
                torch.manual_seed(batch_idx)
                _, loss_dict = self.shared_step(batch)
            self.log_dict({key + suffix: v for key, v in loss_dict.items()}, prog_bar=False, logger=True,
                          on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def compile_denoiser(self, **kwargs) -> None:
        """torch.compile the denoising network in place (state-dict keys unchanged); kwargs go to torch.compile."""
        self.model.diffusion_model.compile(**kwargs)

    def set_denoiser_dtype(self, dtype: torch.dtype) -> None:
        """Convert the denoising network's weights, for inference in bf16 / fp16 (half the memory and time on
        GPUs); the VAE, the text encoder and the noise schedule stay float32, and so do the sampler's latents."""
        self.model.to(dtype)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """The frozen weights (requires_grad False: the base UNet, VAE and text encoders) in `dtype`, for
        training under the autocast of that dtype: half the base's memory in bf16, as diffusers' training
        scripts hold their frozen models. Trained weights, their optimizer state and the noise schedule stay
        float32."""
        for p in self.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters that require grad: requires_grad is the one record of what trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, params: list) -> torch.optim.Optimizer:
        """The optimizer of `self.optimizer_name` over `params` (tensors or param groups) at self.learning_rate.

        "adamw" takes torch's fused kernel when every parameter is on a device that has it (several times
        faster than the per-tensor loop); "adamw8bit" keeps the moments in 8 bits (bitsandbytes).
        """
        if self.optimizer_name == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from err
            return bnb.optim.AdamW8bit(params, lr=self.learning_rate)
        if self.optimizer_name != "adamw":
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer_name!r}")
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = bool(tensors) and all(p.device.type in FUSED_ADAMW_DEVICES for p in tensors)
        return torch.optim.AdamW(params, lr=self.learning_rate, fused=fused)

    def configure_optimizers(self):
        opt = self.make_optimizer(self.trainable_parameters())
        if self.ema is not None:
            self.ema.attach(opt)
        if not self.use_scheduler:
            return opt
        scheduler = instantiate_from_config(self.scheduler_config)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=scheduler.schedule),
                        "interval": "step", "frequency": 1}]


class LatentDiffusion(DDPM):
    """Diffusion on VAE latents, conditioned on text through cross-attention."""

    def __init__(self, first_stage_config: Any, cond_stage_config: Any = None, num_timesteps_cond: int | None = None,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: str | None = None, conditioning_key: str | None = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, force_null_conditioning: bool = False,
                 conditioner_config: Any = None, *args, **kwargs):
        """`cond_stage_config` (SD1.x/2.x: a text encoder, `cond_stage_model.*`) or `conditioner_config`
        (SDXL: sgm's conditioner of several embedders, `conditioner.*`, with conditioning_key crossattn-adm).
        `num_timesteps_cond` above 1 (the original's noised conditioning, shorten_cond_schedule) is refused;
        `scale_by_std` keeps `scale_factor` as a buffer, so a checkpoint's value loads."""
        if (cond_stage_config is None) == (conditioner_config is None):
            raise ValueError("give exactly one of cond_stage_config (SD1.x/2.x) and conditioner_config (SDXL)")
        self.force_null_conditioning = force_null_conditioning
        if default(num_timesteps_cond, 1) > 1:
            raise ValueError(f"num_timesteps_cond {num_timesteps_cond}: noising the conditioning (the original's "
                             f"shorten_cond_schedule) is not supported; use 1")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not self.force_null_conditioning:
            conditioning_key = None
        if (conditioner_config is not None) != (conditioning_key == "crossattn-adm"):
            raise ValueError("conditioning_key crossattn-adm and conditioner_config go together: the vector y "
                             f"comes from the conditioner (got conditioning_key {conditioning_key!r})")
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        kwargs.setdefault("persistent_schedule", conditioner_config is None)
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        if conditioner_config is not None:
            self.conditioner = self.frozen_or_trainable(instantiate_from_config(conditioner_config))
        else:
            self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def instantiate_first_stage(self, config: Any) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train
        self.first_stage_model.requires_grad_(False)

    def instantiate_cond_stage(self, config: Any) -> None:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            self.cond_stage_model = self.first_stage_model if config == "__is_first_stage__" else None
            return
        self.cond_stage_model = self.frozen_or_trainable(instantiate_from_config(config))

    def frozen_or_trainable(self, model: nn.Module) -> nn.Module:
        """The conditioning encoder as is when cond_stage_trainable, else frozen in eval mode."""
        if self.cond_stage_trainable:
            return model
        model = model.eval()
        model.train = disabled_train
        return model.requires_grad_(False)

    @property
    def conditioning_model(self) -> nn.Module | None:
        """The conditioning encoder: `conditioner` (SDXL layout) or `cond_stage_model` (SD1.x/2.x layout)."""
        return self.conditioner if self.vector_conditioned else self.cond_stage_model

    @property
    def vector_conditioned(self) -> bool:
        """Whether the UNet also takes a vector y (`c_adm`) from the conditioner (SDXL)."""
        return self.model.conditioning_key == "crossattn-adm"

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent covers per side (8 for SD)."""
        return 2 ** (len(self.first_stage_model.encoder.down) - 1)

    def get_learned_conditioning(self, c: Any) -> Any:
        model = self.conditioning_model
        if self.cond_stage_forward is None:
            if hasattr(model, "encode") and callable(model.encode):
                c = model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = model(c)
        else:
            c = getattr(model, self.cond_stage_forward)(c)
        return c

    def text_conditioning(self, prompts: list[str], image_size: tuple[int, int], **size_kwargs) -> dict[str, Any]:
        """The conditioning entries of a cond dict for `prompts` and images of `image_size` (h, w):
        `c_crossattn`, plus `c_adm` (the vector y) for a vector-conditioned model, whose size conditioning
        (`original_size`, `crop`, `target_size`, see conditioner.size_conditions) defaults to the image size."""
        if not self.vector_conditioned:
            return {"c_crossattn": [self.get_learned_conditioning(list(prompts))]}
        batch = {self.conditioner.text_key: list(prompts),
                 **size_conditions(len(prompts), image_size, device=self.device, **size_kwargs)}
        return self.vector_cond(self.get_learned_conditioning(batch))

    @staticmethod
    def vector_cond(out: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A conditioner's {"crossattn", "vector"} as cond-dict entries (the original ldm's crossattn-adm keys)."""
        return {"c_crossattn": [out["crossattn"]], "c_adm": out["vector"]}

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    def cached_first_stage_encoding(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Scaled latents drawn from a cached posterior, with the RNG use of DiagonalGaussianDistribution.sample."""
        noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean + std * noise)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.differentiable_decode_first_stage(z)

    def differentiable_decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """decode_first_stage with the gradient to z (the VAE itself stays frozen): for losses on decoded images."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_input(self, batch: ImageItem | CachedItem, k: str, bs: int | None = None) -> tuple[torch.Tensor, Any]:
        """Latents of batch[k] (the first bs) and the encoded conditioning of batch[cond_stage_key].

        Batches read from a latent cache (tool_cache_latents.py, ldm.batch.CachedItem) carry the VAE posterior
        as `mean` and `std` and the text embedding as `txt_emb`; these replace the frozen VAE and text encoder,
        and the latents are drawn from the cached posterior exactly as from the online one.
        """
        if MEAN in batch:
            mean, std = (batch[key][:bs].to(self.device).float() for key in (MEAN, STD))
            z = self.cached_first_stage_encoding(mean, std)
        else:
            x = super().get_input(batch, k)[:bs].to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            cond_key = self.cond_stage_key
            xc = batch[cond_key] if cond_key in ("caption", "coordinates_bbox", "txt") else super().get_input(
                batch, cond_key).to(self.device)
            if isinstance(xc, (list, tuple, ListConfig)) and bs is not None:
                xc = list(xc)[:bs]
            if self.vector_conditioned:
                c = self.vector_cond(self.batch_conditioning(batch, xc, z.shape[0], z.shape[-2:]))
            elif TEXT_EMBEDDING in batch and not self.cond_stage_trainable:
                c = batch[TEXT_EMBEDDING].to(self.device)
            else:
                c = xc if self.cond_stage_trainable else self.get_learned_conditioning(xc)
            if bs is not None and isinstance(c, torch.Tensor):
                c = c[:bs]
        return z, c

    def batch_conditioning(self, batch: ImageItem | CachedItem, prompts: list[str], n: int,
                           latent_size: torch.Size) -> dict[str, torch.Tensor]:
        """The conditioner's output for the first n samples of a batch: the text from its cache (`txt_emb` and
        `txt_pooled`) or encoded now; the size entries the batch carries, else those of its images (original =
        target = image size, crop (0, 0))."""
        sizes = self.batch_sizes(batch, n, latent_size)
        cached = [TEXT_EMBEDDING, TEXT_POOLED]
        if all(k in batch for k in cached):
            crossattn, text_vector = (batch[k][:n].to(self.device) for k in cached)
        else:
            crossattn, text_vector = self.conditioner.encode_text(prompts)
        return self.conditioner.assemble(crossattn, text_vector, sizes)

    def batch_sizes(self, batch: ImageItem | CachedItem, n: int, latent_size: torch.Size) -> dict[str, torch.Tensor]:
        """The size conditioning of the first n samples: the batch's size entries (a data set that resized or
        cropped may record them), else original = target = the image size (from the latents), crop (0, 0)."""
        f = self.vae_scale_factor
        defaults = size_conditions(n, (latent_size[0] * f, latent_size[1] * f), device=self.device)
        return {k: torch.as_tensor(batch[k][:n]).float().to(self.device) if k in batch else v
                for k, v in defaults.items()}

    def shared_step(self, batch: dict, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None and self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any,
                    sampling_step: tuple[int, int] | None = None) -> torch.Tensor:
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

"""ControlNet: a trainable copy of the SD UNet encoder, joined to the locked UNet by zero convolutions."""

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import einops
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from cldm import diffusers_convert
from cldm.control import ControlMode, ControlUnit, HintCache, ResidualControl, contribution, repeat_to
from cldm.data.batch import ControlItem
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.model import CONTROL_PREFIX, LoadReport, load_checkpoint, load_state_dict
from cldm.reward import PAPER_MAX_T, REWARD_MODELS, REWARDS, Reward, RewardModel, load_reward_model
from cldm.sharding import ShardedDataParallel
from cldm.training import TRAINING_STATE, adapt_optimizer_state, training_state
from ldm.batch import IMAGE, MEAN, TEXT_EMBEDDING, TEXT_POOLED, empty_prompt
from ldm.checkpoint import METADATA, UNET_PREFIX, UserError, read_metadata
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.attention import InputAdapter
from ldm.modules.diffusionmodules.openaimodel import (
    BlockHook,
    TimestepEmbedSequential,
    UNetModel,
    UNetSpec,
    embed_time_and_vector,
)
from ldm.modules.diffusionmodules.util import conv_nd, zero_module
from ldm.modules.encoders.conditioner import CROP, ORIGINAL_SIZE, TARGET_SIZE
from ldm.util import get_obj_from_str, instantiate_from_config, log_txt_as_img


def cat_one(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat on dim 1, returning a single tensor itself: the same hint object every step lets the
    ControlNet reuse its hint encoding."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


class ControlledUnetModel(UNetModel):
    """The locked UNet; control residuals are added to the middle output and to the skip connections."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None, only_mid_control: bool = False,
                adapter: InputAdapter | None = None, y: torch.Tensor | None = None,
                hooks: Sequence[BlockHook] = ()) -> torch.Tensor:
        """eps (or v) with `control` (one residual per skip, then the middle's) added; `adapter` acts inside the
        attention projections and `hooks` around the blocks; `y`: the vector of vector-conditioned bases (SDXL)."""
        # The encoder half is locked, so it runs without building a graph unless something in it trains (an
        # adapter's or a hook's network, or a mode that unlocks it); the parameter scan runs only while
        # gradients are recorded (not at every sampling step).
        encoder_trains = torch.is_grad_enabled() and (
            adapter is not None or bool(hooks) or any(p.requires_grad for p in self.input_blocks.parameters()))
        with torch.set_grad_enabled(encoder_trains):
            h, emb, hs = self.encode(x, timesteps, context, y, adapter, hooks)
        if control is not None:
            control = list(control)
            h = h + control.pop()
            if not only_mid_control:
                hs = [skip + residual for skip, residual in zip(hs, control)]
        return self.decode(h, emb, context, hs, adapter, hooks)


# Widths of the hint encoder's stages (the original's; diffusers' conditioning_embedding_out_channels).
HINT_BLOCK_CHANNELS = (16, 32, 96, 256)


class ControlNet(ResidualControl):
    """Hint encoder + copy of the UNet encoder; returns one zero-conv residual per skip plus the middle."""

    def __init__(self, image_size: int, hint_channels: int, num_heads_upsample: int = -1,
                 hint_block_channels: Sequence[int] = HINT_BLOCK_CHANNELS, **spec):
        super().__init__()
        b = UNetSpec(**spec)
        self.model_channels = b.model_channels
        self.dims = b.dims
        self.time_embed = b.time_embed()
        self.label_emb = b.label_emb()
        self.input_hint_block = self.make_hint_block(hint_channels, b.model_channels, b.dims, hint_block_channels)
        self.input_blocks, input_block_chans = b.input_blocks()
        self.zero_convs = nn.ModuleList([self.make_zero_conv(ch) for ch in input_block_chans])
        self.middle_block = b.middle_block()
        self.middle_block_out = self.make_zero_conv(b.bottom()[0])
        self._hint_cache = HintCache()

    @staticmethod
    def make_hint_block(hint_channels: int, model_channels: int, dims: int = 2,
                        widths: Sequence[int] = HINT_BLOCK_CHANNELS) -> TimestepEmbedSequential:
        """3x3 convs with SiLUs that bring the hint image to latent size (/2 per width after the first) with a
        zero-initialised output: to widths[0], then per next width one conv at the width and one of stride 2 to
        the next (diffusers' conditioning_embedding_out_channels; the original's (16, 32, 96, 256): eight convs)."""
        convs = [(hint_channels, widths[0], 1)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            convs += [(c_in, c_in, 1), (c_in, c_out, 2)]
        layers: list[nn.Module] = []
        for c_in, c_out, stride in convs:
            layers += [conv_nd(dims, c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
        layers.append(zero_module(conv_nd(dims, widths[-1], model_channels, 3, padding=1)))
        return TimestepEmbedSequential(*layers)

    def make_zero_conv(self, channels: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(zero_module(conv_nd(self.dims, channels, channels, 1, padding=0)))

    def residuals(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """forward(), with the hint encoded once per hint tensor while sampling (see encode_hint)."""
        guided_hint = None if torch.is_grad_enabled() else repeat_to(self.encode_hint(hint), x.shape[0])
        return self(x, repeat_to(hint, x.shape[0]), timesteps, context, guided_hint=guided_hint, y=y)

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """input_hint_block(hint), computed once per hint while sampling (no grad; see HintCache)."""
        dtype = next(self.input_hint_block.parameters()).dtype
        return self._hint_cache(hint, self.input_hint_block, lambda h: self.input_hint_block(h.to(dtype), None, None))

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None, guided_hint: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The 13 unweighted residuals; `guided_hint`: input_hint_block(hint) when already known; `y`: the
        vector the UNet gets too (SDXL)."""
        emb = embed_time_and_vector(self, x, timesteps, y)
        if guided_hint is None:
            guided_hint = self.input_hint_block(hint.to(x.dtype), emb, context)
        return self.encoder_residuals(self.input_blocks[0](x, emb, context) + guided_hint, emb, context)

    def encoder_residuals(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None
                          ) -> list[torch.Tensor]:
        """The residuals from h, the first input block's output with the hint's encoding added: its zero conv's,
        then each later input block's and the middle block's."""
        outs = [self.zero_convs[0](h, emb, context)]
        for module, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = module(h, emb, context)
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


# A full ControlNet file holds its hint encoder and its copy of the UNet encoder (a control-LoRA holds only offsets
# for the copy): layout -> the first conv of each, as that layout names them; in diffusers' names also the middle
# block's zero conv, which a ControlNet-XS adapter (hint encoder and conv_in too) lacks.
CONTROLNET_LAYOUTS = {
    "original": (f"{CONTROL_PREFIX}input_hint_block.0.weight", f"{CONTROL_PREFIX}input_blocks.0.0.weight"),
    "unprefixed": ("input_hint_block.0.weight", "input_blocks.0.0.weight"),
    "diffusers": ("controlnet_cond_embedding.conv_in.weight", "conv_in.weight", "controlnet_mid_block.weight"),
}


# The top-level modules of a ControlNet under each layout's names: a file holding others is another kind of control
# built on a ControlNet (ControlNet-Union's condition transformer), not a ControlNet.
LDM_MODULES = ("time_embed", "label_emb", "input_hint_block", "input_blocks", "zero_convs", "middle_block",
               "middle_block_out")
DIFFUSERS_MODULES = ("conv_in", "time_embedding", "add_embedding", "class_embedding", "controlnet_cond_embedding",
                     "down_blocks", "controlnet_down_blocks", "mid_block", "controlnet_mid_block")


def only_controlnet_modules(state_dict: Mapping[str, torch.Tensor], layout: str) -> bool:
    """Whether every (control) key of a file in `layout` belongs to a module of a ControlNet."""
    if layout == "diffusers":
        return all(k.split(".", 1)[0] in DIFFUSERS_MODULES for k in state_dict)
    if layout == "original":  # a whole checkpoint: its control keys
        return all(k[len(CONTROL_PREFIX):].split(".", 1)[0] in LDM_MODULES for k in state_dict
                   if k.startswith(CONTROL_PREFIX))
    return all(k.split(".", 1)[0] in LDM_MODULES for k in state_dict)


def hint_channels_of(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The input channels of the hint encoder's first conv, in any layout of a ControlNet or a control-LoRA
    (None when absent)."""
    for key in (f"{CONTROL_PREFIX}input_hint_block.0.weight", "input_hint_block.0.weight",
                "controlnet_cond_embedding.conv_in.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[1])
    return None


def controlnet_params(config: DictConfig, hint_channels: int | None = None) -> dict:
    """The ControlNet constructor's arguments for the model of a ControlLDM config: its control network's when that
    is a ControlNet (one of a subclass without the subclass's own arguments, e.g. LoRA ranks), else its UNet's (an
    LLLite config has no ControlNet); `hint_channels` replaces the config's."""
    params = config.model.params
    control = params.control_stage_config
    if "model_channels" in (control.get("params") or {}):
        own = set(inspect.signature(ControlNet.__init__).parameters)
        extra = set(inspect.signature(get_obj_from_str(control.target).__init__).parameters) - own
        spec = {k: v for k, v in OmegaConf.to_container(control.params).items() if k not in extra}
    else:
        spec = {k: v for k, v in OmegaConf.to_container(params.unet_config.params).items() if k != "out_channels"}
        spec.setdefault("hint_channels", 3)
    if hint_channels is not None:
        spec["hint_channels"] = hint_channels
    return spec


class ControlNetMode(ControlMode):
    """Full ControlNet files: the original's whole checkpoints, ControlNet 1.1's control-only files and our exports
    (`control_model.*`), the same keys without the prefix, or diffusers' ControlNetModel names."""

    name = "controlnet"
    files = ("a full ControlNet (control_model.* keys, the same without the prefix, or diffusers' ControlNetModel "
             "names: a hint encoder and a copy of the UNet encoder)")

    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        return next((name for name, keys in CONTROLNET_LAYOUTS.items()
                     if all(k in state_dict for k in keys) and only_controlnet_modules(state_dict, name)), None)

    def weights(self, state_dict: Mapping[str, torch.Tensor], net: ControlNet) -> dict[str, torch.Tensor]:
        """A file's ControlNet tensors under our names, without the prefix (a whole checkpoint gives only them)."""
        layout = self.layout(state_dict)
        if layout == "original":
            return {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
        if layout == "diffusers":
            table = {new: old for old, new in diffusers_module_names(net).items()}
            return {rename_module(k, table): v for k, v in state_dict.items()}
        return dict(state_dict)

    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> ControlNet:
        with torch.device(next(model.model.diffusion_model.parameters()).device):
            net = ControlNet(**controlnet_params(config, hint_channels_of(state_dict)))
        report = load_checkpoint(net, self.weights(state_dict, net))
        if not report.ok:
            raise ValueError(f"its weights do not match: {report}")
        return net

    def export(self, model: "ControlLDM") -> dict[str, torch.Tensor]:
        """`control_model.*` (the layout of the ControlNet 1.1 files); with sd_locked False also the UNet decoder
        trained with them, so the file and the base give the trained model."""
        out = {CONTROL_PREFIX + k: v for k, v in model.control_model.state_dict().items()}
        if not model.sd_locked:
            unet = model.model.diffusion_model
            out |= {f"{UNET_PREFIX}{part}.{k}": v for part in ("output_blocks", "out")
                    for k, v in unet.get_submodule(part).state_dict().items()}
        return out

    def load(self, model: "ControlLDM", state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        if self.layout(state_dict) != "original":
            state_dict = {CONTROL_PREFIX + k: v for k, v in self.weights(state_dict, model.control_model).items()}
        return load_checkpoint(model, state_dict, prefixes=(CONTROL_PREFIX,))

    def to_diffusers(self, source: str | os.PathLike, out_dir: str | os.PathLike, config: str | os.PathLike,
                     force: bool = False) -> Path:
        return diffusers_convert.convert_to_diffusers(source, out_dir, config, force)

    def from_diffusers(self, source: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike,
                       force: bool = False) -> Path:
        return diffusers_convert.convert_from_diffusers(source, out, config, force)


CONTROLNET = ControlNetMode()


class ControlLDM(LatentDiffusion):
    """LatentDiffusion whose UNet is steered by a ControlNet on a hint image (batch[control_key])."""

    # The mode of this model's own control network: its files, its export.
    control_mode: ClassVar[ControlMode] = CONTROLNET
    # Key prefixes this mode initialises itself, so an initial checkpoint may lack them. The full
    # ControlNet has none: its copy must come from tool_add_control.py, as in the original.
    fresh_prefixes: tuple[str, ...] = ()
    # The parts of the control network that tool_add_control.py copies from the UNet (ControlNetModel.from_unet).
    unet_copy_prefixes: tuple[str, ...] = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    # Why a mode's UNet stays locked whatever sd_locked says (e.g. "LLLite mode trains only the LLLite modules");
    # None: sd_locked False trains the UNet's decoder along with the control network.
    locked_unet: ClassVar[str | None] = None

    def __init__(self, control_stage_config: Any, control_key: str, only_mid_control: bool,
                 global_average_pooling: bool = False, sd_locked: bool = True, learning_rate: float = 1e-5,
                 drop_prompt_rate: float = 0.0, lr_multipliers: dict[str, float] | None = None,
                 reward: str | None = None, reward_weight: float | None = None, reward_max_t: int = PAPER_MAX_T,
                 reward_checkpointing: bool = True, *args, **kwargs):
        """`reward`: reward fine-tuning (cldm/reward.py, ControlNet++) with that reward model, off when None;
        `reward_weight`: its loss weight (None: the paper's for the condition; 0 turns the reward off);
        `reward_max_t`: the largest rewarded timestep; `reward_checkpointing`: recompute the VAE decoder's and the
        detector's activations in backward instead of keeping them."""
        super().__init__(*args, **kwargs)
        if reward is not None and reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS} or None, got {reward!r}")
        if reward is None and reward_weight is not None:
            raise ValueError(f"reward_weight {reward_weight} is given without a reward, so it would do nothing")
        if reward_weight is not None and not reward_weight >= 0:
            raise ValueError(f"reward_weight must be 0 or more, got {reward_weight}")
        if not 0 <= reward_max_t < self.num_timesteps:
            raise ValueError(f"reward_max_t must be a timestep, 0 to {self.num_timesteps - 1}, got {reward_max_t}")
        self.reward_name = reward
        self.reward_weight = REWARD_MODELS[reward].weight if reward is not None and reward_weight is None \
            else reward_weight
        self.reward_max_t = reward_max_t
        self.reward_checkpointing = reward_checkpointing
        # the reward's detector: frozen, outside the state dict and optimizer (not a submodule), on the step's device
        self.reward_model: RewardModel | None = None
        self.control_model = self.make_control_model(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.global_average_pooling = global_average_pooling
        self.control_scales = [1.0] * self.num_control_scales()
        self.learning_rate = learning_rate
        self.drop_prompt_rate = drop_prompt_rate
        # parameter-name prefix -> multiplier of learning_rate, e.g. {"control_model.zero_convs.": 10}
        self.lr_multipliers = dict(lr_multipliers or {})
        self.model.requires_grad_(False)
        self.sd_locked = sd_locked

    def make_control_model(self, control_stage_config: Any) -> nn.Module:
        """The mode's control network; built after the UNet, so a mode may build it on the UNet."""
        return instantiate_from_config(control_stage_config)

    def replace_control_model(self, net: nn.Module) -> None:
        """Make `net` (a file's network, of the file's structure) the model's own, on the old one's device and dtype
        and training as it did. Do this before training starts (the optimizer holds the old network)."""
        old = next(self.control_model.parameters())
        self.control_model = net.to(device=old.device, dtype=old.dtype).requires_grad_(old.requires_grad)

    def make_optimizer(self, params: list) -> torch.optim.Optimizer:
        """DDPM's optimizer; a parameter under a prefix of lr_multipliers gets learning_rate times its value."""
        if not self.lr_multipliers:
            return super().make_optimizer(params)
        names = {id(p): name for name, p in self.named_parameters()}
        groups: dict[float, list] = {}
        for p in params:
            scale = next((m for prefix, m in self.lr_multipliers.items() if names[id(p)].startswith(prefix)), 1.0)
            groups.setdefault(scale, []).append(p)
        return super().make_optimizer([{"params": ps, "lr": self.learning_rate * scale}
                                       for scale, ps in groups.items()])

    def num_control_scales(self) -> int:
        """One scale per residual: 12 zero convs and the middle block on SD."""
        return len(self.control_model.zero_convs) + 1

    @property
    def sd_locked(self) -> bool:
        """When False, the UNet's decoder (output_blocks and out) trains along with the ControlNet."""
        return self._sd_locked

    @sd_locked.setter
    def sd_locked(self, locked: bool) -> None:
        if not locked and self.locked_unet is not None:
            raise ValueError(f"{self.locked_unet}; the UNet stays locked (sd_locked)")
        self._sd_locked = bool(locked)
        unet = self.model.diffusion_model
        unet.output_blocks.requires_grad_(not locked)
        unet.out.requires_grad_(not locked)

    def configure_model(self) -> None:
        """Lightning's hook for sharding, called under every strategy: under --strategy fsdp
        (cldm.sharding.ShardedDataParallel) the trainable blocks of the control network and the UNet are sharded."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ShardedDataParallel):
            strategy.shard([self.control_model, self.model.diffusion_model])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TRAINING_STATE] = training_state(self)
        recorded = self.control_mode.recorded(self)
        if recorded:  # what the control network's tensors do not show, for the checkpoint used as a control file
            checkpoint[METADATA] = recorded

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The optimizer state moves by parameter name, so a resume may change the trainable set (sd_locked).
        if self._trainer is not None:
            adapt_optimizer_state(self, checkpoint)

    def cannot_learn_advice(self) -> str:
        return ("with random UNet weights (tutorial_train --resume_path none) the UNet's zero-initialised output "
                "layer blocks every gradient: start from a checkpoint made by tool_add_control.py, or train that "
                "layer too (--sd_locked False)")

    def drop_prompts(self, prompts: list[str]) -> list[str]:
        """Replace each prompt by "" with probability drop_prompt_rate (the paper trains with 50%)."""
        return self.drop_prompt_batch({self.cond_stage_key: prompts})[self.cond_stage_key]

    def drop_prompt_batch(self, batch: ControlItem) -> ControlItem:
        """The batch with its prompts dropped (see drop_prompts); cached text encodings (`txt_emb`, and SDXL's
        `txt_pooled`) get the cached empty prompt's (`txt_emb_empty`, ...) in the same places, from the same
        random draw."""
        key = self.cond_stage_key
        keep = torch.rand(len(batch[key])) >= self.drop_prompt_rate
        out = {**batch, key: [p if k else "" for p, k in zip(batch[key], keep.tolist())]}
        for emb_key in (TEXT_EMBEDDING, TEXT_POOLED):
            if emb_key in batch:
                emb = batch[emb_key]
                mask = keep.to(emb.device).view(-1, *([1] * (emb.dim() - 1)))
                out[emb_key] = torch.where(mask, emb, batch[empty_prompt(emb_key)])
        return out

    @torch.no_grad()
    def get_input(self, batch: ControlItem, k: str, bs: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.training and self.drop_prompt_rate > 0:
            batch = self.drop_prompt_batch(batch)
        x, c = super().get_input(batch, self.first_stage_key, bs=bs)
        control = batch[self.control_key]
        if bs is not None:
            control = control[:bs]
        control = einops.rearrange(control.to(self.device), "b h w c -> b c h w")
        control = control.to(memory_format=torch.contiguous_format).float()
        text = c if isinstance(c, dict) else dict(c_crossattn=[c])  # a dict from a vector-conditioned base
        return x, dict(**text, c_concat=[control])

    def reward_term(self) -> Reward | None:
        """The reward fine-tuning term of the loss with the model's settings; None when no reward is set or its weight
        is 0. Its detector (`reward_model`) loads on first use, a missing weight file named by a UserError."""
        if self.reward_name is None or self.reward_weight == 0:
            return None
        if self.reward_model is None or self.reward_model.name != self.reward_name:
            self.reward_model = load_reward_model(self.reward_name)
        return Reward(self.reward_model, self.reward_weight, self.reward_max_t, self.reward_checkpointing)

    def shared_step(self, batch: ControlItem, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch; with a reward, plus its term on the one-step denoised images of the samples whose
        timestep it rewards."""
        x, c = self.get_input(batch, self.first_stage_key)
        reward = self.reward_term()
        if reward is None:
            return self(x, c)
        target = None if MEAN in batch else einops.rearrange(batch[IMAGE].to(self.device).float(), "b h w c -> b c h w")
        return self(x, c, denoised_loss=reward.step(self.differentiable_decode_first_stage, c["c_concat"][0], target))

    def unit(self, hint: torch.Tensor, strength: float = 1.0, start: float = 0.0, end: float = 1.0,
             mode: str = "balanced", scales: list[float] | None = None) -> ControlUnit:
        """The model's own control network as a ControlUnit on `hint` (BCHW in [0, 1])."""
        return ControlUnit(self.control_model, hint, strength=strength, start=start, end=end, mode=mode,
                           global_average_pooling=self.global_average_pooling, scales=scales)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict,
                    sampling_step: tuple[int, int] | None = None) -> torch.Tensor:
        """eps (or v) with control from cond["c_concat"] (the own network, weighted by control_scales, as in
        the original) and the units of cond["control"].

        Every unit active at this sampling step contributes (their residuals add up: multi-ControlNet; controls
        acting inside the UNet act in the same forward); the units of one network are given to it together.
        """
        # The networks run in their weights' dtype (a bf16 / fp16 copy for inference); eps comes back in x's.
        unet = self.model.diffusion_model
        x, context = x_noisy.to(unet.dtype), cat_one(cond["c_crossattn"]).to(unet.dtype)
        # The vector of vector-conditioned bases (SDXL), under the original ldm's key; UNet and controls share it.
        y = cond.get("c_adm")
        units = list(cond.get("control") or [])
        if cond.get("c_concat") is not None:
            units.insert(0, self.unit(cat_one(cond["c_concat"]), scales=self.control_scales))
        given = contribution(units, sampling_step, x, t, context, y, unet)
        eps = unet(x=x, timesteps=t, context=context, control=given.residuals,
                   only_mid_control=self.only_mid_control, adapter=given.adapter(), y=y, hooks=given.hooks)
        return eps.to(x_noisy.dtype)

    def compile_denoiser(self, **kwargs) -> None:
        """torch.compile the UNet and the control network in place; kwargs go to torch.compile."""
        super().compile_denoiser(**kwargs)
        self.control_model.compile(**kwargs)

    def set_denoiser_dtype(self, dtype: torch.dtype) -> None:
        """The UNet and the control network in `dtype` (inference); the VAE and text encoder stay float32."""
        super().set_denoiser_dtype(dtype)
        self.control_model.to(dtype)

    def load_control(self, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike) -> LoadReport:
        """Load a control file of this model's mode (any of its layouts) over the base weights already in the
        model; the report names what it left unfilled and what the model does not use."""
        given = isinstance(state_dict_or_path, Mapping)
        state_dict = state_dict_or_path if given else load_state_dict(state_dict_or_path)
        if self.control_mode.layout(state_dict) is None:
            source = "the state dict" if given else state_dict_or_path
            raise UserError(f"{source} is not a {self.control_mode.name} file: expected {self.control_mode.files}")
        return self.control_mode.load(self, state_dict, None if given else read_metadata(state_dict_or_path))

    def control_state_dict(self) -> dict[str, torch.Tensor]:
        """The control-only file of this model (its mode's export): what training writes at the end."""
        return self.control_mode.export(self)

    @torch.no_grad()
    def log_images(self, batch: ControlItem, N: int = 4, n_row: int = 2, sample: bool = False, ddim_steps: int = 50,
                   ddim_eta: float = 0.0, unconditional_guidance_scale: float = 9.0, sampler: str = "ddim",
                   seed: int = 0) -> dict[str, torch.Tensor]:
        """Reconstruction, control, caption and samples for a batch, all in [-1, 1]; sample i from seed + i.

        `sample` adds samples without guidance; guided ones come with a scale above 1. While training with an
        EMA, the samples are of the EMA weights.
        """
        from cldm.pipeline import sample as sample_images  # the pipeline builds on this module

        log = {}
        z, c = self.get_input(batch, self.first_stage_key, bs=N)
        hint = c["c_concat"][0][:N]
        N = min(z.shape[0], N)
        prompts = list(batch[self.cond_stage_key][:N])
        log["reconstruction"] = self.decode_first_stage(z)
        log["control"] = hint * 2.0 - 1.0
        log["conditioning"] = log_txt_as_img((hint.shape[3], hint.shape[2]), prompts, size=16)
        units = [self.unit(hint, scales=self.control_scales)]
        run = dict(units=units, sampler=sampler, steps=ddim_steps, eta=ddim_eta, seed=seed)
        if self.vector_conditioned:  # the size conditioning the batch records (else its images' size), as trained
            sizes = self.batch_sizes(batch, N, z.shape[-2:])
            run |= dict(original_size=sizes[ORIGINAL_SIZE], crops_coords_top_left=sizes[CROP],
                        target_size=sizes[TARGET_SIZE])
        with self.ema_scope("Plotting"):  # the EMA weights, when training keeps them (as the original samples)
            if sample:
                log["samples"] = sample_images(self, prompts, cfg_scale=1.0, **run).tensors
            if unconditional_guidance_scale > 1.0:
                guided = sample_images(self, prompts, cfg_scale=unconditional_guidance_scale, **run).tensors
                log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = guided
        return log

    def low_vram_shift(self, is_diffusing: bool) -> None:
        """Keep only what the current phase needs on the accelerator: UNet+ControlNet, or VAE+text encoder."""
        if not hasattr(self, "_compute_device"):
            self._compute_device = next(self.model.parameters()).device
        if self._compute_device.type == "cpu":
            return
        diffusing, encoding = self._compute_device, torch.device("cpu")
        if not is_diffusing:
            diffusing, encoding = encoding, diffusing
        self.model.to(diffusing)
        self.control_model.to(diffusing)
        self.first_stage_model.to(encoding)
        self.conditioning_model.to(encoding)

"""LoRA-offset control (ControlLoRA v2): a ControlNet whose encoder copy is the UNet's own frozen weights plus
trainable low-rank offsets on every Linear and Conv2d; the hint block and the zero convs train in full.

The copy holds the UNet's Parameter objects (`LoRAControlNet.tie`), so no second encoder sits in memory or in
checkpoints. Files use Stability's control-lora layout, which ComfyUI loads: `<ldm module>.up` / `.down`
pairs, full hint block and zero convs, and a `lora_controlnet` marker key.
"""

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from cldm.cldm import ControlLDM, ControlNet, controlnet_params, hint_channels_of
from cldm.control import ControlMode
from cldm.diffusers_names import diffusers_module_names, rename_module
from cldm.model import CONTROL_PREFIX, LoadReport, load_checkpoint

# The parts of the ControlNet that copy the UNet: they take the UNet's tensors and carry the offsets.
SHARED_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
# ComfyUI (comfy/controlnet.py load_controlnet) treats a file holding this key as a control-lora.
MARKER = "lora_controlnet"
LORA_CONTROLNET_TARGET = "cldm.lora.LoRAControlNet"


class LoRAOffset(nn.Module):
    """A frozen layer's weight W and bias b plus a trainable offset: W + scale * up @ down.

    `down` (r, in[, k, k]) starts from N(0, std 1/r) and `up` (out, r[, 1, 1]) from zero, as diffusers' LoRA
    layers that ControlLoRA v2 uses, so at init the layer is exactly W. scale = alpha / r when an alpha is
    given, else 1. Rank 0 means no offset.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.alpha = alpha
        self.register_parameter("down", None)
        self.register_parameter("up", None)
        self.set_rank(rank)

    def set_rank(self, rank: int) -> None:
        """Give the offset rank `rank` (0: none), freshly initialised."""
        self.rank = rank
        self.scale = 1.0 if self.alpha is None or rank == 0 else self.alpha / rank
        trains = self.down.requires_grad if self.down is not None else True
        if rank == 0:
            self.down = self.up = None
            return
        w = self.weight
        # Before `tie` the weight is a meta placeholder; the offset then goes to the default device.
        factory = dict(device=None if w.is_meta else w.device, dtype=w.dtype)
        self.down = nn.Parameter(torch.randn(rank, *w.shape[1:], **factory) / rank, requires_grad=trains)
        self.up = nn.Parameter(torch.zeros(w.shape[0], rank, *(1,) * (w.dim() - 2), **factory),
                               requires_grad=trains)

    def fused_weight(self) -> torch.Tensor:
        """W + scale * up @ down, computed in float32 and returned in the weight's dtype."""
        if self.down is None:
            return self.weight
        offset = self.scale * self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.weight.float() + offset.reshape(self.weight.shape)).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, rank={self.rank}, scale={self.scale:g}"


class LoRALinear(LoRAOffset):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.down is None:
            return out
        # x -> r -> out costs r * (in + out) per token instead of building W + up @ down.
        return out + self.scale * F.linear(F.linear(x, self.down), self.up)


class LoRAConv2d(LoRAOffset):
    """`down` is a k x k conv with the layer's stride and padding, `up` a 1x1 conv: together up @ down."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"LoRA offsets need groups=1 and zero padding, got {base}")
        super().__init__(base, rank, alpha)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.down is None:
            return out
        low = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
        return out + self.scale * F.conv2d(low, self.up)


def check_offset_pair(name: str, weight: tuple[int, ...], up: tuple[int, ...], down: tuple[int, ...]) -> None:
    """Refuse an offset pair that cannot be the layer's offset up.flatten(1) @ down.flatten(1), as ComfyUI computes
    it: `up` (out, r[, 1, 1]) and `down` (r, in[, k, k]). A transposed `up` would otherwise reshape into place and
    steer with garbage."""
    out_channels, fan_in = weight[0], math.prod(weight[1:])
    rank = down[0] if len(down) >= 2 else None
    if rank is None or len(up) < 2 or (up[0], math.prod(up[1:])) != (out_channels, rank) \
            or math.prod(down[1:]) != fan_in:
        raise ValueError(f"{name}.up {tuple(up)} and {name}.down {tuple(down)} are not an offset of the layer's "
                         f"weight {tuple(weight)}: expected up ({out_channels}, r[, 1, 1]) and down (r, "
                         f"{', '.join(map(str, weight[1:]))}) (a transposed up?)")


class LoRAControlNet(ControlNet):
    """ControlNet whose encoder copy takes the UNet's tensors (`tie`) and adds LoRA offsets to them.

    Trainable: the hint block, the zero convs and the offsets. The copy's weights, biases and norms are the
    UNet's; a file may still replace some of them (Stability's files carry trained norms and biases), and
    those then become the copy's own frozen tensors ("overrides"). Its state_dict holds only its own tensors.
    """

    def __init__(self, image_size: int, hint_channels: int, lora_linear_rank: int = 32,
                 lora_conv_rank: int = 32, lora_alpha: float | None = None, cap_rank_at_channels: bool = False,
                 **spec):
        """`cap_rank_at_channels`: each layer's rank at most its input and output channels, as Stability's
        control-LoRA files have it (SDXL's input_blocks.0.0, 4 -> 320 channels, gets rank 4); ControlLoRA v2
        does not cap."""
        # The encoder copy is only a frame for the UNet's tensors, so it is built without memory.
        with torch.device("meta"):
            super().__init__(image_size, hint_channels, **spec)
        if self.dims != 2:
            raise ValueError(f"LoRA offsets are implemented for 2-D UNets, got dims={self.dims}")
        self.shared_names = [n for n, _ in self.named_parameters() if n.startswith(SHARED_PREFIXES)]
        self.overrides: set[str] = set()
        self.input_hint_block = self.make_hint_block(hint_channels, self.model_channels, self.dims)
        self.zero_convs = nn.ModuleList([self.make_zero_conv(z[0].in_channels) for z in self.zero_convs])
        self.middle_block_out = self.make_zero_conv(self.middle_block_out[0].in_channels)
        def rank(layer: nn.Linear | nn.Conv2d, configured: int) -> int:
            return min(configured, *layer.weight.shape[:2]) if cap_rank_at_channels else configured

        for name, layer in list(self.named_modules()):
            if name.startswith(SHARED_PREFIXES) and isinstance(layer, nn.Conv2d):
                self.set_submodule(name, LoRAConv2d(layer, rank(layer, lora_conv_rank), lora_alpha))
            elif name.startswith(SHARED_PREFIXES) and isinstance(layer, nn.Linear):
                self.set_submodule(name, LoRALinear(layer, rank(layer, lora_linear_rank), lora_alpha))
        self.register_state_dict_post_hook(LoRAControlNet._drop_shared)
        self.register_load_state_dict_pre_hook(LoRAControlNet._before_load)

    def lora_layers(self) -> Iterator[tuple[str, LoRAOffset]]:
        return ((n, m) for n, m in self.named_modules() if isinstance(m, LoRAOffset))

    def trainable_names(self) -> list[str]:
        """Hint block, zero convs and LoRA factors: every parameter that is not the UNet's or an override."""
        shared = set(self.shared_names)
        return [n for n, _ in self.named_parameters() if n not in shared]

    def _set_parameter(self, name: str, param: nn.Parameter) -> None:
        module_name, _, leaf = name.rpartition(".")
        setattr(self.get_submodule(module_name), leaf, param)

    def tie(self, source: nn.Module | Mapping[str, torch.Tensor]) -> "LoRAControlNet":
        """Use the UNet's own tensors for the copy: a UNet module, or its state dict (unprefixed)."""
        tensors = dict(source.named_parameters()) if isinstance(source, nn.Module) else source
        missing = [n for n in self.shared_names if n not in tensors]
        if missing:
            raise KeyError(f"The UNet lacks {len(missing)} tensors of the ControlNet's encoder copy, "
                           f"e.g. {missing[:3]}: it is not the UNet this control config describes")
        for name in self.shared_names:
            tensor, placeholder = tensors[name], self.get_parameter(name)
            if tensor.shape != placeholder.shape:
                raise ValueError(f"{name}: UNet has {tuple(tensor.shape)}, the control config wants "
                                 f"{tuple(placeholder.shape)}")
            param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
            self._set_parameter(name, param)
        self.overrides.clear()
        return self

    def override(self, name: str) -> None:
        """Give the copy its own frozen tensor for `name` instead of the UNet's (the value is loaded next)."""
        current = self.get_parameter(name)
        device = None if current.is_meta else current.device
        self._set_parameter(name, nn.Parameter(torch.empty(current.shape, dtype=current.dtype, device=device),
                                               requires_grad=False))
        self.overrides.add(name)

    def _take_overrides(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Override each copy tensor that `state_dict` gives another value than the UNet's; equal ones stay
        shared."""
        for name in self.shared_names:
            value = state_dict.get(prefix + name)
            if value is None or name in self.overrides:
                continue
            current = self.get_parameter(name)
            # Compared in the file's dtype, so a half-precision copy of the UNet's own values stays shared.
            if current.is_meta or not torch.equal(value.to(current.device), current.to(value.dtype)):
                self.override(name)

    def _drop_shared(self, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        # The UNet's tensors are saved once, under the UNet.
        for name in self.shared_names:
            if name not in self.overrides:
                state_dict.pop(prefix + name, None)

    def _before_load(self, state_dict: dict, prefix: str, *args) -> None:
        # Runs before the children load; the UNet (registered before the control model) is loaded already.
        self._take_overrides(state_dict, prefix)
        for name in self.shared_names:
            if name not in self.overrides:
                # The UNet's own tensor: copying a tensor onto itself is a no-op, and strict loads see no gap.
                state_dict.setdefault(prefix + name, self.get_parameter(name))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Stability's control-lora layout: `<module>.up` (alpha folded in) / `.down`, every 1-d tensor of the
        copy whole (norms and biases: the UNet's, or the overrides), hint block, zero convs and the
        `lora_controlnet` marker. ComfyUI fills everything else from its UNet; sd-webui-controlnet tells SD1.x
        from SDXL files by a norm weight (`input_blocks.11.0.in_layers.0.weight`), so the norms must be there."""
        out = dict(self.state_dict())
        out |= {name: self.get_parameter(name).detach() for name in self.shared_names
                if self.get_parameter(name).dim() == 1}
        for name, layer in self.lora_layers():
            if layer.up is not None and layer.scale != 1.0:
                out[f"{name}.up"] = layer.up.detach() * layer.scale
        out[MARKER] = torch.tensor([])
        return out

    def fused_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain ControlNet's state dict (ldm names, no prefix) with W + up @ down in every offset layer."""
        factors = {f"{n}.{f}" for n, _ in self.lora_layers() for f in ("down", "up")}
        out = {n: p.detach() for n, p in self.named_parameters() if n not in factors}
        out |= {f"{n}.weight": layer.fused_weight().detach() for n, layer in self.lora_layers()}
        return out

    def adopt_ranks(self, weights: dict[str, torch.Tensor]) -> None:
        """Give every offset layer the rank of its pair in `weights`, the pair reshaped to the layer's shapes;
        a pair whose up @ down does not give the layer's weight raises ValueError naming it.

        A kind of layer (Linear or Conv2d) with no pair at all in the file gets rank 0: ControlLoRA v2 trains
        conv offsets only on request.
        """
        layers = dict(self.lora_layers())
        for kind in (LoRALinear, LoRAConv2d):
            of_kind = [n for n, m in layers.items() if isinstance(m, kind)]
            if not any(f"{n}.down" in weights for n in of_kind):
                for n in of_kind:
                    layers[n].set_rank(0)
        for name, layer in layers.items():
            down, up = weights.get(f"{name}.down"), weights.get(f"{name}.up")
            if down is None or up is None:
                continue
            check_offset_pair(name, layer.weight.shape, up.shape, down.shape)
            if down.shape[0] != layer.rank:
                layer.set_rank(down.shape[0])
            weights[f"{name}.down"] = down.reshape(layer.down.shape)
            # Files hold the effective offset (ComfyUI applies up @ down as is), so the scale comes back out.
            weights[f"{name}.up"] = up.reshape(layer.up.shape) / layer.scale

    def load_lora(self, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
        """Load a control-lora state dict in any supported layout; offset ranks follow the file."""
        weights = to_ldm_names(state_dict, self)
        self.adopt_ranks(weights)
        self._take_overrides(weights)
        shared = set(self.shared_names) - self.overrides
        return load_checkpoint(self, {k: v for k, v in weights.items() if k not in shared})


def to_ldm_names(state_dict: Mapping[str, torch.Tensor], net: LoRAControlNet) -> dict[str, torch.Tensor]:
    """A control-lora state dict in our names (ldm, no prefix) from any supported layout:

    ours / Stability's (`<module>.up`/`.down`, marker), a Lightning checkpoint or whole model
    (`control_model.*`), or ControlLoRA v2's diffusers names (`<module>.lora_layer.{down,up}.weight`,
    `controlnet_*`).
    """
    weights = {k: v for k, v in state_dict.items() if k != MARKER}
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}
    if prefixed:
        return prefixed
    if not any(".lora_layer." in k or k.startswith("controlnet_cond_embedding.") for k in weights):
        return weights
    table = {new: old for old, new in diffusers_module_names(net).items()}
    out = {}
    for key, value in weights.items():
        key = key.replace(".lora_layer.down.weight", ".down").replace(".lora_layer.up.weight", ".up")
        out[rename_module(key, table)] = value
    return out


class ControlLoRAMode(ControlMode):
    """Control-LoRA files: ours and Stability's (the `lora_controlnet` marker), ControlLoRA v2's diffusers names
    (`*.lora_layer.*`), or offset pairs under a ControlNet's names (a LoRA-mode model's state dict). The network
    is a LoRAControlNet tied to the loaded model's UNet, its ranks those of the file."""

    name = "control-lora"
    files = (f"a control-LoRA (the {MARKER!r} marker, ControlLoRA v2's *.lora_layer.* names, or .down/.up offset "
             "pairs under a ControlNet's names)")

    def layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        keys = {k.removeprefix(CONTROL_PREFIX) for k in state_dict}
        if MARKER in keys:
            return "control-lora"
        if any(".lora_layer." in k for k in keys):
            return "ControlLoRA v2"
        if any(k.startswith(SHARED_PREFIXES) and k.endswith(".down") and f"{k[:-5]}.up" in keys for k in keys):
            return "offset pairs"
        return None

    def network(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module, config: DictConfig,
                recorded: Mapping[str, str] | None = None) -> LoRAControlNet:
        unet = model.model.diffusion_model
        with torch.device(next(unet.parameters()).device):
            net = LoRAControlNet(**controlnet_params(config, hint_channels_of(state_dict))).tie(unet)
        report = net.load_lora(state_dict)
        if not report.ok:
            raise ValueError(f"its weights do not match: {report}")
        return net

    def export(self, model: "LoRAControlLDM") -> dict[str, torch.Tensor]:
        """The small file: offsets, hint block, zero convs, marker (Stability's control-lora layout)."""
        return model.control_model.lora_state_dict()

    def load(self, model: "LoRAControlLDM", state_dict: Mapping[str, torch.Tensor],
             recorded: Mapping[str, str] | None = None) -> LoadReport:
        report = model.control_model.load_lora(state_dict)
        return LoadReport([CONTROL_PREFIX + k for k in report.missing], report.unexpected)


CONTROL_LORA = ControlLoRAMode()


class LoRAControlLDM(ControlLDM):
    """ControlLDM in LoRA-offset mode: the control model is a LoRAControlNet tied to this model's UNet.

    Only the hint block, the zero convs and the offsets require grad. Checkpoints hold the UNet once; the
    control file (`control_state_dict`) is Stability's control-lora layout.
    """

    control_mode = CONTROL_LORA
    # Everything the control model saves starts fresh, so a plain SD checkpoint is a complete initial one.
    fresh_prefixes = (CONTROL_PREFIX,)

    def make_control_model(self, control_stage_config: Any) -> LoRAControlNet:
        """The config's LoRAControlNet, tied to this model's UNet, with only its own tensors trainable."""
        if control_stage_config.get("target") != LORA_CONTROLNET_TARGET:
            raise ValueError(f"LoRAControlLDM needs control_stage_config target {LORA_CONTROLNET_TARGET}, got "
                             f"{control_stage_config.get('target')}")
        net = LoRAControlNet(**control_stage_config.get("params", {})).tie(self.model.diffusion_model)
        trainable = set(net.trainable_names())
        for name, p in net.named_parameters():
            p.requires_grad_(name in trainable)
        return net

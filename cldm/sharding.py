"""Sharded training (tutorial_train --strategy fsdp): FSDP2 through Lightning's ModelParallelStrategy.

Only what trains is sharded. Each block of the control network (and of the UNet where it trains) that holds
trainable parameters becomes one FSDP2 unit (`torch.distributed.fsdp.fully_shard`) over every rank; its
parameters, their gradients and the optimizer's moments exist on each rank as a 1/N shard, all-gathered for
the block's forward and backward and reduce-scattered after. The frozen base (UNet, VAE, text encoders, and a
LoRA copy's tied weights) stays whole on every rank as plain tensors: it has no gradient or optimizer state to
shard, and sharding its weights would cost two all-gathers of the whole base per step for a saving that
`--frozen_dtype bf16` mostly gives already (docs/train.md has the arithmetic).

Why FSDP2 and not Lightning's FSDPStrategy (FSDP1): FSDP2 shards per parameter, so frozen and trainable
tensors in one block need no flat-parameter workaround (FSDP1 allocates gradients for a whole flat parameter
once any of it trains), a state dict is plain DTensors that torch.distributed.checkpoint saves and reshards
to any world size, and it runs on CPU with gloo (FSDP1 requires an accelerator), so it is tested here.

Checkpoints are folders (one file per rank plus Lightning's `meta.pt`), written beside the target and
renamed into place; `ldm.checkpoint.read_checkpoint` reads them as one state dict, so tool_eval_control.py and
`--resume_path` take them as they take a file.
"""

import importlib.util
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.strategies import DeepSpeedStrategy, ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.tensor import DTensor

from ldm.checkpoint import UserError, move_into_place, new_temp

log = logging.getLogger(__name__)

# --strategy names tutorial_train gives to its own FSDP2 strategy; every other name goes to Lightning as is.
FSDP_STRATEGIES = {"fsdp": False, "fsdp_cpu_offload": True}  # name -> parameters, gradients and moments on CPU


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data parallelism over every rank (no tensor parallelism): the
    LightningModule's `configure_model` calls `shard` to make its trainable blocks FSDP2 units."""

    def __init__(self, cpu_offload: bool = False, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=True, **kwargs)
        self.cpu_offload = cpu_offload
        self.roots: list[nn.Module] = []  # the sharded networks

    def setup_environment(self) -> None:
        # every rank in the one data-parallel dimension (ModelParallelStrategy's default gives it one per node)
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def shard(self, networks: Iterable[nn.Module]) -> list[str]:
        """Shard the trainable blocks of `networks` over the data-parallel ranks (see shard_trainable)."""
        self.roots = [network for network in networks if trains(network)]
        return shard_trainable(self.lightning_module, self.roots, self.device_mesh["data_parallel"], self.cpu_offload)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        # FSDP2 makes the first unit to run forward the root of the units inside it. A network is the root of its
        # blocks even when one of them runs alone first (the hint block, encoded once for a whole sampling run).
        for network in self.roots:
            network._get_fsdp_state()._lazy_init()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """The sharded folder is written beside `filepath` and moved into place (ldm.checkpoint.move_into_place): a
        save killed halfway leaves the previous checkpoint whole, and its temp folder is removed by the next."""
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(new_temp(path, folder=True)) if self.is_global_zero else None))
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every rank's shard is on disk
        if self.is_global_zero:
            move_into_place(tmp, path)
        self.barrier()


def make_strategy(name: str) -> str | Strategy:
    """Lightning's `strategy` for a --strategy name: ours for fsdp / fsdp_cpu_offload, else the name itself."""
    if name in FSDP_STRATEGIES:
        return ShardedDataParallel(cpu_offload=FSDP_STRATEGIES[name])
    return name


def check_strategy(name: str, accelerator: str, optimizer: str) -> None:
    """Refuse, before anything is built, a strategy that cannot run as asked."""
    if name.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"--strategy {name} needs DeepSpeed", "pip install deepspeed (docs/train.md)")
        if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
            raise UserError(f"--strategy {name}: Lightning's DeepSpeedStrategy runs on CUDA GPUs only",
                            "on CPUs, shard with --strategy fsdp")
    if name in FSDP_STRATEGIES and optimizer == "adamw8bit":
        raise UserError(f"--strategy {name} with --optimizer adamw8bit: bitsandbytes' 8-bit AdamW cannot update "
                        "FSDP's sharded parameters (DTensors)",
                        "shard with plain AdamW (the moments are sharded too), or use adamw8bit with --strategy ddp")


def shards_weights(strategy: Strategy) -> bool:
    """Whether the strategy splits weights across ranks, so that one rank alone cannot run the model."""
    if isinstance(strategy, ModelParallelStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get("stage") == 3


def trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def sharding_units(networks: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP2 units, inner ones first: every element of a ModuleList in a network (transformer blocks, the input
    and output blocks, the zero convs) and every child of a network that holds trainable parameters, then the
    network itself for what they leave. Each unit all-gathers its weights in its own forward, so a unit is a
    module that is called, never one whose parameters are read from outside; the largest unit bounds the weights
    held whole at a time."""
    units = []
    for network in networks:
        if not trains(network):
            continue
        blocks = {id(m) for parent in network.modules() if isinstance(parent, nn.ModuleList) for m in parent}
        blocks |= {id(m) for m in network.children()}
        units += [m for m in inner_first(network) if id(m) in blocks and trains(m) and not isinstance(m, nn.ModuleList)]
        units.append(network)
    return units


def inner_first(module: nn.Module) -> Iterator[nn.Module]:
    """The modules under `module` (not itself), each after the modules inside it."""
    for child in module.children():
        yield from inner_first(child)
        yield child


def shard_trainable(model: nn.Module, networks: Iterable[nn.Module], mesh: Any, cpu_offload: bool = False
                    ) -> list[str]:
    """fully_shard each sharding unit of `networks` over `mesh`, its frozen parameters left out (whole on every
    rank, shared ones untouched); returns the units' names. Every trainable parameter of `model` must end up in
    a unit, or its gradient would never be averaged across ranks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    frozen = {p for p in model.parameters() if not p.requires_grad}
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    names = {m: name for name, m in model.named_modules()}
    units = sharding_units(networks)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=frozen, offload_policy=offload)
    left = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise UserError(f"--strategy fsdp: {len(left)} trainable tensors lie outside the sharded networks "
                        f"(e.g. {left[0]}), so their gradients would not be averaged across ranks",
                        "train this model with --strategy ddp")
    log.info("FSDP: %d units shard %d trainable tensors over %d ranks; %d frozen tensors stay whole on every rank",
             len(units), sum(p.requires_grad for p in model.parameters()), mesh.size(), len(frozen))
    return [names[u] for u in units]


def full_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every sharded tensor gathered whole, on the CPU (a collective: every rank calls it, in
    the same order); other tensors as they are."""
    return {k: v.full_tensor().detach().cpu() if isinstance(v, DTensor) else v for k, v in state_dict.items()}

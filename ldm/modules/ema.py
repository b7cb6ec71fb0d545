"""Exponential moving average (EMA) of the trained weights, kept in the optimizer's state.

The original ldm keeps `LitEma`, a module of buffers shadowing the whole diffusion model. Here the average of
each trained tensor sits in the optimizer's state for that tensor (key "ema"), beside Adam's moments:
- only what trains has one: the frozen base has no optimizer state, so no average either;
- every strategy already saves, restores and shards that state with its tensor (DDP; FSDP2, where the average is
  a DTensor sharded as its parameter; the carry-over by name when the trainable set changes on resume);
- it is updated right after each optimizer step (a step post-hook), so a step that is skipped (a non-finite loss,
  a float16 overflow) moves it no more than the weights.

A tensor joins at its first update, its average starting from the weight before that update (as the original's
LitEma starts from the weights it is built on), and its decay warms up as LitEma's: min(decay, (1 + n) / (10 + n))
at its n-th update. Until then the weight has not moved, so it is its own average.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

EMA_KEY, UPDATES_KEY = "ema", "ema_updates"  # per-parameter optimizer state: the average, its update count


class OptimizerEma:
    """The EMA of the parameters an optimizer updates, with decay `decay` (0.9999 in the original ldm)."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (e.g. 0.9999), got {decay}")
        self.decay = decay
        self.before: dict[torch.Tensor, torch.Tensor] = {}  # weights about to get their first update

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the averages after each of the optimizer's steps."""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.keep_first_weights(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update(opt))

    @torch.no_grad()
    def keep_first_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """The weights of tensors without an average, which this step may update (the average starts from them;
        it cannot go into the optimizer's state yet, which the optimizer starts when it finds it empty). Gradients
        are not known yet: Lightning's step computes them inside."""
        self.before = {p: p.detach().clone() for group in optimizer.param_groups for p in group["params"]
                       if EMA_KEY not in optimizer.state.get(p, {})}

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer) -> None:
        before, self.before = self.before, {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if all(p.grad is None for p in params):  # a skipped step (a non-finite loss): Lightning still steps
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if EMA_KEY not in optimizer.state.get(p, {}):
                    if p not in before or torch.equal(before[p], p):  # not updated yet (no gradient so far)
                        continue
                    optimizer.state[p].update({EMA_KEY: before[p], UPDATES_KEY: 0})
                state = optimizer.state[p]
                state[UPDATES_KEY] += 1
                n = state[UPDATES_KEY]
                state[EMA_KEY].lerp_(p.detach(), 1.0 - min(self.decay, (1 + n) / (10 + n)))

    @staticmethod
    def averaged(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its average) for every parameter that has one."""
        return [(p, optimizer.state[p][EMA_KEY]) for group in optimizer.param_groups for p in group["params"]
                if EMA_KEY in optimizer.state.get(p, {})]

    @staticmethod
    @contextmanager
    def swapped(optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The averages in place of the weights (one tensor's copy at a time), the weights back afterwards, bit
        for bit."""
        pairs = OptimizerEma.averaged(optimizer)
        swap_values(pairs)
        try:
            yield
        finally:
            swap_values(pairs)

    @staticmethod
    def drop(optimizer: torch.optim.Optimizer) -> int:
        """Remove every average (a run resumed without EMA); returns how many there were."""
        states = [s for s in optimizer.state.values() if EMA_KEY in s]
        for state in states:
            del state[EMA_KEY], state[UPDATES_KEY]
        return len(states)


@torch.no_grad()
def swap_values(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for a, b in pairs:
        held = a.detach().clone()
        a.copy_(b)
        b.copy_(held)

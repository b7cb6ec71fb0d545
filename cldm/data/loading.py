"""From a reader to Lightning's training loop: the data module (sharding across nodes, ranks and workers),
aspect-ratio bucket batches, skipping bad samples with a count, and the caption report.

Sharding is explicit rather than Lightning's sampler injection (the Trainer runs with
use_distributed_sampler=False): map-style readers get a distributed sampler, buckets a batch sampler that deals
whole batches to ranks, and streams shard themselves (litdata). Every loader's position goes into Lightning's
checkpoints, so a run resumes mid-epoch exactly: torchdata's StatefulDataLoader with stateful samplers for
map-style readers, litdata's StreamingDataLoader for streams.
"""
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from litdata import StreamingDataLoader
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from cldm.data.base import PairedImageDataset
from cldm.data.batch import SKIPPED, ControlItem, ItemCheck
from cldm.data.images import BadSampleError
from cldm.data.shards import ShardDataset

log = logging.getLogger(__name__)
warn = rank_zero_only(log.warning)

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
MAX_CONSECUTIVE_BAD = 32  # a skipping reader gives up after this many bad samples in a row: the data is broken


class DieWithParent:
    """A DataLoader's worker_init_fn: the worker is killed when the process that made the loader dies (Linux), so
    a kill -9 of a tool or a training run leaves no worker behind, blocked on a full pipe and holding its memory.
    `then(worker_id)` runs after, e.g. Lightning's worker seeding."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.parent, self.then = os.getpid(), then

    def __call__(self, worker_id: int) -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("DataLoader worker %d may outlive a killed parent: prctl failed (errno %d)", worker_id,
                            ctypes.get_errno())
            if os.getppid() != self.parent:  # it died before the signal was set
                os._exit(1)
        if self.then is not None:
            self.then(worker_id)


class SkipBadSamples(Dataset):
    """A reader whose bad samples (BadSampleError) are logged, counted and replaced by the next good one of the
    same group (the same bucket, so a batch keeps one size)."""

    def __init__(self, dataset: PairedImageDataset, groups: list[int] | None = None) -> None:
        self.dataset, self.groups = dataset, groups

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> ControlItem:
        skipped, j = 0, idx
        while True:
            try:
                return {**self.dataset[j], SKIPPED: skipped}
            except BadSampleError as err:
                skipped += 1
                log.warning("skipped bad sample %d: %s", j, err)
                if skipped >= min(MAX_CONSECUTIVE_BAD, len(self.dataset)):
                    raise BadSampleError(f"{skipped} bad samples in a row (the last: {err}); the data set looks "
                                         "broken, not just a few files") from None
                j = self._next(j)

    def _next(self, j: int) -> int:
        n = len(self.dataset)
        for step in range(1, n):
            k = (j + step) % n
            if self.groups is None or self.groups[k] == self.groups[j]:
                return k
        return j


def warn_if_moved(saved: dict, layout: dict[str, int]) -> None:
    """Say so when a loader resumes mid-epoch under another layout of the data than its position was saved in
    (sample count, ranks, seed, batch size): the rest of that epoch is then not what an uninterrupted run would
    get. Positions saved before the layout was recorded are taken as they are."""
    changed = [f"{key} {saved[key]} -> {value}" for key, value in layout.items()
               if key in saved and saved[key] != value]
    if changed:
        warn("Resuming mid-epoch with other data settings than the checkpoint's (%s): the rest of epoch %d may repeat "
             "or leave out samples; the epochs after it are whole. Resume with the same data, --seed, --batch_size "
             "and number of ranks for an exact continuation", ", ".join(changed), saved["epoch"])


def resume_point(epoch: int, yielded: int, length: int) -> tuple[int, int]:
    """Where a loader resumes from a checkpoint taken after `yielded` of an epoch's `length` items: the same
    epoch there, or, when the epoch was finished, the start of the next (not an empty epoch Lightning would
    count)."""
    return (epoch, yielded) if yielded < length else (epoch + 1, 0)


class ResumableSampler(StatefulDistributedSampler):
    """Each rank's part of a map-style reader, shuffled per epoch by (seed, epoch) as DistributedSampler does,
    whose state (the epoch and how far into it) torchdata's StatefulDataLoader keeps in Lightning's checkpoints:
    a run resumed mid-epoch goes on with the very samples an uninterrupted run would get, even before Lightning
    sets the epoch (loader workers fetch ahead as soon as the loader is resumed)."""

    def layout(self) -> dict[str, int]:
        return {"samples": len(self.dataset), "ranks": self.num_replicas, "seed": self.seed}

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "epoch": self.epoch, **self.layout()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, yielded = resume_point(state_dict["epoch"], state_dict[self._YIELDED], len(self))
        if yielded:
            warn_if_moved(state_dict, self.layout())
        self.set_epoch(epoch)
        super().load_state_dict({self._YIELDED: yielded})


class EpochCounter:
    """The epoch Lightning sets on `batch_sampler.sampler` (set_epoch) each epoch, read by BucketBatchSampler."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class BucketBatchSampler:
    """Batches drawn from one aspect-ratio bucket each, shuffled per epoch by (seed, epoch), dealt to ranks in
    turn; every rank gets the same number of batches (the few left over are dropped, a new order each epoch).
    Its state (the epoch and the batches taken) resumes as ResumableSampler's does."""

    def __init__(self, groups: list[int], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 valid: list[bool] | None = None) -> None:
        self.groups, self.batch_size, self.rank, self.world_size, self.seed = groups, batch_size, rank, world_size, seed
        self.valid = valid
        self.sampler = EpochCounter()
        self.yielded = self.start = 0

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.sampler.epoch])
        pending: dict[int, list[int]] = {}
        batches = []
        for idx in rng.permutation(len(self.groups)).tolist():
            if self.valid is not None and not self.valid[idx]:
                continue
            bucket = pending.setdefault(self.groups[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        batches += [b for b in pending.values() if b]  # partial batches, one per bucket
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_rank = len(batches) // self.world_size
        self.yielded, self.start = self.start, 0
        for batch in batches[self.rank:per_rank * self.world_size:self.world_size][self.yielded:]:
            self.yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self._all_batches()) // self.world_size

    def layout(self) -> dict[str, int]:
        return {"samples": len(self.groups), "ranks": self.world_size, "seed": self.seed,
                "batch_size": self.batch_size}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "yielded": self.yielded, **self.layout()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.epoch, self.start = resume_point(state_dict["epoch"], state_dict["yielded"], len(self))
        if self.start:
            warn_if_moved(state_dict, self.layout())


class TrainData(pl.LightningDataModule):
    """The training loader of a reader, built once the Trainer knows this process's rank and world size."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0,
                 skip_bad: bool = False, held_out: DataLoader | None = None) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.skip_bad = skip_bad
        self.held_out = held_out

    def val_dataloader(self) -> DataLoader | list:
        """The held-out samples of --val_data for Lightning's validation loop (none without it)."""
        return self.held_out if self.held_out is not None else []

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer  # set by Lightning when the module is given to Trainer.fit
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        check = ItemCheck(type(self.dataset).__name__)  # names the reader of a wrong item at the first batch
        # Lightning seeds the workers only when no worker_init_fn is set; PL_SEED_WORKERS is how
        # seed_everything(workers=True) asks for it
        seeding = partial(pl_worker_init_function, rank=rank) if os.environ.get("PL_SEED_WORKERS") == "1" else None
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=check,
                       worker_init_fn=DieWithParent(seeding))
        if isinstance(self.dataset, ShardDataset):
            return StreamingDataLoader(self.dataset.for_this_process(), batch_size=self.batch_size,
                                       num_workers=self.num_workers, collate_fn=check,
                                       worker_init_fn=DieWithParent(seeding))
        groups, valid = None, None
        if isinstance(self.dataset, PairedImageDataset) and self.dataset.resize.buckets is not None:
            groups, valid = self._bucket_groups()
        dataset = SkipBadSamples(self.dataset, groups) if self.skip_bad else self.dataset
        if groups is not None:
            batches = BucketBatchSampler(groups, self.batch_size, rank, world, self.seed, valid)
            return StatefulDataLoader(dataset, batch_sampler=batches, **workers)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **workers)

    def _bucket_groups(self) -> tuple[list[int], list[bool]]:
        """Each sample's bucket (numbered in order of first appearance) from its header; unreadable ones are
        refused, or left out when skipping."""
        position: dict[tuple[int, int], int] = {}
        groups, valid = [], []
        for i in range(len(self.dataset)):
            try:
                bucket = self.dataset.resize.output_size(self.dataset.target_size(i))
                groups.append(position.setdefault(bucket, len(position)))
                valid.append(True)
            except BadSampleError as err:
                if not self.skip_bad:
                    raise
                log.warning("skipped bad sample %d: %s", i, err)
                groups.append(-1)
                valid.append(False)
        counts = np.bincount([g for g in groups if g >= 0], minlength=len(position))
        log.info("aspect-ratio buckets: %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(zip(position, counts))))
        return groups, valid


class SkippedSamples(pl.Callback):
    """Sums the bad samples skipped in training (the `skipped` of each batch) over steps and ranks; logs the
    running count as data/skipped_samples and the total at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if isinstance(batch, dict) and SKIPPED in batch:
            self.count += int(torch.as_tensor(batch[SKIPPED]).sum())
            pl_module.log("data/skipped_samples", float(self.count), on_step=True, on_epoch=False, reduce_fx="sum",
                          sync_dist=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total = int(trainer.strategy.reduce(torch.tensor(float(self.count), device=pl_module.device),
                                                 reduce_op="sum"))
        if trainer.is_global_zero and self.total:
            log.warning("skipped %d bad samples in training (--skip_bad_samples); each is named above", self.total)
        elif trainer.is_global_zero:
            log.info("no bad samples were met in training (--skip_bad_samples)")


def report_captions(dataset: PairedImageDataset, count_tokens: Callable[[str], int] | None = None,
                    max_tokens: int | None = None, shown: int = 10) -> dict[str, int]:
    """Log captions that are empty or longer than the text encoder reads, by where they come from; returns the
    counts. (Captions that are not UTF-8 are refused when the reader opens them.)"""
    empty, long = [], []
    lengths: dict[str, int] = {}
    sources = set()  # a sample repeated in an epoch (kohya's num_repeats) is reported once
    for i in range(len(dataset)):
        source = dataset.caption_source(i)
        if source in sources:
            continue
        sources.add(source)
        caption = dataset.caption(i)
        if not caption.strip():
            empty.append(i)
        elif count_tokens is not None and max_tokens is not None:
            if caption not in lengths:
                lengths[caption] = count_tokens(caption)
            if lengths[caption] > max_tokens:
                long.append(i)
    for i in empty[:shown]:
        log.warning("empty caption: %s", dataset.caption_source(i))
    for i in long[:shown]:
        log.warning("caption of %d tokens, the text encoder reads %d (the rest is cut): %s",
                    lengths[dataset.caption(i)], max_tokens, dataset.caption_source(i))
    for kind, found in (("empty captions", empty), ("captions too long", long)):
        if len(found) > shown:
            log.warning("%d more %s not listed", len(found) - shown, kind)
    return {"empty": len(empty), "too_long": len(long)}


def sample_error_message(err: ValueError) -> str:
    """The reader's own message of a BadSampleError or BatchKeyError, also when a DataLoader worker raised it (the
    loader re-raises it in the main process with the worker's traceback as its text, the message on the last
    line)."""
    text = str(err).strip()
    last = text.splitlines()[-1] if text else text
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else text

"""The training loader of every command: one stream of batches across epochs.

Folder datasets are sampled with a :class:`DistributedSampler` per epoch; shard datasets split
themselves across ranks and workers (:mod:`fcmae.shards`). Either way a single loader iterator
serves the whole run, so loader workers prepare the next epoch's first batches while the
current epoch trains (no stall at the epoch boundary), and every epoch has exactly the batches
the engine takes from it. Which samples and augmentations an epoch gets depends only on
(seed, epoch): a resumed run continues exactly.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from . import distributed
from .data import DataError


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` for epochs ``start, start + 1, …``: each epoch reshuffles
    ``sampler`` and yields ``batches_per_epoch`` whole batches (the remainder is dropped)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, batches_per_epoch: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.start_epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The first epoch of the stream, and how many of its first batches to leave out (a run
        resumed from a mid-epoch checkpoint); set before the loader iterator is made."""
        self.start_epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in itertools.count(self.start_epoch):
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for batch in range(self.skip_batches if epoch == self.start_epoch else 0, self.batches_per_epoch):
                yield [(epoch, index) for index in indices[batch * self.batch_size:(batch + 1) * self.batch_size]]


def make_train_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                      seed: int, accum_iter: int = 1, steps_per_epoch: int | None = None) -> DataLoader:
    """A loader whose ``len()`` is the batches of one epoch — a whole number of optimizer steps
    (``accum_iter`` batches each), at most ``steps_per_epoch`` — and whose iterator runs on
    through the following epochs (see :class:`BatchStream`). Pinned memory on CUDA."""
    world = distributed.world_size()
    if isinstance(dataset, IterableDataset):
        dataset.check_workers(num_workers)
        natural, multiple = dataset.samples_per_rank() // batch_size, math.lcm(accum_iter, max(1, num_workers))
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=True,
                                     seed=seed, drop_last=True)
        natural, multiple = len(sampler) // batch_size, accum_iter
    batches = natural // multiple * multiple
    if steps_per_epoch:
        batches = min(batches, steps_per_epoch * accum_iter // multiple * multiple or multiple)
    if batches == 0:
        raise DataError(f"the data holds fewer than {multiple} batch(es) of {batch_size} per process "
                        f"({world} process(es)); lower --batch-size or --accum-iter")
    # the loader's own generator: starting workers never draws from the global RNG that masks
    # use, so a resumed run continues exactly
    options = dict(num_workers=num_workers, pin_memory=device.type == "cuda",
                   generator=torch.Generator().manual_seed(seed))
    if isinstance(dataset, IterableDataset):
        dataset.plan_epochs(batches)
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, **options)
    return DataLoader(dataset, batch_sampler=EpochBatchSampler(sampler, batch_size, batches), **options)


class BatchStream:
    """The training batches of a run from batch ``start_batch`` of ``start_epoch`` on, out of
    one iterator of ``loader``: ``len()`` is the batches of one (whole) epoch; each ``iter()``
    continues where the last epoch stopped, so workers have the next epoch's first batches
    ready at the boundary."""

    def __init__(self, loader: DataLoader, start_epoch: int, start_batch: int = 0) -> None:
        for part in (loader.batch_sampler, loader.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(start_epoch, start_batch)
        self._batches_per_epoch = len(loader)
        self._iterator = iter(loader)

    def __len__(self) -> int:
        return self._batches_per_epoch

    def __iter__(self) -> Iterator:
        return self._iterator

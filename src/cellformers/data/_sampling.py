"""Reproducible, resumable minibatch order for training."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from scvi import settings
from scvi.dataloaders import BatchDistributedSampler, DataSplitter
from torch.utils.data import DataLoader, Dataset


def derive_seed(*keys: int) -> int:
    """Return a 32-bit seed that is a fixed function of non-negative integer ``keys``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_random_states(seed: int) -> None:
    """Seed the global random states of Python, NumPy and torch with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global state is what code without a generator uses
    torch.manual_seed(seed)


class SeededBatchSampler(BatchDistributedSampler):
    """Minibatches of a permutation fixed by ``(seed, epoch)``, each with its own random seed.

    The order of an epoch depends only on ``seed`` and the epoch (set by Lightning through
    :meth:`set_epoch`), so a run can restart in the middle of an epoch: ``skip_batches`` leaves
    out the first batches of the first iteration. Every batch is yielded as
    ``(batch_seed, positions)``, where ``batch_seed`` is a function of ``(seed, epoch, batch,
    rank)`` that :class:`SeededBatches` uses to seed the random draws of loading and
    tokenizing that batch (in whichever process loads it). Under multi-process training each
    rank reads its own shard, as :class:`~scvi.dataloaders.BatchDistributedSampler`.

    Parameters
    ----------
    dataset
        The dataset to sample from.
    batch_size
        Cells per minibatch (per rank).
    seed
        Seed of the order and of the per-batch seeds.
    drop_last
        Drop the last, smaller minibatch of each epoch.
    drop_dataset_tail
        Under multi-process training, drop the tail of the data instead of padding it so that
        every rank reads the same number of cells.
    start_epoch
        Epoch of the first iteration.
    skip_batches
        Batches of the first iteration to leave out (those a resumed run has already trained on).

    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        drop_dataset_tail: bool = False,
        start_epoch: int = 0,
        skip_batches: int = 0,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            drop_dataset_tail=drop_dataset_tail,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self.set_epoch(start_epoch)
        self._skip = skip_batches

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for i, positions in enumerate(super().__iter__()):
            if i >= skip:
                yield derive_seed(self.seed, self.epoch, i, self.rank), positions


class SeededBatches(Dataset):
    """Dataset of whole minibatches that seeds the random states before loading each one.

    Indexed with the ``(batch_seed, positions)`` pairs of :class:`SeededBatchSampler`; the
    random draws of the collate function that follows (e.g. a random gene subset) therefore
    depend on the batch alone, in the main process as in DataLoader workers.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        batch_seed, positions = item
        seed_random_states(batch_seed)
        return self.dataset[positions]


class ResumableDataSplitter(DataSplitter):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter` with a reproducible training order.

    The training loader draws its minibatches with :class:`SeededBatchSampler`, so the order
    and every random draw made while loading a batch are functions of ``seed``, the epoch and
    the batch; :meth:`resume_at` makes the next training loader start in the middle of an
    epoch. Validation and test loaders are scvi-tools' own.

    Parameters
    ----------
    adata_manager
        The registered AnnData.
    seed
        Seed of the training order; `None` draws one from torch's global random state.
    **kwargs
        Passed to :class:`~scvi.dataloaders.DataSplitter`.

    """

    def __init__(self, adata_manager, *, seed: int | None = None, **kwargs) -> None:
        super().__init__(adata_manager, **kwargs)
        self.seed = int(torch.randint(2**31 - 1, ()).item()) if seed is None else int(seed)
        self._start = (0, 0)

    def resume_at(self, *, seed: int, epoch: int, batches_done: int) -> None:
        """Start the next training loader at batch ``batches_done`` of ``epoch`` under ``seed``."""
        self.seed = int(seed)
        self._start = (int(epoch), int(batches_done))

    def train_dataloader(self) -> DataLoader:
        """Training loader in the order of :class:`SeededBatchSampler`."""
        kwargs = dict(self.data_loader_kwargs)
        batch_size = kwargs.pop("batch_size", None) or settings.batch_size
        kwargs.pop("distributed_sampler", None)  # the sampler shards by itself under DDP
        drop_dataset_tail = kwargs.pop("drop_dataset_tail", False)
        dataset = self.adata_manager.create_torch_dataset(
            indices=self.train_idx,
            data_and_attributes=kwargs.pop("data_and_attributes", None),
            load_sparse_tensor=self.load_sparse_tensor,
        )
        epoch, skip = self._start
        self._start = (0, 0)
        sampler = SeededBatchSampler(
            dataset,
            batch_size=batch_size,
            seed=self.seed,
            drop_last=self.drop_last,
            drop_dataset_tail=drop_dataset_tail,
            start_epoch=epoch,
            skip_batches=skip,
        )
        kwargs.setdefault("num_workers", settings.dl_num_workers)
        kwargs.setdefault("persistent_workers", settings.dl_persistent_workers)
        return DataLoader(
            SeededBatches(dataset),
            sampler=sampler,
            batch_size=None,
            pin_memory=self.pin_memory,
            **kwargs,
        )

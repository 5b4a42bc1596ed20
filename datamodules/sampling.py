"""The training order: a function of (seed, epoch) only, sharded per rank, resumable mid-epoch.

A run stopped anywhere (pre-emption, ``--ckpt_path last`` after a crash, a mid-epoch validation
checkpoint) resumes with exactly the batches an uninterrupted run would have seen next:

- ``EpochShuffleSampler`` draws the epoch's permutation (and one augmentation seed per sample) from
  (seed, epoch) alone, shards it over DDP ranks itself, and can start ``skip`` positions into its
  shard.
- ``ResumableTrainOrder`` (a LightningDataModule mixin) records in every checkpoint how many training
  batches of which epoch were done, and builds the resumed run's sampler at that position and epoch.
  The epoch is given to the sampler at construction: with loader workers, Lightning starts the first
  iterator of a process before it calls ``set_epoch``, so a sampler that waited for ``set_epoch``
  would replay epoch 0's order after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

STATE_KEY = "train_order"


class EpochShuffleSampler(DistributedSampler):
    """Yields an order that depends only on (seed, epoch): ``(index, augmentation seed)`` pairs, or indices.

    A loader-held generator would continue its stream across epochs, so a run resumed at epoch k
    would see another order than one that never stopped; per-sample augmentation seeds make the
    pixels independent of worker count and prefetching too. Under DDP it shards the epoch's order
    itself (padded like DistributedSampler), so Lightning uses it as is instead of wrapping it, and
    every rank sees fresh augmentation each epoch.

    Args:
        size: Samples in the dataset.
        seed: Seed of the order.
        augmentation_seeds: Yield ``(index, seed)`` pairs for per-sample augmentation; else indices.
        epoch: The first epoch this sampler is iterated for (a resumed run's epoch).
        skip: Positions of this rank's shard to leave out of the first iteration of ``epoch``
            (the samples a resumed run has already trained on).
    """

    def __init__(self, size: int, seed: int, augmentation_seeds: bool = True, epoch: int = 0,
                 skip: int = 0) -> None:  # noqa: D107 - no dataset / process group needed
        self.size, self.seed, self.epoch = size, seed, epoch
        self.augmentation_seeds = augmentation_seeds
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        self.num_replicas = dist.get_world_size() if ready else 1
        self.rank = dist.get_rank() if ready else 0
        self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.shuffle, self.drop_last = True, False
        self._skip = (epoch, skip) if skip > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[Any]:
        """This rank's full shard of ``epoch``."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        order = torch.randperm(self.size, generator=gen).tolist()
        if self.augmentation_seeds:
            aug = torch.randint(0, 2**62, (self.size,), generator=gen).tolist()
            items: list[Any] = list(zip(order, aug, strict=True))
        else:
            items = order
        items += items[: self.total_size - self.size]  # equal shards on every rank
        return items[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        items = self.order(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            items = items[self._skip[1]:]
        self._skip = None  # later epochs (and a repeated iteration) start at their beginning
        return iter(items)


class ResumableDataLoader(DataLoader):
    """The train loader of a ``ResumableTrainOrder`` datamodule.

    The datamodule positions the sampler before this loader is built (from its own checkpoint
    state, at an epoch's end as well as mid-epoch), so the loader has nothing to add; being
    stateful tells Lightning that a mid-epoch checkpoint resumes reliably.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ResumableTrainOrder:
    """Mixin for LightningDataModules whose train loader uses ``EpochShuffleSampler``.

    ``state_dict`` (saved by Lightning in every checkpoint) records the epoch, the training batches
    done in it and what the position means (dataset size, batch size, world size); ``load_state_dict`` keeps it
    for ``resume_sampler``, which the next ``train_dataloader`` call uses.
    """

    _resume_order: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        fit_loop = trainer.fit_loop
        total = int(trainer.num_training_batches) if trainer.num_training_batches != float("inf") else -1
        done = int(fit_loop.epoch_loop.batch_progress.current.processed)
        if fit_loop.epoch_progress.current.processed > trainer.current_epoch:
            done = total  # the epoch is over (also when it ended early): the next one starts afresh
        return {STATE_KEY: {
            "epoch": int(trainer.current_epoch),
            "batches_done": done,
            "epoch_batches": total,
            "train_size": int(self._train_size()),
            "batch_size": int(self.batch_size),
            "world_size": int(trainer.world_size),
        }}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_order = dict(state[STATE_KEY]) if STATE_KEY in state else None

    def _train_size(self) -> int:
        return len(self._dataset("train"))  # every datamodule of this suite builds its splits in _dataset

    def resume_sampler(self, size: int, seed: int, augmentation_seeds: bool = True) -> EpochShuffleSampler:
        """The train sampler: at the checkpoint's epoch and position after a restore, else at epoch 0."""
        saved, self._resume_order = self._resume_order, None
        if saved is None:
            return EpochShuffleSampler(size, seed, augmentation_seeds)
        if (saved["train_size"], saved["batch_size"]) != (size, self.batch_size):
            raise ValueError(
                f"The checkpoint was written with {saved['train_size']} training samples in batches of "
                f"{saved['batch_size']}, but this run has {size} in batches of {self.batch_size}; resume "
                "with the data settings (data.init_args) that wrote it."
            )
        done, total = saved["batches_done"], saved["epoch_batches"]
        if total >= 0 and done >= total:  # saved at the end of an epoch: the next one starts afresh
            return EpochShuffleSampler(size, seed, augmentation_seeds, epoch=saved["epoch"] + 1)
        sampler = EpochShuffleSampler(size, seed, augmentation_seeds, epoch=saved["epoch"], skip=done * self.batch_size)
        if saved.get("world_size", 1) != sampler.num_replicas:
            raise ValueError(
                f"The checkpoint was written mid-epoch by {saved.get('world_size', 1)} processes, but this run "
                f"has {sampler.num_replicas}; resume on as many devices (trainer.devices x trainer.num_nodes), "
                "or from a checkpoint written at an epoch's end."
            )
        return sampler


def eval_sampler(datamodule: Any, split: str, dataset: Any) -> UnrepeatedDistributedSampler | None:
    """This rank's unpadded, in-order share of an evaluation split under DDP; None in one process.

    Lightning would otherwise wrap the loader in a DistributedSampler, which pads the shares to
    equal length with repeated samples that metrics synced over ranks then count twice. Being a
    DistributedSampler, this one is used as is. Uneven shares are safe in evaluation: DDP syncs
    buffers at most on the first forward without gradients, and torchmetrics states and gathered
    outputs accept any number of batches per rank, but every rank needs a batch.
    """
    trainer, size = datamodule.trainer, len(dataset)
    world_size = int(trainer.world_size) if trainer is not None else 1
    if world_size <= 1 or size == 0:
        return None
    if size < world_size:
        raise ValueError(
            f"the {split} split of {type(datamodule).__name__} has {size} sample(s) but the run has "
            f"{world_size} processes, and each needs at least one; give the {split} split at least "
            f"{world_size} samples or run on fewer devices (trainer.devices x trainer.num_nodes)."
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=int(trainer.global_rank), shuffle=False)

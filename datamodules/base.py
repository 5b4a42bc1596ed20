"""The base LightningDataModule of every image-classification dataset.

Subclasses read labels and class names cheaply in ``__init__`` (so LightningCLI can link
``num_classes`` / ``class_names`` / ``task`` / ``channels`` into the model) and implement
``_load_splits``, which returns the pixels of each split; this class does the rest: low-data
subsets, transforms, seeded loaders and logging.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.sampling import ResumableDataLoader, ResumableTrainOrder, eval_sampler
from datamodules.splits import check_low_data_args, low_data_subset

log = logging.getLogger("medpeft")

#: How a val / test split drawn by fractions gets samples of every class (``_check_eval_classes``).
FRACTION_REMEDY = "a larger {split}_fraction or another seed"

SPLITS = ("train", "val", "test")
TASKS = ("multiclass", "multilabel", "binary")


def usable_cores() -> int:
    """Cores this process may use (``sched_getaffinity`` honours SLURM / taskset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers when ``num_workers`` is None: ``min(4, cores - 1)``, but 0 on <= 2 cores.

    Cores are those this process may use (``sched_getaffinity`` honours SLURM / taskset). One
    core is left to the training process; on <= 2 cores workers would only compete with it.
    """
    cores = usable_cores()
    return 0 if cores <= 2 else min(4, cores - 1)


@dataclass
class SplitData:
    """The pixels and targets of one split, as handed from a subclass to the base class.

    Attributes:
        images: uint8 array [N, C, H, W], [N, H, W] or [N, H, W, C] (set ``channels_last``), or the
            path of such a ``.npy`` file, opened lazily as a memmap in each loader process.
        labels: Class index per sample [n], or multi-hot [n, K] for multi-label.
        ids: One string id per sample [n].
        rows: Row of ``images`` per sample [n]; None means ``arange(n)``.
        valid: Optional bool per sample; False rows (unreadable files) are dropped after subsetting.
        channels_last: Whether 4-D ``images`` are [N, H, W, C].
        groups: Optional int per sample (e.g. skin type), yielded as the batch key ``"group"`` so
            that metrics can be reported per group.
    """

    images: np.ndarray | str
    labels: np.ndarray
    ids: Sequence[str]
    rows: np.ndarray | None = None
    valid: np.ndarray | None = None
    channels_last: bool = False
    groups: np.ndarray | None = None


class ImageDataset(Dataset):
    """Yields ``{"image": uint8 [C, H, W], "label", "id"}`` (+ ``"group"``) from an array or memmap."""

    def __init__(self, data: SplitData, transform: Callable, multilabel: bool) -> None:
        self.data = data
        self.rows = data.rows if data.rows is not None else np.arange(len(data.labels))
        self.transform = transform
        self.labels = torch.as_tensor(data.labels, dtype=torch.float32 if multilabel else torch.int64)
        self.groups = None if data.groups is None else torch.as_tensor(data.groups, dtype=torch.int64)
        self._images = data.images if isinstance(data.images, np.ndarray) else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # A memmap would be pickled as a full copy into spawned workers; reopen it there instead.
        state = self.__dict__.copy()
        if not isinstance(self.data.images, np.ndarray):
            state["_images"] = None
        return state

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # Training samplers yield (index, augmentation seed): the random crop/flip of a sample then
        # depends on (seed, epoch, index) alone, not on workers, prefetching or resumption.
        i, aug_seed = key if isinstance(key, tuple) else (key, None)
        if self._images is None:
            self._images = np.load(self.data.images, mmap_mode="r")
        img = torch.from_numpy(np.array(self._images[self.rows[i]], dtype=np.uint8))
        if img.ndim == 2:
            img = img[None]
        elif self.data.channels_last:
            img = img.permute(2, 0, 1)
        if aug_seed is None:
            img = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (the transforms draw from it): torch.manual_seed would also
                # queue lazy CUDA / XPU / MTIA seeding, each capturing a stack trace, ~0.8 ms per image.
                torch.default_generator.manual_seed(aug_seed)
                img = self.transform(img)
        item = {"image": img, "label": self.labels[i], "id": str(self.data.ids[i])}
        if self.groups is not None:
            item["group"] = self.groups[i]
        return item


class ImageClassificationDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Base of all image-classification data modules (batches of uint8 images, not normalised).

    Args:
        batch_size: Samples per batch.
        num_workers: Loader worker processes; None picks ``default_num_workers()``.
        image_size: Side of the square images in a batch.
        seed: Seed of splits, low-data subsets and loader shuffling.
        train_fraction: Fraction in (0, 1] of the training split to keep (stratified, nested).
        shots_per_class: Keep k training samples per class (k-shot); excludes ``train_fraction``.
        augment: Random resized crop (scale 0.7-1) + horizontal flip on the training split.
        pin_memory: Pin loader memory; None means when CUDA is available.
    """

    #: Set by subclasses in ``__init__``.
    num_classes: int
    class_names: list[str]
    task: str
    channels: int

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int = 224,
        seed: int = 42,
        train_fraction: float = 1.0,
        shots_per_class: int | None = None,
        augment: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size={batch_size} and image_size={image_size} must both be >= 1.")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers={num_workers} is negative; pass 0 or more, or null for auto.")
        check_low_data_args(train_fraction, shots_per_class)
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        self.seed = seed
        self.train_fraction = train_fraction
        self.shots_per_class = shots_per_class
        self.augment = augment
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.split_sizes: dict[str, int] = {}
        self.subset_counts: dict[str, int] = {}
        self.train_subset: np.ndarray | None = None
        self._datasets: dict[str, ImageDataset] = {}

    # ------------------------------------------------------------------ for subclasses
    def _set_classes(self, class_names: Sequence[str], task: str, channels: int) -> None:
        """Records the class metadata (call from the subclass ``__init__``)."""
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not one of {TASKS}.")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
        if len(class_names) < 2:
            raise ValueError(f"found {len(class_names)} class ({list(class_names)}); at least 2 are needed.")
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.task = task
        self.channels = channels

    def _set_train_labels(self, labels: np.ndarray) -> None:
        """Chooses the low-data training subset now, so bad settings fail in ``__init__``."""
        self.train_subset = low_data_subset(
            labels, self.train_fraction, self.shots_per_class, self.seed, self.class_names
        )

    def _load_splits(self) -> dict[str, SplitData]:
        """Returns the pixels of ``train`` / ``val`` / ``test`` (train in ``_set_train_labels`` order)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Builds the three datasets once (all stages share them)."""
        if self._datasets:
            return
        splits = self._load_splits()
        train = splits["train"]
        if self.train_subset is not None:
            train = _take(train, self.train_subset)
        splits["train"] = train
        multilabel = self.task == "multilabel"
        for name, data in splits.items():
            if data.valid is not None:
                data = _take(data, np.flatnonzero(data.valid))
            tf = self._train_transform() if name == "train" and self.augment else self._eval_transform()
            self._datasets[name] = ImageDataset(data, tf, multilabel)
        self.split_sizes = {name: len(ds) for name, ds in self._datasets.items()}
        labels = self._datasets["train"].labels.numpy()
        counts = labels.sum(0) if multilabel else np.bincount(labels, minlength=self.num_classes)
        self.subset_counts = {c: int(n) for c, n in zip(self.class_names, counts, strict=True)}
        log.info(
            "%s: split sizes %s (train_fraction=%s, shots_per_class=%s, seed=%d); train per class %s",
            type(self).__name__,
            self.split_sizes,
            self.train_fraction,
            self.shots_per_class,
            self.seed,
            self.subset_counts,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from (seed, epoch); drops a last batch of one sample (BatchNorm).

        After a restore the order continues at the checkpoint's epoch and batch (``ResumableTrainOrder``).
        """
        ds = self._dataset("train")
        drop_last = len(ds) > self.batch_size and len(ds) % self.batch_size == 1
        # The order and augmentation follow the data seed and the training seed (seed_everything),
        # so runs over several training seeds see different orders on the same split.
        seed = self.seed * 1_000_003 + int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = self.resume_sampler(len(ds), seed)
        return self._loader(ds, sampler=sampler, drop_last=drop_last, loader=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        """The val split in order; under DDP each rank evaluates its own share (``sampling.eval_sampler``)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split in order; under DDP each rank evaluates its own share (``sampling.eval_sampler``)."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order; batches carry ``id`` for writing predictions."""
        return self._loader(self._dataset("test"))

    # ------------------------------------------------------------------ helpers
    def _train_transform(self) -> Callable:
        s = self.image_size
        return v2.Compose(
            [v2.RandomResizedCrop((s, s), scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    def _eval_transform(self) -> Callable:
        return v2.Resize((self.image_size, self.image_size), antialias=True)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._dataset(split)
        return self._loader(ds, sampler=eval_sampler(self, split, ds))

    def _check_eval_classes(
        self, labels: Mapping[str, np.ndarray], remedy: str = FRACTION_REMEDY
    ) -> None:
        """Raises a ValueError when a non-empty val or test split lacks a class (call after ``_set_classes``).

        torchmetrics scores a class without samples as AUROC 0 and averages it into the macro AUROC.

        Args:
            labels: Class index per sample (or multi-hot rows) of the ``val`` and ``test`` splits.
            remedy: How this dataset's split gets more classes, with ``{split}`` for the split's name.
        """
        for split in ("val", "test"):
            lab = np.asarray(labels[split])
            if len(lab) == 0:
                continue
            # Multi-hot labels: a label without positive samples is the missing class.
            if lab.ndim == 2:
                counts = lab.sum(0)
            else:
                counts = np.bincount(lab.astype(np.int64), minlength=self.num_classes)
            missing = [c for c, n in zip(self.class_names, counts, strict=True) if n == 0]
            if missing:
                raise ValueError(
                    f"the {split} split of {type(self).__name__} ({len(lab)} samples) has no sample of "
                    f"class(es) {missing}, whose AUROC would count as 0 in the macro average; give the "
                    f"{split} split samples of every class ({remedy.format(split=split)}), or merge or "
                    "drop those classes."
                )

    def _dataset(self, split: str) -> ImageDataset:
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def _loader(self, ds: Dataset, loader: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        # Eval workers stay alive across val loops; re-forking them each time is slow.
        kwargs.setdefault("persistent_workers", self.num_workers > 0)
        return loader(
            ds,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )


def _take(data: SplitData, idx: np.ndarray) -> SplitData:
    """The samples ``idx`` of a split (keeps the image storage shared)."""
    rows = data.rows if data.rows is not None else np.arange(len(data.labels))
    return SplitData(
        images=data.images,
        labels=np.asarray(data.labels)[idx],
        ids=[data.ids[i] for i in idx],
        rows=rows[idx],
        valid=None if data.valid is None else data.valid[idx],
        channels_last=data.channels_last,
        groups=None if data.groups is None else np.asarray(data.groups)[idx],
    )

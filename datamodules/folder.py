"""Image files on disk: class sub-folders (``ImageFolderDataModule``) or a CSV (``CSVDataModule``).

Files are listed and labelled in ``__init__`` (cheap: no decoding); ``prepare_data`` / ``setup``
decode them once into the memmap cache of ``datamodules.cache`` (see there for the resize policy).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules import cache
from datamodules.base import FRACTION_REMEDY, SPLITS, ImageClassificationDataModule, SplitData
from datamodules.splits import stratified_split

log = logging.getLogger("medpeft")

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# BUSI ships "<name>_mask.png" (and "<name>_mask_1.png" for a second lesion) beside each image.
_MASK = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)


class _FileDataModule(ImageClassificationDataModule):
    """Shared part of the file-based modules: split, channels, cache and the ``SplitData``."""

    _kind = "files"
    #: Optional int per file, yielded as the batch key ``"group"`` (set by subclasses).
    sample_groups: np.ndarray | None = None

    def _init_files(
        self,
        files: list[Path],
        labels: np.ndarray,
        ids: list[str],
        class_names: Sequence[str],
        splits: dict[str, np.ndarray],
        channels: int | None,
        eval_remedy: str = FRACTION_REMEDY,
    ) -> None:
        self.files, self.ids, self.labels, self.splits = files, ids, labels, splits
        self._image_cache: cache.ImageCache | None = None
        channels = cache.image_channels(files[0]) if channels is None else channels
        self._set_classes(class_names, "binary" if len(class_names) == 2 else "multiclass", channels)
        train_counts = np.bincount(labels[splits["train"]], minlength=len(class_names))
        if not train_counts.all():
            # A class without training samples cannot be learnt; its metrics would be meaningless.
            empty = [c for c, n in zip(class_names, train_counts, strict=True) if n == 0]
            raise ValueError(
                f"class(es) {empty} have no training samples after the split ({type(self).__name__}); "
                "drop or merge those classes, or change seed, val_fraction or test_fraction."
            )
        self._check_eval_classes({s: labels[splits[s]] for s in ("val", "test")}, eval_remedy)
        self._set_train_labels(labels[splits["train"]])

    def _cache(self) -> cache.ImageCache:
        # Memoised: prepare_data and setup both need it, and skipped files are warned about once.
        if self._image_cache is None:
            self._image_cache = cache.build_or_load(
                self._kind, self.files, self.image_size, self.channels, self.cache_dir, self.skip_corrupt
            )
        return self._image_cache

    def prepare_data(self) -> None:
        """Decodes the images into the cache (once per node, before ``setup`` on every rank)."""
        self._cache()

    def _load_splits(self) -> dict[str, SplitData]:
        c = self._cache()
        return {
            s: SplitData(
                images=str(c.path),
                labels=self.labels[idx],
                ids=[self.ids[i] for i in idx],
                rows=idx,
                valid=c.valid[idx],
                groups=None if self.sample_groups is None else self.sample_groups[idx],
            )
            for s, idx in self.splits.items()
        }


class ImageFolderDataModule(_FileDataModule):
    """Images in class sub-folders, ``root/<class>/**/<image>``, with a seeded stratified split.

    Files whose stem ends with ``_mask`` (segmentation masks, as in BUSI) are skipped. Class names
    are the sorted sub-folder names; two classes make a "binary" task.

    Args:
        root: Folder holding one sub-folder per class.
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        extensions: Image file suffixes to include (case-insensitive).
        channels: 1 or 3; None infers it from the first image (grayscale -> 1).
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable images with one warning instead of raising.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "folder"

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        extensions: Sequence[str] = EXTENSIONS,
        channels: int | None = None,
        cache_dir: str | None = None,
        skip_corrupt: bool = False,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int = 224,
        seed: int = 42,
        train_fraction: float = 1.0,
        shots_per_class: int | None = None,
        augment: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            seed=seed,
            train_fraction=train_fraction,
            shots_per_class=shots_per_class,
            augment=augment,
            pin_memory=pin_memory,
        )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder root {self.root} does not exist; point root at the dataset folder."
            )
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(
                f"{self.root} has no class sub-folders; expected {self.root}/<class name>/<image files>."
            )
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        files, labels = [], []
        for cls, d in enumerate(class_dirs):
            found = sorted(
                p
                for p in d.rglob("*")
                if p.suffix.lower() in exts and not _MASK.search(p.stem) and p.is_file()
            )
            if not found:
                raise ValueError(
                    f"class folder {d} holds no images with extensions {sorted(exts)}; add images or remove it."
                )
            files += found
            labels += [cls] * len(found)
        ids = [p.relative_to(self.root).as_posix() for p in files]
        labels = np.asarray(labels, dtype=np.int64)
        self.cache_dir, self.skip_corrupt = cache_dir, skip_corrupt
        splits = _fraction_split(labels, val_fraction, test_fraction, seed, None)
        self._init_files(files, labels, ids, [d.name for d in class_dirs], splits, channels)


class CSVDataModule(_FileDataModule):
    """Images listed in a CSV with a label per row; optional official or grouped split.

    Args:
        csv_path: The CSV file.
        image_root: Folder that relative paths are resolved against; None means the CSV's folder.
        path_column: Column with image paths.
        label_column: Column with class names (single-label).
        split_column: Optional column with ``train`` / ``val`` / ``test`` per row (official split);
            when set, ``val_fraction`` / ``test_fraction`` are ignored.
        group_column: Optional patient / lesion id column: a group never spans two splits.
        class_names: Class order (index = position); None means the sorted label values. Labels
            not in it raise an error.
        val_fraction, test_fraction, channels, cache_dir, skip_corrupt: as in ``ImageFolderDataModule``.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "csv"

    def __init__(
        self,
        csv_path: str,
        image_root: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        split_column: str | None = None,
        group_column: str | None = None,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        channels: int | None = None,
        cache_dir: str | None = None,
        skip_corrupt: bool = False,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int = 224,
        seed: int = 42,
        train_fraction: float = 1.0,
        shots_per_class: int | None = None,
        augment: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            seed=seed,
            train_fraction=train_fraction,
            shots_per_class=shots_per_class,
            augment=augment,
            pin_memory=pin_memory,
        )
        self.csv_path = Path(csv_path).expanduser()
        if not self.csv_path.is_file():
            raise FileNotFoundError(
                f"CSV file {self.csv_path} does not exist; point csv_path at the label table."
            )
        df = pd.read_csv(self.csv_path, dtype=str, keep_default_na=False)
        wanted = [c for c in (path_column, label_column, split_column, group_column) if c is not None]
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            raise ValueError(
                f"{self.csv_path} lacks the columns {missing} (has {list(df.columns)}); set the *_column arguments."
            )
        if df.empty:
            raise ValueError(f"{self.csv_path} has no rows; add one row per image.")
        values = df[label_column].str.strip()
        if class_names is None:
            class_names = sorted(values.unique())
        unknown = sorted(set(values) - set(class_names))
        if unknown:
            raise ValueError(
                f"{self.csv_path} column '{label_column}' has labels {unknown[:5]} not in class_names "
                f"{list(class_names)}; add them to class_names or fix the CSV."
            )
        labels = values.map({c: i for i, c in enumerate(class_names)}).to_numpy(np.int64)
        base = Path(image_root).expanduser() if image_root is not None else self.csv_path.parent
        files = [p if p.is_absolute() else base / p for p in map(Path, df[path_column])]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {self.csv_path} do not exist, e.g. {absent[0]}; "
                "set image_root to the folder the paths are relative to."
            )
        splits, groups = None, None
        if group_column is not None:
            groups = df[group_column].to_numpy()
        if split_column is not None:
            split_of = df[split_column].str.strip().str.lower()
            bad = sorted(set(split_of) - set(SPLITS))
            if bad:
                raise ValueError(
                    f"{self.csv_path} column '{split_column}' has values {bad[:5]}; use train, val or test."
                )
            splits = {s: np.flatnonzero(split_of.to_numpy() == s) for s in SPLITS}
            if groups is not None:
                _warn_group_leak(groups, splits, self.csv_path)
        self.cache_dir, self.skip_corrupt = cache_dir, skip_corrupt
        remedy = FRACTION_REMEDY
        if splits is None:
            splits = _fraction_split(labels, val_fraction, test_fraction, seed, groups)
        else:
            remedy = f"rows of every class marked '{{split}}' in column '{split_column}' of {self.csv_path}"
        self._init_files(files, labels, df[path_column].tolist(), class_names, splits, channels, remedy)


def _fraction_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int, groups: np.ndarray | None
) -> dict[str, np.ndarray]:
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum to "
            "less than 1 so that training samples remain."
        )
    fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    return stratified_split(labels, fractions, seed, groups=groups)


def _warn_group_leak(groups: np.ndarray, splits: dict[str, np.ndarray], where: Path) -> None:
    """An official split may put one patient in two splits: say so, since it inflates test scores."""
    seen_in: dict[str, set[str]] = {}
    for s, idx in splits.items():
        for g in set(groups[idx]):
            seen_in.setdefault(g, set()).add(s)
    leaked = sorted(g for g, where_g in seen_in.items() if len(where_g) > 1)
    if leaked:
        log.warning("%s: %d group(s) appear in more than one split (e.g. %s).", where, len(leaked), leaked[0])


def read_table(path: Path, required: Sequence[str], source: str) -> pd.DataFrame:
    """Reads a dataset's CSV (``.csv`` or ``.csv.gz``) as strings and checks its columns.

    Args:
        path: The table.
        required: Columns it must have.
        source: Where the table comes from, named in errors (e.g. "the HAM10000 download, https://...").
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected {path.name} from {source}.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path} as a CSV table ({err}); re-download it from {source}.") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the columns {missing} (has {list(df.columns)[:12]}); expected the {path.name} "
            f"of {source}."
        )
    if df.empty:
        raise ValueError(f"{path} has no rows; re-download it from {source}.")
    return df

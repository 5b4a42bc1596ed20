"""Fitzpatrick17k clinical skin images (Groh et al. 2021), with per-skin-type groups.

Download: the label table ``fitzpatrick17k.csv`` from https://github.com/mattgroh/fitzpatrick17k;
the images are fetched from the ``url`` column (the repository's download script) and saved as
``<md5hash>.jpg``. Expected tree::

    fitzpatrick17k.csv   md5hash, fitzpatrick_scale, fitzpatrick_centaur, label,
                         nine_partition_label, three_partition_label, qc, url, url_alphanum
    images/<md5hash>.jpg (or pass image_dir; without images/ the JPGs may sit beside the CSV)

Some URLs are dead, so rows whose image is absent are dropped with one warning that counts them;
the class list is that of the rows kept. Batches carry ``"group"``: the Fitzpatrick skin type 1-6
(-1 unknown), so test metrics can be reported per skin type (``group_names``, ``group_key``). The
dataset has no patient ids; the split is stratified by label and seeded (grouped by ``md5hash``,
so a duplicated row never spans two splits).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from datamodules.folder import _FileDataModule, _fraction_split, read_table

log = logging.getLogger("medpeft")

FITZ_URL = "https://github.com/mattgroh/fitzpatrick17k"
LABEL_COLUMNS = {"three": "three_partition_label", "nine": "nine_partition_label", "all": "label"}
SKIN_TYPE_COLUMNS = ("fitzpatrick_scale", "fitzpatrick_centaur")
SKIN_TYPES = (1, 2, 3, 4, 5, 6, -1)


class Fitzpatrick17kDataModule(_FileDataModule):
    """Fitzpatrick17k at the 3-, 9- or 114-class level; batches also hold the skin type.

    Args:
        root: Folder holding ``fitzpatrick17k.csv``.
        label_level: ``three`` (benign / malignant / non-neoplastic), ``nine`` or ``all`` (114).
        image_dir: Folder of ``<md5hash>.jpg``; None means ``root/images`` if it exists, else root.
        skin_type_column: ``fitzpatrick_scale`` (annotators, the default) or ``fitzpatrick_centaur``.
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        channels: 3 (RGB) or 1.
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable images with one warning instead of raising.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "fitzpatrick17k"
    #: Batch key of the skin type, and a name per skin type value.
    group_key = "group"
    group_names = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", -1: "unknown"}

    def __init__(
        self,
        root: str,
        label_level: str = "three",
        image_dir: str | None = None,
        skin_type_column: str = "fitzpatrick_scale",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        channels: int = 3,
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
        if label_level not in LABEL_COLUMNS:
            raise ValueError(f"label_level={label_level!r} is not one of {list(LABEL_COLUMNS)}.")
        if skin_type_column not in SKIN_TYPE_COLUMNS:
            raise ValueError(
                f"skin_type_column={skin_type_column!r} is not one of {list(SKIN_TYPE_COLUMNS)}."
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Fitzpatrick17k root {self.root} does not exist; download fitzpatrick17k.csv and its "
                f"images from {FITZ_URL} and point root at the folder holding the CSV."
            )
        label_col = LABEL_COLUMNS[label_level]
        csv = self.root / "fitzpatrick17k.csv"
        df = read_table(
            csv, ["md5hash", skin_type_column, label_col], f"the Fitzpatrick17k repository ({FITZ_URL})"
        )
        if image_dir is not None:
            self.image_dir = Path(image_dir).expanduser()
        else:
            self.image_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"Fitzpatrick17k image folder {self.image_dir} does not exist; set image_dir."
            )
        skin = _skin_types(df[skin_type_column].tolist(), csv, skin_type_column)
        hashes = df["md5hash"].str.strip().tolist()
        values = df[label_col].str.strip().to_numpy()
        if (values == "").any():
            first = hashes[int(np.argmax(values == ""))]
            raise ValueError(
                f"{csv} has an empty '{label_col}' (e.g. md5hash {first}); fix or remove that row."
            )
        on_disk = {p.stem for p in self.image_dir.iterdir() if p.suffix.lower() == ".jpg"}
        present = np.array([h in on_disk for h in hashes], dtype=bool)
        if not present.any():
            raise FileNotFoundError(
                f"none of the {len(hashes)} images of {csv} is in {self.image_dir} (expected <md5hash>.jpg); "
                f"download them with the script of {FITZ_URL} or set image_dir."
            )
        if not present.all():
            warnings.warn(
                f"Fitzpatrick17k: {int((~present).sum())} of {len(hashes)} rows of {csv.name} have no image in "
                f"{self.image_dir} and are dropped.",
                stacklevel=2,
            )
        keep = np.flatnonzero(present)
        values, skin = values[keep], skin[keep]
        hashes = [hashes[i] for i in keep]
        class_names = sorted(set(values))
        labels = np.searchsorted(class_names, values).astype(np.int64)
        self.label_level, self.skin_type_column = label_level, skin_type_column
        self.cache_dir, self.skip_corrupt = cache_dir, skip_corrupt
        #: Skin type per image (yielded as the batch key ``"group"``).
        self.sample_groups = skin
        self.split_groups = np.asarray(hashes)
        splits = _fraction_split(labels, val_fraction, test_fraction, seed, self.split_groups)
        files = [self.image_dir / f"{h}.jpg" for h in hashes]
        self._init_files(files, labels, hashes, class_names, splits, channels)


def _skin_types(raw: list[str], csv: Path, column: str) -> np.ndarray:
    """Integer skin types; empty / non-numeric / out-of-range values raise naming the value."""
    try:
        skin = np.array([int(float(v)) for v in raw], dtype=np.int64)
    except ValueError as err:
        raise ValueError(
            f"{csv} column '{column}' has a non-numeric value ({err}); expected 1-6 or -1."
        ) from err
    bad = sorted(set(skin.tolist()) - set(SKIN_TYPES))
    if bad:
        raise ValueError(f"{csv} column '{column}' has values {bad[:5]}; expected 1-6 or -1 (unknown).")
    return skin

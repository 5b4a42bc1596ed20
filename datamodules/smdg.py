"""SMDG-19: the Standardized Multi-Channel Dataset for Glaucoma (Kiefer et al.), fundus images.

Download: https://www.kaggle.com/datasets/deathtrooper/multichannel-glaucoma-benchmark-dataset
(images of 19 public glaucoma datasets, renamed ``<source>-<n>``). Expected tree::

    metadata - standardized.csv    names, types (0 non-glaucoma, 1 glaucoma, -1 suspect),
                                   original_name, patient_id, ...
    full-fundus/full-fundus/<names>.png   (or full-fundus/<names>.png)

Binary (non-glaucoma / glaucoma) by default, suspects excluded; ``include_suspects`` makes them a
third class. Rows whose image is absent are dropped with one warning that counts them.

Patient grouping rule (images of one patient never span two splits): the source is ``names``
without its trailing ``-<n>``. A row with a ``patient_id`` (e.g. PAPILA) belongs to patient
``<source>/<patient_id>``; an OIA-ODIR row whose ``original_name`` is ``<id>_left.jpg`` /
``<id>_right.jpg`` belongs to ``OIA-ODIR/<id>`` (both eyes of one patient, across the ODIR parts);
any other image is its own group, since the other sources publish no patient ids.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.folder import _FileDataModule, _fraction_split, read_table

log = logging.getLogger("medpeft")

SMDG_URL = "https://www.kaggle.com/datasets/deathtrooper/multichannel-glaucoma-benchmark-dataset"
SMDG_CSV = "metadata - standardized.csv"
_SOURCE = re.compile(r"^(.*?)-\d+$")
_ODIR_NAME = re.compile(r"^(\d+)_(left|right)\b", re.IGNORECASE)


class SMDGDataModule(_FileDataModule):
    """SMDG-19 glaucoma classification with a patient-grouped, stratified, seeded split.

    Args:
        root: Folder holding ``metadata - standardized.csv`` and ``full-fundus/``.
        include_suspects: Keep glaucoma suspects (``types`` -1) as a third class ``suspect``.
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        channels: 3 (RGB) or 1.
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable images with one warning instead of raising.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "smdg"

    def __init__(
        self,
        root: str,
        include_suspects: bool = False,
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
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"SMDG root {self.root} does not exist; download SMDG-19 from {SMDG_URL} and point root "
                f"at the folder holding '{SMDG_CSV}'."
            )
        csv = self.root / SMDG_CSV
        df = read_table(csv, ["names", "types"], f"the SMDG-19 download ({SMDG_URL})")
        types = df["types"].str.strip()
        bad = sorted(set(types) - {"0", "1", "-1"})
        if bad:
            raise ValueError(f"{csv} column 'types' has values {bad[:5]}; expected 0, 1 or -1 (suspect).")
        self.include_suspects = include_suspects
        df = df[types != "-1"] if not include_suspects else df
        image_dir = next(
            (d for d in (self.root / "full-fundus" / "full-fundus", self.root / "full-fundus") if d.is_dir()),
            None,
        )
        if image_dir is None:
            raise FileNotFoundError(
                f"{self.root} has no full-fundus/full-fundus/ image folder; unzip the SMDG-19 download from "
                f"{SMDG_URL} into {self.root}."
            )
        names = df["names"].str.strip().tolist()
        files = [image_dir / f"{n}.png" for n in names]
        present = np.array([f.is_file() for f in files], dtype=bool)
        if not present.any():
            raise FileNotFoundError(
                f"none of the {len(files)} images of {csv.name} is in {image_dir} (expected <names>.png); "
                f"re-download SMDG-19 from {SMDG_URL}."
            )
        if not present.all():
            warnings.warn(
                f"SMDG: {int((~present).sum())} of {len(files)} images listed in {csv.name} are missing from "
                f"{image_dir} and are dropped.",
                stacklevel=2,
            )
        keep = np.flatnonzero(present)
        df = df.iloc[keep]
        files, names = [files[i] for i in keep], [names[i] for i in keep]
        # types 0 / 1 / -1 -> class 0 / 1 / 2
        labels = df["types"].str.strip().map({"0": 0, "1": 1, "-1": 2}).to_numpy(np.int64)
        class_names = ["non-glaucoma", "glaucoma"] + (["suspect"] if include_suspects else [])
        self.cache_dir, self.skip_corrupt = cache_dir, skip_corrupt
        #: Patient id per image (see the module docstring for the rule).
        self.split_groups = smdg_patient_groups(df)
        splits = _fraction_split(labels, val_fraction, test_fraction, seed, self.split_groups)
        self._init_files(files, labels, names, class_names, splits, channels)


def smdg_patient_groups(df: pd.DataFrame) -> np.ndarray:
    """Patient group per row of the SMDG metadata (the rule of the module docstring)."""
    groups = []
    patient = df["patient_id"] if "patient_id" in df else pd.Series([""] * len(df), index=df.index)
    original = df["original_name"] if "original_name" in df else pd.Series([""] * len(df), index=df.index)
    for name, pid, orig in zip(df["names"].str.strip(), patient, original, strict=True):
        m = _SOURCE.match(name)
        source = m.group(1) if m else name
        odir = _ODIR_NAME.match(str(orig).strip())
        if str(pid).strip():
            groups.append(f"{source}/{str(pid).strip()}")
        elif source.startswith("OIA-ODIR") and odir:
            groups.append(f"OIA-ODIR/{odir.group(1)}")
        else:
            groups.append(f"image/{name}")
    return np.asarray(groups)

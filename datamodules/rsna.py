"""RSNA Pneumonia Detection Challenge chest X-rays (DICOM), one label per patient.

Download: https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data
(``kaggle competitions download -c rsna-pneumonia-detection-challenge``). Expected tree::

    stage_2_train_labels.csv          patientId, x, y, width, height, Target (one row per box)
    stage_2_detailed_class_info.csv   patientId, class (Normal / Lung Opacity /
                                      No Lung Opacity / Not Normal)
    stage_2_train_images/<patientId>.dcm

Boxes are collapsed to one label per patient (Target = any box). ``label_set: binary`` gives
no pneumonia / pneumonia; ``three_class`` the detailed classes. Each patient has one image, so the
seeded stratified split is patient-level. DICOMs are decoded once into the image cache (modality
and VOI LUT applied, MONOCHROME1 inverted; see ``datamodules.cache``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.folder import _FileDataModule, _fraction_split, read_table

RSNA_URL = "https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data"
BINARY_CLASSES = ("no pneumonia", "pneumonia")
THREE_CLASSES = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")
LABEL_SETS = ("binary", "three_class")


class RSNAPneumoniaDataModule(_FileDataModule):
    """RSNA Pneumonia, binary Target or the three detailed classes.

    Args:
        root: Folder holding ``stage_2_train_labels.csv`` and ``stage_2_train_images/``.
        label_set: ``binary`` (Target) or ``three_class`` (stage_2_detailed_class_info.csv).
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        channels: 1 (grayscale, the default; the classifier repeats it for RGB backbones) or 3.
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable DICOMs with one warning instead of raising.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "rsna_pneumonia"

    def __init__(
        self,
        root: str,
        label_set: str = "binary",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        channels: int = 1,
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
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set={label_set!r} is not one of {LABEL_SETS}.")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"RSNA Pneumonia root {self.root} does not exist; download the challenge data from {RSNA_URL} "
                "and point root at the folder holding stage_2_train_labels.csv."
            )
        source = f"the RSNA Pneumonia download ({RSNA_URL})"
        boxes = read_table(self.root / "stage_2_train_labels.csv", ["patientId", "Target"], source)
        target = boxes["Target"].str.strip()
        bad = sorted(set(target) - {"0", "1"})
        if bad:
            raise ValueError(
                f"{self.root / 'stage_2_train_labels.csv'} column 'Target' has values {bad[:5]}; expected 0 or 1."
            )
        # One row per box: a patient is positive when any of its rows is.
        per_patient = target.astype(int).groupby(boxes["patientId"].str.strip(), sort=False).max()
        patients = per_patient.index.tolist()
        if label_set == "binary":
            labels = per_patient.to_numpy(np.int64)
            class_names = BINARY_CLASSES
        else:
            labels = self._three_class(patients, per_patient.to_numpy(np.int64), source)
            class_names = THREE_CLASSES
        images = self.root / "stage_2_train_images"
        if not images.is_dir():
            raise FileNotFoundError(
                f"RSNA image folder {images} does not exist; unzip the challenge data from {RSNA_URL} into {self.root}."
            )
        files = [images / f"{p}.dcm" for p in patients]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} DICOM(s) of patients in stage_2_train_labels.csv are missing, e.g. {absent[0]}; "
                f"re-download stage_2_train_images from {RSNA_URL}."
            )
        self.label_set = label_set
        self.cache_dir, self.skip_corrupt = cache_dir, skip_corrupt
        self.split_groups = np.asarray(patients)
        splits = _fraction_split(labels, val_fraction, test_fraction, seed, self.split_groups)
        self._init_files(files, labels, patients, class_names, splits, channels)

    def _three_class(self, patients: list[str], target: np.ndarray, source: str) -> np.ndarray:
        """Detailed class per patient, checked against Target (Lung Opacity <=> Target 1)."""
        csv = self.root / "stage_2_detailed_class_info.csv"
        info = read_table(csv, ["patientId", "class"], source)
        info["patientId"], info["class"] = info["patientId"].str.strip(), info["class"].str.strip()
        unknown = sorted(set(info["class"]) - set(THREE_CLASSES))
        if unknown:
            raise ValueError(
                f"{csv} column 'class' has values {unknown[:5]}; expected one of {list(THREE_CLASSES)}."
            )
        per_patient = info.drop_duplicates()
        dup = per_patient["patientId"].duplicated()
        if dup.any():
            raise ValueError(
                f"{csv} gives patient {per_patient['patientId'][dup].iloc[0]} more than one class; fix the CSV."
            )
        cls = per_patient.set_index("patientId")["class"]
        missing = [p for p in patients if p not in cls.index]
        if missing:
            raise ValueError(
                f"{len(missing)} patient(s) of stage_2_train_labels.csv are not in {csv.name}, e.g. {missing[0]}; "
                f"use the matching files of {source}."
            )
        labels = np.array([THREE_CLASSES.index(cls[p]) for p in patients], dtype=np.int64)
        clash = np.flatnonzero((labels == 1) != (target == 1))
        if len(clash):
            raise ValueError(
                f"patient {patients[clash[0]]} has class '{THREE_CLASSES[labels[clash[0]]]}' in {csv.name} but "
                f"Target {target[clash[0]]} in stage_2_train_labels.csv ({len(clash)} such); use matching files."
            )
        return labels

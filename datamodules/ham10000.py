"""HAM10000 / ISIC 2018 Task 3 dermoscopy: 7 diagnoses, splits grouped by lesion.

Two official layouts are read (``layout: auto`` picks ISIC 2018 when its training folder exists):

HAM10000 (Harvard Dataverse, https://doi.org/10.7910/DVN/DBW86T)::

    HAM10000_metadata.csv            lesion_id, image_id, dx, dx_type, age, sex, localization
    HAM10000_images_part_1/<image_id>.jpg
    HAM10000_images_part_2/<image_id>.jpg

ISIC 2018 Task 3 (https://challenge.isic-archive.com/data/#2018)::

    ISIC2018_Task3_Training_Input/<image>.jpg
    ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
        (or that CSV in root) image, MEL, NV, BCC, AKIEC, BKL, DF, VASC  (one-hot)
    ISIC2018_Task3_Training_LesionGroupings.csv   image, lesion_id  (optional: lesion ids)
    ISIC2018_Task3_{Validation,Test}_Input/ + ..._GroundTruth.csv  (optional official parts)

The images of both are the same 10,015 HAM10000 images. Validation and test are carved out of the
training images by a stratified split grouped by ``lesion_id`` (one lesion, often imaged several
times, is never in two splits); with ``official_splits`` the official ISIC 2018 Validation / Test
parts are used instead where their images and ground truth are present. Without lesion ids
(ISIC layout lacking both the groupings CSV and ``HAM10000_metadata.csv``) the split is per image
and a warning says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datamodules.folder import _FileDataModule, _fraction_split, read_table

log = logging.getLogger("medpeft")

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
HAM_URL = "https://doi.org/10.7910/DVN/DBW86T"
ISIC_URL = "https://challenge.isic-archive.com/data/#2018"
HAM_CSV = "HAM10000_metadata.csv"
HAM_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
ISIC_PREFIX = "ISIC2018_Task3_"
LAYOUTS = ("auto", "ham10000", "isic2018")


class HAM10000DataModule(_FileDataModule):
    """HAM10000 or ISIC 2018 Task 3 (classes akiec, bcc, bkl, df, mel, nv, vasc).

    Args:
        root: Folder holding the official files (see the module docstring).
        layout: ``auto``, ``ham10000`` or ``isic2018``.
        official_splits: Use the ISIC 2018 Validation / Test parts when present (ISIC layout).
        val_fraction: Fraction of the training images for validation (lesion-grouped, stratified);
            ignored when the official validation part is used.
        test_fraction: As ``val_fraction``, for test.
        channels: 3 (RGB) or 1.
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable images with one warning instead of raising.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "ham10000"

    def __init__(
        self,
        root: str,
        layout: str = "auto",
        official_splits: bool = True,
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
                f"HAM10000 root {self.root} does not exist; download HAM10000 ({HAM_URL}) or ISIC 2018 "
                f"Task 3 ({ISIC_URL}) and point root at the folder holding it."
            )
        self.layout = detect_layout(self.root, layout)
        self.cache_dir, self.skip_corrupt = cache_dir, skip_corrupt
        if self.layout == "ham10000":
            parts = {"train": _read_ham(self.root)}
        else:
            parts = _read_isic(self.root, official_splits)
        files, labels, ids, groups = parts["train"]
        carve_val = 0.0 if "val" in parts else val_fraction
        carve_test = 0.0 if "test" in parts else test_fraction
        splits = _fraction_split(np.asarray(labels), carve_val, carve_test, seed, np.asarray(groups))
        for name in ("val", "test"):
            if name in parts:
                p_files, p_labels, p_ids, p_groups = parts[name]
                splits[name] = np.arange(len(files), len(files) + len(p_files))
                files, labels, ids = files + p_files, labels + p_labels, ids + p_ids
                groups = groups + p_groups
        #: Lesion id per image (the split groups); the image id where no lesion id is known.
        self.split_groups = np.asarray(groups)
        log.info(
            "%s: %s layout at %s, official parts %s",
            type(self).__name__,
            self.layout,
            self.root,
            sorted(set(parts) - {"train"}) or "none",
        )
        self._init_files(files, np.asarray(labels, dtype=np.int64), ids, HAM_CLASSES, splits, channels)


Part = tuple[list[Path], list[int], list[str], list[str]]  # files, labels, ids, split groups


def detect_layout(root: Path, layout: str) -> str:
    """``ham10000`` or ``isic2018``: ``layout`` itself, or what ``root`` holds when it is ``auto``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}.")
    if layout != "auto":
        return layout
    if (root / f"{ISIC_PREFIX}Training_Input").is_dir():
        return "isic2018"
    if (root / HAM_CSV).is_file():
        return "ham10000"
    raise FileNotFoundError(
        f"{root} holds neither HAM10000 ({HAM_CSV} + {HAM_DIRS[0]}/ + {HAM_DIRS[1]}/, from {HAM_URL}) nor "
        f"ISIC 2018 Task 3 ({ISIC_PREFIX}Training_Input/ + {ISIC_PREFIX}Training_GroundTruth.csv, from "
        f"{ISIC_URL}); point root at the folder holding them."
    )


def _read_ham(root: Path) -> Part:
    csv = root / HAM_CSV
    df = read_table(csv, ["lesion_id", "image_id", "dx"], f"the HAM10000 download ({HAM_URL})")
    dx = df["dx"].str.strip().str.lower()
    unknown = sorted(set(dx) - set(HAM_CLASSES))
    if unknown:
        raise ValueError(
            f"{csv} column 'dx' has diagnoses {unknown[:5]} that are not HAM10000 classes "
            f"{list(HAM_CLASSES)}; fix the CSV or use the official one from {HAM_URL}."
        )
    dirs = [root / d for d in HAM_DIRS if (root / d).is_dir()]
    if not dirs:
        raise FileNotFoundError(
            f"{root} has no image folder {HAM_DIRS[0]}/ or {HAM_DIRS[1]}/; unzip the HAM10000 image "
            f"archives from {HAM_URL} into {root}."
        )
    on_disk = {p.stem: p for d in dirs for p in d.iterdir() if p.suffix.lower() == ".jpg"}
    ids = df["image_id"].str.strip().tolist()
    absent = [i for i in ids if i not in on_disk]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} image(s) listed in {csv} are missing from {[d.name for d in dirs]}, e.g. "
            f"{absent[0]}.jpg; unzip both HAM10000 image archives from {HAM_URL} into {root}."
        )
    labels = [HAM_CLASSES.index(d) for d in dx]
    return [on_disk[i] for i in ids], labels, ids, df["lesion_id"].str.strip().tolist()


def _read_isic(root: Path, official_splits: bool) -> dict[str, Part]:
    lesions = _isic_lesion_ids(root)
    parts = {"train": _read_isic_part(root, "Training", lesions, required=True)}
    if official_splits:
        for name, part in (("val", "Validation"), ("test", "Test")):
            found = _read_isic_part(root, part, {}, required=False)
            if found is not None:
                parts[name] = found
    return parts


def _isic_lesion_ids(root: Path) -> dict[str, str]:
    """Image -> lesion id from the ISIC lesion groupings CSV or HAM10000_metadata.csv (else empty)."""
    name = f"{ISIC_PREFIX}Training_LesionGroupings.csv"
    for path in (root / name, root / f"{ISIC_PREFIX}Training_GroundTruth" / name):
        if path.is_file():
            df = read_table(path, ["image", "lesion_id"], f"the ISIC 2018 Task 3 download ({ISIC_URL})")
            return dict(zip(df["image"].str.strip(), df["lesion_id"].str.strip(), strict=True))
    if (root / HAM_CSV).is_file():
        df = read_table(root / HAM_CSV, ["lesion_id", "image_id"], f"the HAM10000 download ({HAM_URL})")
        return dict(zip(df["image_id"].str.strip(), df["lesion_id"].str.strip(), strict=True))
    log.warning(
        "%s has no %s or %s: images of one lesion may land in different splits; add either file "
        "for a lesion-grouped split.",
        root,
        name,
        HAM_CSV,
    )
    return {}


def _read_isic_part(root: Path, part: str, lesions: dict[str, str], required: bool) -> Part | None:
    images = root / f"{ISIC_PREFIX}{part}_Input"
    name = f"{ISIC_PREFIX}{part}_GroundTruth.csv"
    candidates = [root / f"{ISIC_PREFIX}{part}_GroundTruth" / name, root / name]
    csv = next((c for c in candidates if c.is_file()), candidates[0])
    if not required and not (images.is_dir() and csv.is_file()):
        if images.is_dir():
            log.info("%s has no ground truth %s; it is not used.", images, name)
        return None
    if not images.is_dir():
        raise FileNotFoundError(
            f"ISIC 2018 image folder {images} does not exist; unzip {images.name}.zip from {ISIC_URL} "
            f"into {root}."
        )
    df = read_table(csv, ["image", *ISIC_COLUMNS], f"the ISIC 2018 Task 3 download ({ISIC_URL})")
    try:
        onehot = df[list(ISIC_COLUMNS)].astype(float).to_numpy()
    except ValueError as err:
        raise ValueError(f"{csv} has non-numeric labels ({err}); expected one-hot 0/1 columns.") from err
    bad = np.flatnonzero(~np.isin(onehot, (0.0, 1.0)).all(1) | (onehot.sum(1) != 1))
    if len(bad):
        raise ValueError(
            f"{csv} row of image {df['image'].iloc[bad[0]]} (and {len(bad) - 1} more) is not one-hot over "
            f"{list(ISIC_COLUMNS)}; fix the CSV or re-download it."
        )
    ids = df["image"].str.strip().tolist()
    files = [images / f"{i}.jpg" for i in ids]
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} image(s) listed in {csv} are missing, e.g. {absent[0]}; unzip "
            f"{images.name}.zip from {ISIC_URL} into {root}."
        )
    labels = [HAM_CLASSES.index(ISIC_COLUMNS[k].lower()) for k in onehot.argmax(1)]
    groups = [lesions.get(i, f"{part}:{i}") for i in ids]
    return files, labels, ids, groups

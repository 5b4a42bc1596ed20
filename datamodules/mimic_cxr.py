"""MIMIC-CXR-JPG chest X-rays paired with their report's impression, for text-to-image.

Download (credentialed PhysioNet access): MIMIC-CXR-JPG 2.x, https://physionet.org/content/mimic-cxr-jpg/,
and the free-text reports ``mimic-cxr-reports.zip`` of MIMIC-CXR, https://physionet.org/content/mimic-cxr/.
Expected tree (the reports unzip into the same ``files/`` tree, or pass ``reports_root``)::

    mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split (train/validate/test)
    mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, ..., ViewPosition, ...
    files/p<XX>/p<subject_id>/s<study_id>/<dicom_id>.jpg     (XX: first 2 digits of subject_id)
    files/p<XX>/p<subject_id>/s<study_id>.txt                (report, under reports_root)

One sample per image of the chosen views (frontal PA / AP by default); its caption is the IMPRESSION
section of the study's report, FINDINGS when there is no impression (``report_caption``). The
official split is patient-level. Images or reports that are absent (partial downloads) and captions
that come out empty are dropped with one warning that counts them. Batches are
``{"image": uint8 [B, 3, S, S], "caption": list[str], "id": list[str]}`` (id = dicom_id); grayscale
pixels are decoded once into the image cache (``datamodules.cache``) and repeated to 3 channels.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules import cache
from datamodules.captions import _CaptionDataModule
from datamodules.folder import _warn_group_leak, read_table
from datamodules.splits import check_low_data_args, low_data_subset

log = logging.getLogger("medpeft")

MIMIC_URL = "https://physionet.org/content/mimic-cxr-jpg/"
REPORTS_URL = "https://physionet.org/content/mimic-cxr/ (mimic-cxr-reports.zip)"
_SPLITS = {"train": "train", "validate": "val", "test": "test"}
# A section header: a line starting with an upper-case name (letters, spaces, / & ( ) -) and a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()\-]*[A-Z)])[ \t]*:", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """Upper-case section name -> its text with whitespace collapsed (later non-empty repeats win)."""
    found = list(_HEADER.finditer(text))
    sections: dict[str, str] = {}
    for m, nxt in zip(found, [*found[1:], None], strict=True):
        body = " ".join(text[m.end() : nxt.start() if nxt else len(text)].split())
        name = " ".join(m.group(1).split())
        if body or name not in sections:
            sections[name] = body
    return sections


def report_caption(text: str) -> str:
    """The IMPRESSION of a report (also "FINDINGS AND IMPRESSION", "CONCLUSION"), else FINDINGS, else ""."""
    sections = report_sections(text)
    for keys in (("IMPRESSION", "CONCLUSION"), ("FINDING",)):
        for name, body in sections.items():
            if body and any(k in name for k in keys):
                return body
    return ""


class _CachedCaptions(Dataset):
    """Cached grayscale rows of a ``.npy`` memmap with one caption each; images repeated to RGB."""

    def __init__(self, npy: str, rows: np.ndarray, captions: list[str], ids: list[str]) -> None:
        self.npy, self.rows, self.captions, self.ids = npy, rows, captions, ids
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None  # reopened in each worker instead of pickling the memmap
        return state

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._images is None:
            self._images = np.load(self.npy, mmap_mode="r")
        img = torch.from_numpy(np.array(self._images[self.rows[i]], dtype=np.uint8))
        return {"image": img.expand(3, -1, -1).contiguous(), "caption": self.captions[i], "id": self.ids[i]}


class MIMICCXRDataModule(_CaptionDataModule):
    """MIMIC-CXR-JPG image-report pairs with the official split.

    Args:
        root: Folder holding the MIMIC-CXR-JPG CSVs and ``files/``.
        reports_root: Folder holding the reports' ``files/`` tree; None means ``root``.
        views: ViewPosition values kept (``PA``, ``AP``, ``LATERAL``, ``LL``...).
        image_size: Side of the square batch images.
        batch_size, num_workers: Loader settings (num_workers None: ``default_num_workers()``).
        seed: Seed of the per-epoch shuffling and of the ``train_fraction`` subset.
        train_fraction: Fraction in (0, 1] of the training images kept (seeded, nested).
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable images with one warning instead of raising.
        predict_prompts: Prompts file for ``predict`` (one prompt per line).
    """

    def __init__(
        self,
        root: str,
        reports_root: str | None = None,
        views: Sequence[str] = ("PA", "AP"),
        image_size: int = 224,
        batch_size: int = 16,
        num_workers: int | None = None,
        seed: int = 42,
        train_fraction: float = 1.0,
        cache_dir: str | None = None,
        skip_corrupt: bool = False,
        predict_prompts: str | None = None,
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, seed, predict_prompts)
        check_low_data_args(train_fraction, None)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"MIMIC-CXR-JPG root {self.root} does not exist; download it from {MIMIC_URL} and point root "
                "at the folder holding mimic-cxr-2.0.0-split.csv.gz and files/."
            )
        self.reports_root = Path(reports_root).expanduser() if reports_root else self.root
        if not (self.reports_root / "files").is_dir():
            raise FileNotFoundError(
                f"{self.reports_root / 'files'} does not exist; unzip the reports from {REPORTS_URL} there "
                "or set reports_root."
            )
        self.views = [str(v).upper() for v in views]
        self.train_fraction, self.cache_dir, self.skip_corrupt = train_fraction, cache_dir, skip_corrupt
        self._read_index()
        self._image_cache: cache.ImageCache | None = None

    def _read_index(self) -> None:
        source = f"MIMIC-CXR-JPG ({MIMIC_URL})"
        split = read_table(
            _table(self.root, "split"), ["dicom_id", "study_id", "subject_id", "split"], source
        )
        meta = read_table(_table(self.root, "metadata"), ["dicom_id", "ViewPosition"], source)
        bad = sorted(set(split["split"]) - set(_SPLITS))
        if bad:
            raise ValueError(
                f"the split CSV in {self.root} has split values {bad[:5]}; expected {list(_SPLITS)}."
            )
        df = split.merge(meta[["dicom_id", "ViewPosition"]], on="dicom_id", how="inner")
        df = df[df["ViewPosition"].str.upper().isin(self.views)]
        if df.empty:
            raise ValueError(f"no image of {self.root} has ViewPosition in {self.views}; check views.")
        subj, study = df["subject_id"].str.strip(), df["study_id"].str.strip()
        folder = [Path("files") / f"p{s[:2]}" / f"p{s}" for s in subj]
        files = [
            self.root / d / f"s{st}" / f"{i}.jpg"
            for d, st, i in zip(folder, study, df["dicom_id"], strict=True)
        ]
        reports = [self.reports_root / d / f"s{st}.txt" for d, st in zip(folder, study, strict=True)]
        captions: dict[Path, str | None] = {}
        for rep in set(reports):
            captions[rep] = report_caption(rep.read_text(errors="replace")) if rep.is_file() else None
        no_image = np.array([not f.is_file() for f in files])
        no_report = np.array([captions[r] is None for r in reports]) & ~no_image
        empty = np.array([captions[r] == "" for r in reports]) & ~no_image
        keep = np.flatnonzero(~(no_image | no_report | empty))
        if not len(keep):
            raise FileNotFoundError(
                f"none of the {len(files)} {'/'.join(self.views)} images of {self.root} has both its JPG under "
                f"files/ and a report with an IMPRESSION or FINDINGS under {self.reports_root / 'files'}."
            )
        if len(keep) < len(files):
            warnings.warn(
                f"MIMIC-CXR: dropped {len(files) - len(keep)} of {len(files)} images: {int(no_image.sum())} without "
                f"JPG, {int(no_report.sum())} without report, {int(empty.sum())} with an empty IMPRESSION/FINDINGS.",
                stacklevel=3,
            )
        self.files = [files[i] for i in keep]
        self.captions = [captions[reports[i]] for i in keep]
        self.ids = df["dicom_id"].to_numpy()[keep].tolist()
        self.subjects = subj.to_numpy()[keep]
        split_of = df["split"].map(_SPLITS).to_numpy()[keep]
        self.splits = {s: np.flatnonzero(split_of == s) for s in ("train", "val", "test")}
        _warn_group_leak(self.subjects, self.splits, self.root)
        train = self.splits["train"]
        if len(train) and self.train_fraction < 1:
            sub = low_data_subset(np.zeros(len(train), np.int64), self.train_fraction, None, self.seed)
            self.splits["train"] = train[sub]
        log.info(
            "MIMIC-CXR: image-caption pairs per split %s (train_fraction=%s, seed=%d)",
            {k: len(v) for k, v in self.splits.items()},
            self.train_fraction,
            self.seed,
        )

    def _cache(self) -> cache.ImageCache:
        if self._image_cache is None:
            # Grayscale in the cache (a third of the RGB size); repeated to 3 channels when loaded.
            self._image_cache = cache.build_or_load(
                "mimic_cxr", self.files, self.image_size, 1, self.cache_dir, self.skip_corrupt
            )
        return self._image_cache

    def prepare_data(self) -> None:
        """Decodes the images into the cache (once per node)."""
        self._cache()

    def _build(self, split: str) -> Dataset:
        c = self._cache()
        idx = self.splits[split]
        idx = idx[c.valid[idx]]
        if not len(idx):
            raise ValueError(
                f"the {split} split of MIMIC-CXR at {self.root} is empty; check the split CSV and files."
            )
        return _CachedCaptions(str(c.path), idx, [self.captions[i] for i in idx], [self.ids[i] for i in idx])


def _table(root: Path, kind: str) -> Path:
    """``mimic-cxr-2.0.0-<kind>.csv.gz`` or its unzipped ``.csv`` (the former when neither exists)."""
    plain = root / f"mimic-cxr-2.0.0-{kind}.csv"
    return plain if plain.is_file() else plain.with_name(plain.name + ".gz")

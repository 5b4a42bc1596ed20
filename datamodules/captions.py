"""Image-caption pairs for text-to-image fine-tuning.

Batches are ``{"image": uint8 [B, 3, H, W], "caption": list[str], "id": list[str]}``. Images are
resized (shorter side) and centre-cropped to ``image_size``; there is no flip augmentation, since
captions name sides ("left lung"). ``predict_prompts`` (a text file, one prompt per line) gives the
predict loader: ``{"caption", "id", "index"}`` per prompt.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import default_num_workers
from datamodules.sampling import ResumableDataLoader, ResumableTrainOrder, eval_sampler
from datamodules.splits import stratified_split

log = logging.getLogger("medpeft")


class PromptFileDataset(Dataset):
    """One item per non-empty line of a prompts file: ``{"caption", "id", "index"}``."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Prompts file {path} (data.init_args.predict_prompts) does not exist.")
        self.prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not self.prompts:
            raise ValueError(f"Prompts file {path} has no prompts; write one prompt per line.")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"caption": self.prompts[i], "id": f"prompt_{i:05d}", "index": i}


class _CaptionDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Shared loaders: seeded per-epoch shuffling for train, in-order val / test / predict."""

    def __init__(self, image_size: int, batch_size: int, num_workers: int | None, seed: int,
                 predict_prompts: str | None) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"data.init_args.image_size must be >= 8, got {image_size}.")
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}.")
        self._image_size = image_size
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed
        self.predict_prompts = predict_prompts
        self._datasets: dict[str, Dataset] = {}

    @property
    def image_size(self) -> int:
        """Side of every batch image (linked into the model)."""
        return self._image_size

    def _build(self, split: str) -> Dataset:
        raise NotImplementedError

    def _dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def _loader(self, ds: Dataset, loader: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        return loader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0 and kwargs.get("sampler") is None, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from (seed, epoch), sharded per rank, resumable mid-epoch (``datamodules.sampling``)."""
        ds = self._dataset("train")
        sampler = self.resume_sampler(len(ds), self.seed, augmentation_seeds=False)
        return self._loader(ds, sampler=sampler, loader=ResumableDataLoader)

    def encoding_dataloader(self) -> DataLoader:
        """Every training pair once, in order, unsharded (for precomputing latents on each rank)."""
        return self._loader(self._dataset("train"))

    def val_dataloader(self) -> DataLoader:
        """The val split in order; under DDP each rank evaluates its own share (``sampling.eval_sampler``)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split in order; under DDP each rank evaluates its own share (``sampling.eval_sampler``)."""
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._dataset(split)
        return self._loader(ds, sampler=eval_sampler(self, split, ds))

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_prompts:
            raise ValueError(
                "predict needs a prompts file: pass --data.init_args.predict_prompts <file with one prompt per line>."
            )
        return DataLoader(PromptFileDataset(self.predict_prompts), batch_size=self.batch_size)


# ---------------------------------------------------------------------- synthetic chest X-rays
def synthetic_chest_xray(seed: int, index: int, size: int, normal_fraction: float = 0.2) -> tuple[np.ndarray, str]:
    """A procedural chest-X-ray-like uint8 image [3, size, size] and the caption describing it.

    Thorax, two dark lung fields, a bright spine / mediastinum, and (unless normal) one bright
    lesion whose size, shape, side and zone the caption names. Sides are the patient's
    (radiological convention: the patient's left lung is on the image's right).
    """
    rng = np.random.default_rng([seed, index])
    u = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(u, u, indexing="ij")
    img = 0.15 + 0.35 * np.exp(-((x / 0.95) ** 8 + (y / 1.05) ** 8))  # thorax
    for cx in (-0.42, 0.42):  # lungs: darker ellipses
        lung = ((x - cx) / 0.32) ** 2 + ((y + 0.05) / 0.62) ** 2
        img -= 0.25 * np.clip(1.2 - lung, 0, 1)
    img += 0.3 * np.exp(-(x / 0.12) ** 2) * ((y > -0.7) & (y < 0.95))  # spine and mediastinum
    img += 0.05 * np.cos(9 * y + rng.uniform(0, 6)) * (np.abs(x) > 0.15)  # ribs
    if rng.uniform() < normal_fraction:
        caption = "a normal chest x-ray with clear lungs"
    else:
        side, zone = rng.choice(["left", "right"]), rng.choice(["upper", "lower"])
        size_name, shape = rng.choice(["small", "large"]), rng.choice(["round", "oval"])
        cx = (0.42 if side == "left" else -0.42) + rng.uniform(-0.08, 0.08)
        cy = (-0.3 if zone == "upper" else 0.25) + rng.uniform(-0.08, 0.08)
        r = (0.07 if size_name == "small" else 0.15) * rng.uniform(0.85, 1.15)
        aspect = 1.0 if shape == "round" else 1.8
        d = ((x - cx) / (r * aspect)) ** 2 + ((y - cy) / r) ** 2
        img += 0.45 * np.exp(-(d**2))
        caption = f"a chest x-ray with a {size_name} {shape} bright lesion in the {zone} {side} lung"
    img += rng.normal(0, 0.02, img.shape)
    gray = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(gray[None], 3, axis=0), caption


class _SyntheticCaptions(Dataset):
    def __init__(self, seed: int, offset: int, count: int, size: int, normal_fraction: float) -> None:
        self.seed, self.offset, self.count, self.size = seed, offset, count, size
        self.normal_fraction = normal_fraction

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, caption = synthetic_chest_xray(self.seed, self.offset + i, self.size, self.normal_fraction)
        return {"image": torch.from_numpy(image), "caption": caption, "id": f"synthetic_{self.offset + i:06d}"}


class SyntheticCaptionDataModule(_CaptionDataModule):
    """Embedded, deterministic chest-X-ray-like images with captions that describe them.

    Every image depends only on (seed, global index); splits are disjoint index ranges
    (train, then val, then test). No files are read or written.

    Args:
        num_train, num_val, num_test: split sizes.
        image_size: side of the images.
        batch_size, num_workers: loader settings (num_workers None: ``default_num_workers()``).
        seed: seed of the images and of the per-epoch shuffling.
        normal_fraction: share of images without a lesion.
        predict_prompts: prompts file for ``predict`` (one prompt per line).
    """

    def __init__(self, num_train: int = 256, num_val: int = 32, num_test: int = 64, image_size: int = 64,
                 batch_size: int = 16, num_workers: int | None = None, seed: int = 0,
                 normal_fraction: float = 0.2, predict_prompts: str | None = None) -> None:
        super().__init__(image_size, batch_size, num_workers, seed, predict_prompts)
        if min(num_train, num_val, num_test) < 1:
            raise ValueError("SyntheticCaptionDataModule needs num_train, num_val and num_test >= 1.")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.normal_fraction = normal_fraction

    def _build(self, split: str) -> Dataset:
        offset = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[split]
        return _SyntheticCaptions(self.seed, offset, self.sizes[split], self.image_size, self.normal_fraction)


# ---------------------------------------------------------------------- CSV of image paths + captions
def load_rgb(path: Path, size: int) -> torch.Tensor:
    """An image file -> uint8 [3, size, size]: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class _CSVCaptions(Dataset):
    def __init__(self, paths: list[Path], captions: list[str], ids: list[str], size: int,
                 loader: Callable[[Path, int], torch.Tensor] = load_rgb) -> None:
        self.paths, self.captions, self.ids, self.size, self.loader = paths, captions, ids, size, loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.loader(self.paths[i], self.size), "caption": self.captions[i], "id": self.ids[i]}


class CaptionCSVDataModule(_CaptionDataModule):
    """Images listed in a CSV with one caption each (e.g. ``busi/all_captions.csv``).

    Args:
        csv_path: the CSV file.
        image_root: folder the image paths are relative to (default: the CSV's folder).
        path_column, caption_column: column names of the image path and the caption.
        stratify_column: optional label column; splits keep its proportions.
        group_column: optional patient / study id column; a group never spans two splits.
        image_size, batch_size, num_workers: see the module docstring / loaders.
        val_fraction, test_fraction: split shares (seeded with ``seed``).
        predict_prompts: prompts file for ``predict`` (one prompt per line).
    """

    def __init__(self, csv_path: str, image_root: str | None = None, path_column: str = "image_path",
                 caption_column: str = "text_caption", stratify_column: str | None = None,
                 group_column: str | None = None, image_size: int = 224, batch_size: int = 16,
                 num_workers: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 42, predict_prompts: str | None = None) -> None:
        super().__init__(image_size, batch_size, num_workers, seed, predict_prompts)
        path = Path(csv_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Caption CSV {path} (data.init_args.csv_path) does not exist.")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        wanted = [c for c in (path_column, caption_column, stratify_column, group_column) if c]
        header = list(rows[0]) if rows else []
        missing = [c for c in wanted if c not in header]
        if not rows or missing:
            raise ValueError(
                f"Caption CSV {path} must have the columns {wanted}; it has {header} "
                "(set data.init_args.path_column / caption_column to the right names)."
            )
        empty = [i + 2 for i, r in enumerate(rows) if not (r[caption_column] or "").strip()]
        if empty:
            raise ValueError(
                f"Caption CSV {path} has {len(empty)} empty caption(s) in column '{caption_column}' "
                f"(lines {empty[:5]}); fill them in or remove those rows."
            )
        root = Path(image_root).expanduser() if image_root else path.parent
        paths = [root / r[path_column] for r in rows]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {path} are missing under {root}, e.g. {absent[0]}; "
                "set data.init_args.image_root to the folder the paths are relative to."
            )
        if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1) with a sum below 1.")
        self.paths, self.captions = paths, [r[caption_column].strip() for r in rows]
        names = [r[path_column] for r in rows]
        self.ids = names if len(set(names)) == len(names) else [f"{n}#{i}" for i, n in enumerate(names)]
        labels = [r[stratify_column] for r in rows] if stratify_column else ["all"] * len(rows)
        groups = [r[group_column] for r in rows] if group_column else None
        fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
        self.splits = stratified_split(labels, fractions, seed=seed, groups=groups)
        log.info("%s: %s image-caption pairs per split", path.name, {k: len(v) for k, v in self.splits.items()})

    def _build(self, split: str) -> Dataset:
        idx = self.splits[split]
        if len(idx) == 0:
            raise ValueError(f"The {split} split of {len(self.paths)} rows is empty; raise its fraction.")
        return _CSVCaptions([self.paths[i] for i in idx], [self.captions[i] for i in idx],
                            [self.ids[i] for i in idx], self.image_size)

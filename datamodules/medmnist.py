"""MedMNIST+ (2D) from its official ``.npz`` files, with the official train / val / test split.

Download: https://medmnist.com (Zenodo record 10519652), or pass ``download: true``. Files are
``<flag>.npz`` for 28 px and ``<flag>_<size>.npz`` for 64 / 128 / 224 px, each holding
``{train,val,test}_images`` (uint8 [N, H, W] or [N, H, W, 3]) and ``{train,val,test}_labels``
([N] or [N, 1]; [N, 14] multi-hot for ChestMNIST).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import medmnist
import numpy as np
from medmnist import INFO

from datamodules.base import SPLITS, ImageClassificationDataModule, SplitData

SIZES = (28, 64, 128, 224)
FLAGS_2D = tuple(f for f in INFO if not f.endswith("3d"))
_TASKS = {"multi-label, binary-class": "multilabel", "binary-class": "binary"}  # others: multiclass


class MedMNISTDataModule(ImageClassificationDataModule):
    """A 2D MedMNIST+ dataset (``flag``) at one of its native sizes.

    Args:
        flag: Dataset name, e.g. ``breastmnist``, ``dermamnist``, ``chestmnist``.
        size: Native resolution of the npz file: 28, 64, 128 or 224.
        root: Folder holding the npz file, or the npz file itself.
        download: Fetch the file with medmnist's downloader when it is missing.
        image_size: Side of the batch images; None means ``size``.
        batch_size, num_workers, seed, train_fraction, shots_per_class, augment, pin_memory: see
            ``ImageClassificationDataModule``.
    """

    def __init__(
        self,
        flag: str = "breastmnist",
        size: int = 28,
        root: str = "~/.medmnist",
        download: bool = False,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        seed: int = 42,
        train_fraction: float = 1.0,
        shots_per_class: int | None = None,
        augment: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=size if image_size is None else image_size,
            seed=seed,
            train_fraction=train_fraction,
            shots_per_class=shots_per_class,
            augment=augment,
            pin_memory=pin_memory,
        )
        flag = flag.lower()
        if flag not in FLAGS_2D:
            what = "is a 3D dataset, which is not supported" if flag in INFO else "is not a MedMNIST dataset"
            raise ValueError(f"flag={flag!r} {what}; use one of the 2D flags: {', '.join(FLAGS_2D)}.")
        if size not in SIZES:
            raise ValueError(f"size={size} is not a MedMNIST+ size; use one of {SIZES}.")
        self.flag, self.size, self.info = flag, size, INFO[flag]
        self.path = self._resolve(Path(root).expanduser(), download)
        labels, shapes = self._read_labels_and_shapes()
        self._labels = labels
        class_names = [self.info["label"][k] for k in sorted(self.info["label"], key=int)]
        img_shape = shapes["train"][1:]
        channels = 3 if len(img_shape) == 3 and img_shape[-1] == 3 else 1
        if img_shape[0] != size:
            raise ValueError(
                f"{self.path} holds {img_shape[0]} px images but size={size}; set size: {img_shape[0]}."
            )
        self._set_classes(class_names, _TASKS.get(self.info["task"], "multiclass"), channels)
        for split, lab in labels.items():
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(
                    f"{self.path} has {split} labels outside 0..{self.num_classes - 1}; "
                    f"is it really the {flag} file?"
                )
        self._check_eval_classes(labels, f"the official {flag} file has them")
        self._set_train_labels(labels["train"])

    def _file_name(self) -> str:
        return f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz"

    def _resolve(self, root: Path, download: bool) -> Path:
        path = root if root.suffix == ".npz" else root / self._file_name()
        if path.is_file():
            # A local file is trusted as is: re-saved copies have another md5 than the official one.
            return path
        if download:
            path.parent.mkdir(parents=True, exist_ok=True)
            # medmnist's own downloader (checks the official md5 of what it fetches).
            getattr(medmnist, self.info["python_class"])(
                split="train", root=str(path.parent), size=self.size, download=True
            )
            if root.suffix == ".npz" and not path.is_file():
                (path.parent / self._file_name()).rename(path)
            return path
        raise FileNotFoundError(
            f"MedMNIST file {path} does not exist; pass download: true to fetch {self.flag} at "
            f"{self.size} px, or point root at the folder holding {self._file_name()} (or at the npz itself)."
        )

    def _read_labels_and_shapes(self) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
        """Reads labels and image shapes only (from the npy headers): cheap even for 224 px files."""
        try:
            npz = np.load(self.path)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read {self.path} as an npz file ({err}); re-download it.") from err
        with npz:
            needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
            missing = [k for k in needed if k not in npz.files]
            if missing:
                raise ValueError(
                    f"{self.path} lacks the MedMNIST keys {missing} (has {npz.files}); "
                    "point root at an official MedMNIST npz file."
                )
            multilabel = self.info["task"].startswith("multi-label")
            labels, shapes = {}, {}
            for s in SPLITS:
                lab = np.asarray(npz[f"{s}_labels"])
                # Official files are [N, 1]; re-saved copies may be [N]: accept both.
                if multilabel:
                    labels[s] = lab.reshape(len(lab), -1).astype(np.float32)
                else:
                    labels[s] = lab.reshape(-1).astype(np.int64)
                shapes[s] = _npy_shape(npz, f"{s}_images")
                if shapes[s][0] != len(lab):
                    raise ValueError(
                        f"{self.path} has {shapes[s][0]} {s} images but {len(lab)} {s} labels; re-download it."
                    )
        return labels, shapes

    def _load_splits(self) -> dict[str, SplitData]:
        with np.load(self.path) as npz:
            out = {}
            for s in SPLITS:
                images = npz[f"{s}_images"]
                ids = [f"{s}_{i:06d}" for i in range(len(images))]
                out[s] = SplitData(images, self._labels[s], ids, channels_last=images.ndim == 4)
        return out


def _npy_shape(npz: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
    """Shape of one npz member from its header, without decompressing the array."""
    with npz.zip.open(f"{key}.npy") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read(fh)
    return tuple(shape)

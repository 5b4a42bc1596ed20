"""BUSI breast ultrasound (Al-Dhabyani et al. 2020): benign / malignant / normal.

Download: https://scholar.cu.edu.eg/?q=afahmy/pages/dataset ("Dataset_BUSI.zip", 780 PNGs from
600 women; also mirrored on Kaggle as "breast-ultrasound-images-dataset"). Expected tree::

    Dataset_BUSI_with_GT/
        benign/     benign (1).png, benign (1)_mask.png, ...
        malignant/  malignant (1).png, malignant (1)_mask.png, ...
        normal/     normal (1).png, normal (1)_mask.png, ...

``*_mask.png`` / ``*_mask_<k>.png`` segmentation masks are skipped. BUSI has no patient ids, so the
split is stratified by class and seeded.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.folder import ImageFolderDataModule

BUSI_URL = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
BUSI_CLASSES = ("benign", "malignant", "normal")


class BUSIDataModule(ImageFolderDataModule):
    """BUSI with a seeded stratified train / val / test split (3 classes, multiclass).

    Args:
        root: ``Dataset_BUSI_with_GT`` or the folder holding it.
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        channels: 3 (ultrasound stored as RGB, the input of ImageNet backbones) or 1.
        cache_dir: Folder of the decoded-pixel cache; None means ``~/.cache/medpeft``.
        skip_corrupt: Skip unreadable images with one warning instead of raising.
        batch_size, num_workers, image_size, seed, train_fraction, shots_per_class, augment,
            pin_memory: see ``ImageClassificationDataModule``.
    """

    _kind = "busi"

    def __init__(
        self,
        root: str,
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
            root=str(busi_folder(root)),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            extensions=(".png",),
            channels=channels,
            cache_dir=cache_dir,
            skip_corrupt=skip_corrupt,
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            seed=seed,
            train_fraction=train_fraction,
            shots_per_class=shots_per_class,
            augment=augment,
            pin_memory=pin_memory,
        )


def busi_folder(root: str | Path) -> Path:
    """The folder holding the three class folders: ``root`` or ``root/Dataset_BUSI_with_GT``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"BUSI root {root} does not exist; download Dataset_BUSI.zip from {BUSI_URL} and point "
            "root at Dataset_BUSI_with_GT (or its parent)."
        )
    if (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    found = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    missing = [c for c in BUSI_CLASSES if c not in found]
    if missing:
        raise FileNotFoundError(
            f"{root} lacks the BUSI class folder(s) {missing}; expected {root}/{{benign,malignant,normal}}/"
            f"'<class> (<n>).png' as in Dataset_BUSI_with_GT from {BUSI_URL}."
        )
    unknown = sorted(found - set(BUSI_CLASSES))
    if unknown:
        raise ValueError(
            f"{root} has folder(s) {unknown} that are not BUSI classes {list(BUSI_CLASSES)}; "
            "move them out of the dataset folder."
        )
    return root

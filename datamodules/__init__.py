"""LightningDataModules of medpeft: MedMNIST, image folders / CSVs, and synthetic lesions."""

from datamodules.base import ImageClassificationDataModule
from datamodules.folder import CSVDataModule, ImageFolderDataModule
from datamodules.medmnist import MedMNISTDataModule
from datamodules.splits import low_data_subset, stratified_split
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "CSVDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "MedMNISTDataModule",
    "SyntheticDataModule",
    "low_data_subset",
    "stratified_split",
]

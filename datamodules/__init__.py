"""LightningDataModules of medpeft: the seed paper's datasets, MedMNIST, folders / CSVs, synthetic data."""

from datamodules.base import ImageClassificationDataModule
from datamodules.busi import BUSIDataModule
from datamodules.fitzpatrick import Fitzpatrick17kDataModule
from datamodules.folder import CSVDataModule, ImageFolderDataModule
from datamodules.ham10000 import HAM10000DataModule
from datamodules.medmnist import MedMNISTDataModule
from datamodules.mimic_cxr import MIMICCXRDataModule
from datamodules.rsna import RSNAPneumoniaDataModule
from datamodules.smdg import SMDGDataModule
from datamodules.splits import low_data_subset, stratified_split
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "BUSIDataModule",
    "CSVDataModule",
    "Fitzpatrick17kDataModule",
    "HAM10000DataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "MIMICCXRDataModule",
    "MedMNISTDataModule",
    "RSNAPneumoniaDataModule",
    "SMDGDataModule",
    "SyntheticDataModule",
    "low_data_subset",
    "stratified_split",
]

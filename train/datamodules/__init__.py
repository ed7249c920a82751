"""Lightning DataModules: MedMNIST ``.npz`` files and image folders / CSV manifests."""

from train.datamodules.base import DataError, ImageClassificationDataModule, SplitArrays
from train.datamodules.folder import FolderDataModule
from train.datamodules.medmnist import MedMNISTDataModule

__all__ = ["DataError", "FolderDataModule", "ImageClassificationDataModule", "MedMNISTDataModule", "SplitArrays"]

"""Lightning DataModules: MedMNIST ``.npz`` files and image folders / CSV manifests."""

from medops.datasets import DataError, SplitArrays
from train.datamodules.base import ImageClassificationDataModule
from train.datamodules.folder import FolderDataModule
from train.datamodules.medmnist import MedMNISTDataModule

__all__ = ["DataError", "FolderDataModule", "ImageClassificationDataModule", "MedMNISTDataModule", "SplitArrays"]

"""Exceptions raised by :mod:`medops`."""

from __future__ import annotations

import os


class ImageReadError(ValueError):
    """An image file could not be read or decoded.

    ``str(err) == f"{err.path}: {err.reason}"``. The reason is a plain, technical
    description; it never contains header values that could identify a patient.
    The exception pickles cleanly, so it survives DataLoader worker processes.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path: str = os.fspath(path)
        self.reason: str = str(reason)
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

"""Image sources: the synthetic set, a class-per-folder tree and a CSV manifest.

Each source yields ``(image, label)`` where ``image`` is a ``uint8`` tensor ``C × H × W`` already
resized to the square ``image_size``; normalisation and augmentation happen in the data module so every
source is treated the same.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dms_lightning.data.synthetic import SYNTHETIC_CLASSES, render_sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff")


class CorruptImageError(ValueError):
    """An image file that cannot be decoded. The message names the file."""


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """Decode ``path`` to a ``channels × image_size × image_size`` uint8 tensor (bilinear resize)."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.array(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {err}. Fix or remove the file, "
                                "or set `data.skip_corrupt: true` to skip unreadable images.") from err
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


class SyntheticDMSDataset(Dataset):
    """``length`` procedural DMS images of ``split``; rendered once, then served from memory.

    Example:
        >>> ds = SyntheticDMSDataset(10, image_size=64, split="val")
        >>> image, label = ds[3]
        >>> tuple(image.shape), image.dtype, label
        ((1, 64, 64), torch.uint8, 3)
    """

    def __init__(self, length: int, image_size: int, split: str = "train", seed: int = 0, channels: int = 1,
                 cache: bool = True) -> None:
        self.length, self.image_size, self.split, self.seed = length, image_size, split, seed
        self.channels, self.cache = channels, cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0 or index >= self.length:
            raise IndexError(index)
        image = self._cache.get(index)
        label = index % len(SYNTHETIC_CLASSES)
        if image is None:
            array, label = render_sample(self.seed, self.split, index, self.image_size)
            image = torch.from_numpy(array)[None]
            if self.cache:
                self._cache[index] = image
        return image.expand(self.channels, -1, -1), label

    @property
    def targets(self) -> list[int]:
        return [i % len(SYNTHETIC_CLASSES) for i in range(self.length)]

    def sample_id(self, index: int) -> str:
        return f"synthetic/{self.split}/{index:06d}"


class FileImageDataset(Dataset):
    """Images listed as ``(path, label)``; used by both the folder and the CSV source.

    With ``skip_corrupt`` the files are verified once up front and unreadable ones are dropped and
    counted (``self.skipped``) so a long run never dies on image 40 000; without it the first unreadable
    file raises :class:`CorruptImageError` naming it.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, channels: int,
                 skip_corrupt: bool = False) -> None:
        self.image_size, self.channels = image_size, channels
        self.skipped: list[str] = []
        if skip_corrupt:
            kept = []
            for path, label in samples:
                try:
                    with Image.open(path) as img:
                        img.load()
                    kept.append((path, label))
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                    self.skipped.append(str(path))
            if self.skipped:
                log.warning("skipped %d unreadable image(s), e.g. %s", len(self.skipped), self.skipped[0])
            samples = kept
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.image_size, self.channels), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def sample_id(self, index: int) -> str:
        return str(self.samples[index][0])


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and ``(path, label)`` samples under ``root``."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"data.data_dir={str(root)!r} has no class sub-folders; expected "
                                "<data_dir>/<class>/<image> or <data_dir>/{train,val,test}/<class>/<image>")
    samples = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                samples.append((str(path), label))
    if not samples:
        raise FileNotFoundError(f"data.data_dir={str(root)!r} has class folders {classes} but no images "
                                f"with extensions {IMAGE_EXTENSIONS}")
    return classes, samples


def read_manifest(manifest: Path) -> list[tuple[str, str, str | None]]:
    """Rows ``(absolute path, class name, split or None)`` of a ``path,label[,split]`` CSV.

    A header row is recognised by its first cell being ``path``. Paths are relative to the manifest.
    """
    rows = []
    with open(manifest, newline="") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or row[0].strip().startswith("#"):
                continue
            if line_no == 1 and row[0].strip().lower() == "path":
                continue
            if len(row) not in (2, 3):
                raise ValueError(f"data.manifest={str(manifest)!r} line {line_no}: expected 'path,label[,split]', "
                                 f"got {len(row)} fields: {row}")
            path = (manifest.parent / row[0].strip()).resolve()
            split = row[2].strip().lower() if len(row) == 3 and row[2].strip() else None
            if split is not None and split not in ("train", "val", "test"):
                raise ValueError(f"data.manifest={str(manifest)!r} line {line_no}: split {split!r} is not one of "
                                 "'train', 'val', 'test'")
            if not path.is_file():
                raise FileNotFoundError(f"data.manifest={str(manifest)!r} line {line_no}: image {str(path)!r} "
                                        "does not exist (paths are relative to the manifest's folder)")
            rows.append((str(path), row[1].strip(), split))
    if not rows:
        raise ValueError(f"data.manifest={str(manifest)!r} lists no images")
    return rows


def split_indices(n: int, val_split: float, test_split: float, seed: int) -> dict[str, list[int]]:
    """A seeded random train/val/test partition of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val, n_test = int(round(n * val_split)), int(round(n * test_split))
    return {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}

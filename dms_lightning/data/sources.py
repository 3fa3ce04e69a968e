"""Image sources: the synthetic set, a class-per-folder tree and a CSV manifest.

Each source yields ``(image, label)`` where ``image`` is a ``C × H × W`` tensor already resized to the
square ``image_size``; normalisation and augmentation happen in the data module so every source is
treated the same.

Bit depth: 8-bit files (JPEG, 8-bit PNG/TIFF/BMP/PGM) give ``uint8`` tensors. High-bit-depth grayscale
files (16-bit PNG/TIFF/PGM, the usual container of NIR camera frames, 32-bit integer and float TIFF)
give ``float32`` tensors in ``[0, 1]``, scaled by the bit depth of the *container*: a 16-bit file is
divided by 65535, a TIFF by ``2**BitsPerSample - 1``, so no level is clipped or merged. (Converting them
to 8-bit the way ``PIL.Image.convert("L")`` does clips every value above 255 to white.) A 10- or 12-bit
sensor stored in a 16-bit container therefore uses the lower part of ``[0, 1]``; set ``data.mean`` /
``data.std`` to its statistics. Float TIFFs must already hold values in ``[0, 1]``. A file of any other
kind (16-bit RGB, signed integers, an unknown mode) is refused with its path.
"""

from __future__ import annotations

import csv
import logging
import weakref
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


# PIL modes of high-bit-depth grayscale images and the bit depth of their container (None: float data).
_HIGH_BIT_DEPTH_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": None}
# PIL modes that hold 8 bits per channel (or less): converted with PIL's own colour handling.
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def container_bit_depth(img: Image.Image) -> int | None:
    """Bits per sample of the file behind ``img``: 8 for 8-bit modes, 16/32 (or a TIFF's BitsPerSample), None for float.

    Raises:
        CorruptImageError: a mode this loader cannot turn into a grayscale or RGB image without losing data.
    """
    if img.mode in _EIGHT_BIT_MODES:
        return 8
    if img.mode not in _HIGH_BIT_DEPTH_MODES:
        raise CorruptImageError(f"image mode {img.mode!r} is not supported")
    bits = _HIGH_BIT_DEPTH_MODES[img.mode]
    tags = getattr(img, "tag_v2", None)
    if bits is not None and tags is not None:
        declared = tags.get(258)  # TIFF BitsPerSample: a 12-bit TIFF is scaled by 4095, not 65535
        declared = declared[0] if isinstance(declared, tuple) else declared
        if isinstance(declared, int) and 1 <= declared <= bits:
            bits = declared
        sample_format = tags.get(339)  # TIFF SampleFormat: 1 unsigned, 2 signed, 3 float
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        if sample_format == 2:
            raise CorruptImageError("signed-integer TIFF samples are not supported")
    if bits == 32 and img.format == "PNG":
        bits = 16  # older Pillow opens 16-bit PNGs in mode "I"
    return bits


def _high_bit_depth_array(img: Image.Image, bits: int | None, path) -> np.ndarray:
    array = np.asarray(img)
    if bits is None:
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise CorruptImageError(f"float image {str(path)!r} has values in [{array.min()}, {array.max()}]; "
                                    "float images must hold values in [0, 1]")
        return array
    if array.min() < 0:
        raise CorruptImageError(f"image {str(path)!r} has negative samples; only unsigned images are supported")
    return (array.astype(np.float64) / float(2 ** bits - 1)).clip(0.0, 1.0).astype(np.float32)


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """Decode ``path`` to a ``channels × image_size × image_size`` tensor (bilinear resize).

    8-bit files give ``uint8``; 16-bit / 32-bit / float grayscale files give ``float32`` in ``[0, 1]``
    scaled by the container's bit depth (see the module docstring), so their levels are kept.

    Raises:
        CorruptImageError: the file cannot be decoded, or is of a kind this loader would misread; the
            message names the file.
    """
    try:
        with Image.open(path) as img:
            bits = container_bit_depth(img)
            if bits == 8:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                array = np.array(img, dtype=np.uint8)
            else:
                gray = Image.fromarray(_high_bit_depth_array(img, bits, path))  # mode "F"
                if gray.size != (image_size, image_size):
                    gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
                array = np.asarray(gray, dtype=np.float32).clip(0.0, 1.0)
                if channels == 3:
                    array = np.repeat(array[..., None], 3, axis=2)
    except CorruptImageError as err:
        if str(path) in str(err):
            raise
        raise CorruptImageError(f"cannot read image {str(path)!r}: {err}. Convert it to 8- or 16-bit grayscale "
                                "or 8-bit RGB PNG/JPEG/TIFF, or remove it.") from err
    except _READ_ERRORS as err:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {err}. Fix or remove the file, "
                                "or set `data.skip_corrupt: true` to skip unreadable images.") from err
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def image_bit_depth(path: str | Path) -> int | None:
    """The container bit depth of the image at ``path`` read from its header only (see :func:`load_image`)."""
    try:
        with Image.open(path) as img:
            return container_bit_depth(img)
    except CorruptImageError as err:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {err}") from err
    except _READ_ERRORS as err:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {err}. Fix or remove the file, "
                                "or set `data.skip_corrupt: true` to skip unreadable images.") from err


#: Rendered synthetic images of every live :class:`SyntheticDMSDataset` by ``(seed, split, size, index)``:
#: a second dataset of the same images in the process (the student stage of ``pipeline`` after the
#: teacher's) serves them instead of rendering them again. Weak: an image goes when no dataset holds it.
_RENDERED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class SyntheticDMSDataset(Dataset):
    """``length`` procedural DMS images of ``split``; rendered once per process, then served from memory.

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
            key = (self.seed, self.split, self.image_size, index)
            image = _RENDERED.get(key)
            if image is None:
                array, label = render_sample(self.seed, self.split, index, self.image_size)
                image = torch.from_numpy(array)[None]
            if self.cache:
                self._cache[index] = _RENDERED[key] = image
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
                    load_image(path, image_size, channels)
                    kept.append((path, label))
                except CorruptImageError:
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
    """Class names (sorted sub-folder names) and ``(path, label)`` samples under ``root``.

    Raises:
        FileNotFoundError: ``root`` has no class sub-folders, or a class folder holds no image file.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"data.data_dir={str(root)!r} has no class sub-folders; expected "
                                "<data_dir>/<class>/<image> or <data_dir>/{train,val,test}/<class>/<image>")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = [(str(path), label) for path in sorted((root / name).rglob("*"))
                 if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
        if not found:
            empty.append(name)
        samples += found
    if not samples:
        raise FileNotFoundError(f"data.data_dir={str(root)!r} has class folders {classes} but no images "
                                f"with extensions {IMAGE_EXTENSIONS}")
    if empty:
        raise FileNotFoundError(f"data.data_dir={str(root)!r}: class folder(s) {empty} hold no image with extensions "
                                f"{IMAGE_EXTENSIONS}; the model would get an output it never learns. Add images, "
                                "or remove the folder(s)")
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


def split_indices(labels: Sequence[int], val_split: float, test_split: float, seed: int) -> dict[str, list[int]]:
    """A seeded train/val/test partition of ``range(len(labels))``, stratified by label.

    Every class is split on its own, so a rare class gets its share of each split instead of whatever a
    global shuffle leaves it: a split with a non-zero fraction gets at least one image of a class, as
    long as the class keeps at least one training image.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    parts: dict[str, list[int]] = {"val": [], "test": [], "train": []}
    for label in sorted(by_class):
        members = by_class[label]
        order = [members[i] for i in rng.permutation(len(members))]
        n_val, n_test = _share(len(order), val_split), _share(len(order), test_split)
        while n_val + n_test >= len(order) and n_val + n_test > 0:  # training keeps at least one image
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        parts["val"] += order[:n_val]
        parts["test"] += order[n_val:n_val + n_test]
        parts["train"] += order[n_val + n_test:]
    return parts


def _share(count: int, fraction: float) -> int:
    return 0 if fraction == 0.0 else max(1, int(round(count * fraction)))


def label_key(label: str) -> str:
    """How two class names are compared for near-duplicates: case and whitespace ignored."""
    return "".join(label.split()).casefold()

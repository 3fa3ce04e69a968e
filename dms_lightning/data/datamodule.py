"""DMSDataModule: one data module for the synthetic set, an image folder tree or a CSV manifest."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler
from typing_extensions import override

from dms_lightning.data.sources import (
    IMAGE_EXTENSIONS,
    FileImageDataset,
    SyntheticDMSDataset,
    image_bit_depth,
    label_key,
    read_manifest,
    scan_image_folder,
    split_indices,
)
from dms_lightning.data.synthetic import SYNTHETIC_CLASSES
from dms_lightning.data.transforms import eval_transform, pixel_values, train_transform
from dms_lightning.utils.rng import RNG_RECORD, restore_rng_states, resuming_fit, rng_states
from dms_lightning.utils.tensorboard import log_text
from dms_lightning.utils.validation import is_positive_finite

Source = Literal["synthetic", "image_folder", "csv"]
Balance = Literal["none", "sampler", "loss_weights"]
_SPLITS = ("train", "val", "test")
_BALANCE = ("none", "sampler", "loss_weights")


class _Transformed(Dataset):
    """Applies ``transform`` to the image of ``(image, label)`` items; optionally appends the sample id.

    With ``views`` (an integer K), the random transform of item ``i`` is drawn from K fixed views: the n-th
    time item ``i`` is read, the random numbers are seeded by ``(seed, i, n mod K)``. A view is a pure function
    of that seed, so it is computed once and kept (up to :attr:`VIEW_CACHE_BYTES` in all): from the (K+1)-th
    epoch on, reading the training set costs no decoding and no augmentation (a quarter of a CPU distillation
    step at 96 px otherwise).
    """

    #: Most bytes of augmented views kept in memory per dataset; views past it are recomputed on every read.
    VIEW_CACHE_BYTES = 1 << 30

    def __init__(self, base: Dataset, transform, with_ids: bool = False, views: int | None = None,
                 seed: int = 0, reads: collections.Counter[int] | None = None) -> None:
        self.base, self.transform, self.with_ids = base, transform, with_ids
        self.views, self.seed = views, seed
        # How often each image was read (which view comes next); the data module's own counter for its training
        # split, so that a checkpoint records it and a resumed run goes on with the views the uninterrupted one read.
        self._reads: collections.Counter[int] = collections.Counter() if reads is None else reads
        self._view_cache: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        self._view_cache_bytes = 0

    def __len__(self) -> int:
        return len(self.base)

    def _next_view(self, index: int) -> int:
        view = self._reads[index] % self.views
        self._reads[index] += 1
        return view

    def _view(self, index: int) -> tuple[torch.Tensor, int]:
        key = (index, self._next_view(index))
        item = self._view_cache.get(key)
        if item is None:
            image, label = self.base[index]
            with torch.random.fork_rng(devices=[]):  # the loader's shuffling keeps its own random stream
                # Reduced to 63 bits: torch.initial_seed() (part of self.seed) is any 64-bit number when the
                # run never called seed_everything, and manual_seed takes a signed 64-bit integer.
                # The CPU generator only: torch.manual_seed also seeds every accelerator backend, which on a CUDA
                # build without a GPU records the caller's whole stack each time (0.5 ms a call in a training loop).
                torch.default_generator.manual_seed(((self.seed * 1_000_003 + index) * 1_009 + key[1]) % (1 << 63))
                item = (self.transform(image), label)
            image = item[0]
            if isinstance(image, torch.Tensor) and self._view_cache_bytes + image.nbytes <= self.VIEW_CACHE_BYTES:
                self._view_cache[key] = item
                self._view_cache_bytes += image.nbytes
        return item

    def __getitem__(self, index: int):
        if self.views:
            item = self._view(index)
        else:
            image, label = self.base[index]
            item = (self.transform(image), label)
        if self.with_ids:
            item += (_sample_id(self.base, index),)
        return item


def _sample_id(dataset: Dataset, index: int) -> str:
    if isinstance(dataset, Subset):
        return _sample_id(dataset.dataset, dataset.indices[index])
    return dataset.sample_id(index)


def _targets(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Subset):
        parent = _targets(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return dataset.targets


class _EpochWeightedSampler(WeightedRandomSampler):
    """Class-balanced draws (with replacement) that are a function of ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed at epoch ``k`` draws what the
    uninterrupted run drew there; without Lightning each iteration moves on to the next epoch's draws.
    """

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int) -> None:
        super().__init__(weights, num_samples=num_samples, replacement=True, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
        self.epoch += 1
        return super().__iter__()


#: ``batch_size="auto"``: at most this many images a batch (the default ``max_batch_size``), at least
#: :data:`AUTO_MIN_BATCH`, and small enough that an epoch has :data:`AUTO_MIN_STEPS` optimizer steps.
AUTO_MAX_BATCH, AUTO_MIN_BATCH, AUTO_MIN_STEPS = 64, 8, 16


def _unlabelled_images(predict_dir: str) -> list[tuple[str, int]]:
    """``(path, -1)`` for every image file under ``predict_dir`` (sorted, sub-folders included)."""
    root = Path(predict_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.predict_dir={predict_dir!r} is not a folder; point it at the images to classify")
    files = [(str(path), -1) for path in sorted(root.rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS
             and path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"data.predict_dir={predict_dir!r} holds no image with extensions {IMAGE_EXTENSIONS}")
    return files


def auto_batch_size(train_images: int, max_batch_size: int = AUTO_MAX_BATCH) -> int:
    """The batch size ``"auto"`` picks: ``max_batch_size`` (64), halved until an epoch of ``train_images`` has 16
    steps, never below 8.

    A from-scratch network needs hundreds of optimizer steps, and BatchNorm's running statistics dozens, to
    settle; with a few hundred images and batches of 64 a 15-epoch run takes 30-75 steps and a student stays
    near chance. Per-image cost on a CPU hardly depends on the batch size, so smaller batches cost little.

    Example:
        >>> [auto_batch_size(n) for n in (150, 300, 1000, 3000)]
        [8, 16, 32, 64]
        >>> auto_batch_size(6000, max_batch_size=32), auto_batch_size(150, max_batch_size=32)
        (32, 8)
    """
    size = max_batch_size
    while size > AUTO_MIN_BATCH and train_images / size < AUTO_MIN_STEPS:
        size //= 2
    return size


def _resolve_class_weights(weights: list[float] | dict[str, float], class_names: list[str]) -> list[float]:
    """``data.class_weights`` as one positive finite weight per class, in class order; a clear error otherwise."""
    valid = f"one positive number per class {list(class_names)}, or {{class name: weight}}"
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(class_names))
        if unknown:
            raise ValueError(f"data.class_weights names {unknown}, which are not classes of this data; valid: {valid}")
        values = [weights.get(name, 1.0) for name in class_names]
    elif isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(class_names):
        raise ValueError(f"data.class_weights={weights!r} must be {valid}")
    else:
        values = list(weights)
    if not all(is_positive_finite(v) for v in values):
        raise ValueError(f"data.class_weights={weights!r} must be {valid}")
    return [float(v) for v in values]


class DMSDataModule(LightningDataModule):
    """Driver-monitoring images for training, validation, test and prediction.

    Three sources, picked by ``source``:

    * ``synthetic`` (default): the procedural NIR driver set (classes ``alert``, ``eyes_closed``,
      ``yawning``, ``looking_away``, ``phone``), deterministic from ``seed``; no files needed.
    * ``image_folder``: ``data_dir/<class>/*.png`` split by ``val_split``/``test_split`` with
      ``split_seed``, or ``data_dir/{train,val,test}/<class>/*`` used as given.
    * ``csv``: a ``path,label[,split]`` manifest; paths are relative to the manifest. Rows without a
      split are partitioned like an image folder.

    Everything is validated in ``__init__`` (paths exist, values in range, class names found, at least
    two classes, no two names that differ only in case or whitespace, every class present in every
    split), so a bad config fails before any model is built. Random splits are stratified by class.
    ``setup`` prints the images per class of each split and logs them to TensorBoard
    (``data/class_counts``).

    Class imbalance (``balance``): ``"sampler"`` draws training batches with a class-balanced
    :class:`~torch.utils.data.WeightedRandomSampler` (each class equally likely, an epoch is still
    ``len(train)`` images); ``"loss_weights"`` keeps the data as it is and exposes
    :attr:`class_weights` (``N / (K · n_c)``), which the CLI links into the model's cross-entropy;
    ``"none"`` (default) does neither. ``class_weights`` sets the loss weights yourself, e.g. to favour the
    recall of a safety class: a list in class order, or ``{class name: weight}`` with 1.0 for the classes
    left out (``{eyes_closed: 2.0}``).

    Batch size: ``"auto"`` (default) is ``max_batch_size`` (64), halved for small training splits until an epoch
    has 16 optimizer steps (never below 8: 150 images give batches of 8; see :func:`auto_batch_size`); an
    integer is used as given (``max_batch_size`` then plays no part: ``--data.batch_size 16`` overrides a config's
    cap). A short schedule learns more from smaller batches (more optimizer steps for the
    same images): ``configs/teacher.yaml`` caps ``auto`` at 32, where a ResNet-18 step costs about the same per
    image on a CPU; a MobileNet student's step pays per batch (1.15-1.45x the time in batches of 32), so
    ``configs/distill.yaml`` keeps 64.

    Augmentation views (``augment_views``): ``None`` (default) draws fresh random augmentations every
    time an image is read. An integer K gives each training image K fixed augmented views, shown in turn
    (epoch ``e`` shows view ``e mod K``), the same in every run with the same seeds. Images then repeat,
    so a distillation teacher's outputs can be kept per image
    (``DistillationModule(teacher_cache=True)``) instead of recomputed every epoch; the views themselves are
    computed once and kept in memory (up to 1 GiB per dataset: 3000 images at 96 px, 2 views, take 221 MB), so
    later epochs read no image and augment nothing.

    Prediction (``trainer.predict`` / ``python -m dms_lightning predict``): every image under ``predict_dir``
    (sub-folders included, no labels needed: new frames to classify), else the ``predict_split`` of the data.

    Example:
        >>> dm = DMSDataModule(image_size=64, train_size=20, val_size=10, test_size=10, batch_size=4)
        >>> dm.class_names[:2], dm.num_classes
        (['alert', 'eyes_closed'], 5)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (4, 1, 64, 64)
    """

    def __init__(
        self,
        source: Source = "synthetic",
        data_dir: str | None = None,
        manifest: str | None = None,
        image_size: int = 96,
        channels: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: bool = True,
        batch_size: int | Literal["auto"] = "auto",
        max_batch_size: int = AUTO_MAX_BATCH,
        num_workers: int = 0,
        train_size: int = 2000,
        val_size: int = 500,
        test_size: int = 500,
        seed: int = 0,
        val_split: float = 0.1,
        test_split: float = 0.1,
        split_seed: int = 0,
        skip_corrupt: bool = False,
        predict_split: Literal["train", "val", "test"] = "test",
        balance: Balance = "none",
        augment_views: int | None = None,
        predict_dir: str | None = None,
        class_weights: list[float] | dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if source not in ("synthetic", "image_folder", "csv"):
            raise ValueError(f"data.source={source!r} is not one of 'synthetic', 'image_folder', 'csv'")
        if balance not in _BALANCE:
            raise ValueError(f"data.balance={balance!r} is not one of {_BALANCE}")
        if class_weights is not None and balance == "loss_weights":
            raise ValueError(f"data.class_weights={class_weights!r} and data.balance='loss_weights' both set the "
                             "loss's class weights; give one of them")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r} must be 1 (grayscale / NIR) or 3 (RGB)")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"data.image_size={image_size!r} must be an integer >= 16")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"data.batch_size={batch_size!r} must be a positive integer or 'auto'")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"data.max_batch_size={max_batch_size!r} must be a positive integer (the largest batch "
                             "data.batch_size: auto picks)")
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be a positive integer")
        if augment_views is not None and (isinstance(augment_views, bool) or not isinstance(augment_views, int)
                                          or augment_views < 1):
            raise ValueError(f"data.augment_views={augment_views!r} must be a positive integer (views per training "
                             "image) or null (fresh random augmentation every epoch)")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be an integer >= 0")
        for name, value in (("val_split", val_split), ("test_split", test_split)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name}={value!r} must be in [0, 1)")
        if val_split + test_split >= 1.0:
            raise ValueError(f"data.val_split + data.test_split = {val_split + test_split} leaves no training data")
        mean = [0.5] * channels if mean is None else list(mean)
        std = [0.25] * channels if std is None else list(std)
        for name, value in (("mean", mean), ("std", std)):
            if len(value) != channels:
                raise ValueError(f"data.{name}={value!r} needs {channels} value(s), one per channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"data.std={std!r} must be positive")

        # Not class_weights: the model records the weights it uses (a user's own module may call its own weights
        # by that name, and Lightning refuses a run whose module and data module disagree on an hparam).
        self.save_hyperparameters(ignore=["class_weights"])
        self.source, self.image_size, self.channels = source, image_size, channels
        self.mean, self.std = mean, std
        self.batch_size, self.num_workers = batch_size, num_workers
        self._files: dict[str, list[tuple[str, int]]] | None = None
        self.class_names = self._discover(source, data_dir, manifest, val_split, test_split, split_seed)
        self._check_class_names()
        self._given_weights = None if class_weights is None else _resolve_class_weights(class_weights,
                                                                                       self.class_names)
        if self._files is not None:
            for split, samples in self._files.items():
                counts = collections.Counter(label for _, label in samples)
                self._check_split_classes(split, {name: counts.get(i, 0) for i, name in enumerate(self.class_names)})
        self.datasets: dict[str, Dataset] = {}
        self.class_counts: dict[str, dict[str, int]] = {}
        self._train_view_reads: collections.Counter[int] = collections.Counter()
        if batch_size == "auto":
            self.batch_size = auto_batch_size(sum(self._train_counts()), max_batch_size)
            rank_zero_info(f"[dms_lightning] data.batch_size auto: {self.batch_size} "
                           f"({sum(self._train_counts())} training images)")
        self._bit_depth: int | None = 8
        self._predict_files = _unlabelled_images(predict_dir) if predict_dir is not None else None

    def _discover(self, source, data_dir, manifest, val_split, test_split, split_seed) -> list[str]:
        """Validate the source's paths and find its class names (and file lists) without decoding images."""
        if source == "synthetic":
            return list(SYNTHETIC_CLASSES)
        if source == "image_folder":
            if data_dir is None:
                raise ValueError("data.source='image_folder' needs data.data_dir: a folder of class sub-folders")
            root = Path(data_dir).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"data.data_dir={data_dir!r} is not a directory")
            if (root / "train").is_dir():
                classes, train = scan_image_folder(root / "train")
                files = {"train": train}
                for split in ("val", "test"):
                    if (root / split).is_dir():
                        split_classes, samples = scan_image_folder(root / split)
                        unknown = set(split_classes) - set(classes)
                        if unknown:
                            raise ValueError(f"data.data_dir={data_dir!r}: {split}/ has classes {sorted(unknown)} "
                                             f"that train/ lacks (train classes: {classes})")
                        index = {name: i for i, name in enumerate(classes)}
                        files[split] = [(p, index[split_classes[y]]) for p, y in samples]
                missing = [s for s in ("val", "test") if s not in files]
                if missing:
                    files = self._split_missing(files, missing, val_split, test_split, split_seed)
            else:
                classes, samples = scan_image_folder(root)
                files = self._partition(samples, val_split, test_split, split_seed)
            self._files = files
            return classes
        if manifest is None:
            raise ValueError("data.source='csv' needs data.manifest: a CSV of path,label[,split] rows")
        path = Path(manifest).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.manifest={manifest!r} does not exist")
        rows = read_manifest(path)
        classes = sorted({label for _, label, _ in rows})
        index = {name: i for i, name in enumerate(classes)}
        files: dict[str, list[tuple[str, int]]] = {s: [] for s in _SPLITS}
        unsplit = []
        for image, label, split in rows:
            (files[split] if split else unsplit).append((image, index[label]))
        if unsplit:
            parts = self._partition(unsplit, val_split, test_split, split_seed)
            for split in _SPLITS:
                files[split] += parts[split]
        self._files = files
        return classes

    @staticmethod
    def _partition(samples, val_split, test_split, split_seed) -> dict[str, list[tuple[str, int]]]:
        parts = split_indices([label for _, label in samples], val_split, test_split, split_seed)
        return {split: [samples[i] for i in sorted(idx)] for split, idx in parts.items()}

    def _split_missing(self, files, missing, val_split, test_split, split_seed):
        fractions = {"val": val_split if "val" in missing else 0.0, "test": test_split if "test" in missing else 0.0}
        parts = self._partition(files["train"], fractions["val"], fractions["test"], split_seed)
        files["train"] = parts["train"]
        for split in missing:
            files[split] = parts[split]
        return files

    def _where(self) -> str:
        hp = self.hparams
        return f"data.manifest={hp.manifest!r}" if self.source == "csv" else f"data.data_dir={hp.data_dir!r}"

    def _check_class_names(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError(f"{self._where()} has {len(self.class_names)} class {self.class_names}: a classifier "
                             "needs at least two (one folder or label per class)")
        groups: dict[str, list[str]] = {}
        for name in self.class_names:
            groups.setdefault(label_key(name), []).append(name)
        clashes = [names for names in groups.values() if len(names) > 1]
        if clashes:
            raise ValueError(f"{self._where()} has class names that differ only in case or whitespace: {clashes}. "
                             "They would become separate classes; rename the folders / labels so each class has "
                             "one spelling")

    def _check_split_classes(self, split: str, counts: dict[str, int]) -> None:
        """Every class needs training images; a val/test split the user did not turn off needs each class too."""
        total = sum(counts.values())
        missing = [name for name, count in counts.items() if count == 0]
        if not missing or (total == 0 and self._may_be_empty(split)):
            return
        if self.source == "synthetic":
            size = f"data.{split}_size={self.hparams[f'{split}_size']}"
            rank_zero_warn(f"[dms_lightning] the {split} split has no images of class(es) {missing} ({size} is "
                           f"below the {self.num_classes} classes); raise it")
            return
        if split == "train":
            raise ValueError(f"{self._where()}: the train split has no images of class(es) {missing} (images per "
                             f"class: {counts}); the model cannot learn a class it never sees. Add training images "
                             "of it, or remove the class (a CSV label that appears only in val/test rows, a class "
                             "folder whose images are all unreadable, or too few images to split)")
        raise ValueError(f"{self._where()}: the {split} split has no images of class(es) {missing} (images per "
                         f"class: {counts}), so its accuracy and recall say nothing about them. Add {split} images "
                         f"of each class, raise data.{split}_split, or set data.{split}_split: 0 to drop the "
                         f"{split} split")

    @property
    def class_weights(self) -> list[float] | None:
        """Cross-entropy weights, one per class: ``class_weights`` as given, ``N / (K · n_c)`` of the training
        classes with ``balance="loss_weights"``, else None.

        Known before ``setup`` (from the file lists), so the CLI links it into the model.
        """
        if self._given_weights is not None:
            return list(self._given_weights)
        if self.hparams.balance != "loss_weights":
            return None
        counts = self._train_counts()
        total = sum(counts)
        return [total / (len(counts) * c) for c in counts]

    def _train_counts(self) -> list[int]:
        if "train" in self.datasets:
            labels = _targets(self.datasets["train"])
        elif self._files is not None:
            labels = [label for _, label in self._files["train"]]
        else:
            labels = SyntheticDMSDataset(self.hparams.train_size, 1).targets
        counts = collections.Counter(labels)
        return [max(1, counts.get(i, 0)) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocessing(self) -> dict:
        """What a runtime must do to a camera frame before the model: exported into model metadata."""
        scale = "1/255" if self._bit_depth in (8, None) else f"1/{2 ** self._bit_depth - 1}"
        return {"image_size": self.image_size, "channels": self.channels, "mean": self.mean, "std": self.std,
                "layout": "NCHW", "scale": scale, "class_names": list(self.class_names)}

    def input_values(self) -> torch.Tensor:
        """The discrete values a model input takes (every normalised pixel value; see ``transforms.pixel_values``)."""
        return pixel_values(self.mean, self.std, self._bit_depth or 8)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return torch.zeros(batch_size, self.channels, self.image_size, self.image_size)

    def _base(self, split: str) -> Dataset:
        hp = self.hparams
        if self.source == "synthetic":
            size = {"train": hp.train_size, "val": hp.val_size, "test": hp.test_size}[split]
            return SyntheticDMSDataset(size, self.image_size, split=split, seed=hp.seed, channels=self.channels)
        return FileImageDataset(self._files[split], self.image_size, self.channels, skip_corrupt=hp.skip_corrupt)

    def setup(self, stage: str | None = None) -> None:
        predict = ("predict",) if self._predict_files is not None else (self.hparams.predict_split,)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": predict}.get(stage, _SPLITS)
        added = []
        for split in wanted:
            if split in self.datasets:
                continue
            if split == "predict":  # data.predict_dir: unlabelled images, no classes to count
                self.datasets[split] = FileImageDataset(self._predict_files, self.image_size, self.channels,
                                                        skip_corrupt=self.hparams.skip_corrupt)
                rank_zero_info(f"[dms_lightning] predict: {len(self.datasets[split])} unlabelled images from "
                               f"data.predict_dir={self.hparams.predict_dir!r}")
                continue
            base = self._base(split)
            if len(base) == 0 and not self._may_be_empty(split):
                raise ValueError(f"the {split} split of data.source={self.source!r} is empty; check data.data_dir / "
                                 "data.manifest and data.val_split / data.test_split")
            counts = collections.Counter(_targets(base))
            counts = {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}
            # Again after decoding: data.skip_corrupt may have dropped every image of a class.
            self._check_split_classes(split, counts)
            self.datasets[split] = base
            self.class_counts[split] = counts
            added.append(split)
            rank_zero_info(f"[dms_lightning] {split}: {len(base)} images, per class {counts}")
        first = next((self.datasets[s] for s in added if isinstance(self.datasets[s], FileImageDataset)
                      and self.datasets[s].samples), None)
        if first is not None:
            # What a deployment must divide camera values by: recorded in the exported model's metadata.
            self._bit_depth = image_bit_depth(first.samples[0][0])
        if added:
            self._log_class_counts()
        if stage == "fit":
            self._warn_unused_class_weights()

    def _warn_unused_class_weights(self) -> None:
        """Class weights reach a model's loss through the CLI's link; a Python script passes them itself."""
        weights = self.class_weights
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        # A module with no class_weights attribute may read datamodule.class_weights itself: nothing to say.
        if weights is None or module is None or not hasattr(module, "class_weights"):
            return
        used = module.class_weights
        if used is None or (isinstance(used, torch.Tensor) and not torch.allclose(
                used.detach().float().cpu(), torch.tensor(weights, dtype=torch.float32))):
            source = "data.class_weights" if self._given_weights is not None else "data.balance='loss_weights'"
            rank_zero_warn(f"{source} gives class weights {[round(w, 3) for w in weights]}, but the "
                           f"{type(module).__name__}'s loss does not use them (its class_weights: "
                           f"{None if used is None else [round(w, 3) for w in used.tolist()]}); the CLI links them "
                           "in, a script passes them itself: DMSClassifier(..., class_weights=datamodule.class_weights)")

    def _log_class_counts(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        splits = [s for s in _SPLITS if s in self.class_counts]
        header = "| class | " + " | ".join(splits) + " |\n|---|" + "---|" * len(splits) + "\n"
        rows = "".join(f"| {name} | " + " | ".join(str(self.class_counts[s][name]) for s in splits) + " |\n"
                       for name in self.class_names)
        log_text(trainer, "data/class_counts", header + rows, step=0)

    def _may_be_empty(self, split: str) -> bool:
        # A split the user turned off on purpose (val_split: 0 / test_split: 0) is allowed to be empty.
        return self.source != "synthetic" and split != "train" and self.hparams[f"{split}_split"] == 0.0

    def _loader(self, split: str, train: bool = False, with_ids: bool = False) -> DataLoader | list:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}.get(split))
            if split not in self.datasets:
                self.datasets[split] = self._base(split)
        if len(self.datasets[split]) == 0:
            return []  # Lightning skips a loop whose dataloader list is empty
        transform = (train_transform(self.image_size, self.mean, self.std) if train and self.hparams.augment
                     else eval_transform(self.mean, self.std))
        sampler = self._balanced_sampler(split) if train and self.hparams.balance == "sampler" else None
        views = self.hparams.augment_views if train and self.hparams.augment else None
        return DataLoader(
            _Transformed(self.datasets[split], transform, with_ids=with_ids, views=views,
                         seed=self.hparams.seed + torch.initial_seed(),
                         reads=self._train_view_reads if views and split == "train" else None),
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(self.datasets[split]) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _balanced_sampler(self, split: str) -> WeightedRandomSampler:
        """Each class equally likely per draw; an epoch stays ``len(split)`` draws (with replacement)."""
        labels = _targets(self.datasets[split])
        counts = collections.Counter(labels)
        weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)
        return _EpochWeightedSampler(weights, len(labels), self.hparams.split_seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a resumed ``fit`` needs to read the data as the uninterrupted run would: the random generators
        (shuffling, augmentation; :mod:`dms_lightning.utils.rng`) and which augmented view of each training image
        comes next (``augment_views``)."""
        reads = sorted(self._train_view_reads.items())
        return {RNG_RECORD: rng_states(),
                "train_view_reads": torch.tensor(reads, dtype=torch.int64).reshape(-1, 2)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not resuming_fit(self.trainer):
            return  # evaluating or predicting from a checkpoint: nothing to go on with
        reads = state_dict.get("train_view_reads")
        if reads is not None:
            self._train_view_reads.clear()
            self._train_view_reads.update({int(index): int(count) for index, count in reads.tolist()})
        if RNG_RECORD in state_dict:
            restore_rng_states(state_dict[RNG_RECORD])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def calibration_dataloader(self, split: Literal["train", "val", "test"] = "train") -> DataLoader | list:
        """Deterministic batches of ``split`` for calibration (quantization ranges, BatchNorm statistics).

        No augmentation and no shuffling, whatever ``augment`` says: two calls give the same images in the
        same order, so a calibration is reproducible.
        """
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} must be one of {list(_SPLITS)}")
        return self._loader(split)

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``(image, label, sample_id)`` where the id is the file path or synthetic index; with
        ``predict_dir`` every image under it, with label ``-1`` (unlabelled)."""
        if self._predict_files is not None:
            self.setup("predict")
            return self._loader("predict", with_ids=True)
        return self._loader(self.hparams.predict_split, with_ids=True)

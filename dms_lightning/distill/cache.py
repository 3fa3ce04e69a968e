"""Teacher outputs kept per image, so an image the teacher has seen is not run through it again.

In a distillation step the frozen teacher's forward pass costs as much as the student's whole training step
(ResNet-18 vs MobileNetV3-small at 96 px on a CPU: 0.35 s vs 0.27 s per batch of 64), and it is the same
computation each time the same image comes back. Images come back when the data module draws each training
image's augmentations from a fixed set of views (``DMSDataModule(augment_views=K)``: epoch ``e`` shows view
``e mod K``), or when it does not augment at all. :class:`TeacherCache` keys the teacher's outputs by the
image's bytes (a 128-bit BLAKE2 digest), so it needs no sample ids from the data module and a changed image
(another view, another transform) is never mistaken for a cached one.

What is stored per image is what the loss reads: the logits and, per attention-transfer pair, the
teacher's normalised attention map at the student's resolution (a few hundred numbers, not the feature
maps). FitNets hints compare whole feature maps through a learned adapter; with hints the teacher runs on
every batch.

This is the "fast knowledge distillation" idea of Shen & Xing (ECCV 2022), who store soft labels per crop;
"consistent teaching" (Beyer et al., CVPR 2022) holds: the student always sees the teacher's outputs for the
exact image it is trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

__all__ = ["TeacherCache", "image_keys"]


def image_keys(images: torch.Tensor) -> list[bytes]:
    """A 128-bit digest of each image's bytes (its values, whatever its memory layout)."""
    flat = images.detach().to("cpu").contiguous().reshape(len(images), -1)
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in flat]


class TeacherCache:
    """Teacher outputs by image: ``lookup`` runs ``compute`` only on the images not seen before.

    Args:
        max_entries: at most this many images are kept (about ``(classes + Σ attention map sizes) · 4`` bytes
            each: ~3 kB at 96 px with three attention pairs); beyond that, new images are computed and not kept.

    Attributes:
        hits, misses: images served from the cache / computed, since the start (or the last :meth:`clear`).
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries={max_entries!r} must be a positive integer")
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def lookup(self, images: torch.Tensor,
               compute: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The outputs for ``images`` (each a tensor with the batch as first dimension, on ``images``' device).

        ``compute(subset)`` returns the outputs for a sub-batch of images; it is called once, on the images
        not in the cache (not at all when every image is).
        """
        keys = image_keys(images)
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        computed: tuple[torch.Tensor, ...] = ()
        if missing:
            index = torch.tensor(missing, device=images.device)
            computed = tuple(t.detach() for t in compute(images.index_select(0, index)))
            for row, i in enumerate(missing):
                if len(self._entries) >= self.max_entries:
                    break
                # Copies on the CPU: a row of a batch tensor would keep the whole batch alive.
                self._entries[keys[i]] = tuple(t[row].to("cpu", copy=True) for t in computed)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not computed:
            return tuple(torch.stack(parts).to(images.device)
                         for parts in zip(*(self._entries[key] for key in keys)))
        position = {i: row for row, i in enumerate(missing)}
        outputs = []
        for slot, fresh in enumerate(computed):
            rows = [fresh[position[i]] if i in position else self._entries[key][slot].to(fresh.device)
                    for i, key in enumerate(keys)]
            outputs.append(torch.stack(rows))
        return tuple(outputs)

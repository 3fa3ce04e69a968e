"""Teacher outputs kept per image: the same loss as running the teacher, with the teacher run once per image."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Trainer

from dms_lightning import DMSClassifier, DMSDataModule, DistillationModule
from dms_lightning.distill.cache import TeacherCache, image_keys

DATA = dict(image_size=48, train_size=48, val_size=16, test_size=16, batch_size=16)
ATTENTION = [{"student": "features.1", "teacher": "layer1"}, {"student": "features.3", "teacher": "layer2"}]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_train_batches=1,
                      limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(DMSClassifier("resnet18", image_size=48), datamodule=DMSDataModule(**DATA, augment=False))
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return str(path)


def _module(teacher_ckpt: str, **overrides) -> DistillationModule:
    module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=48,
                                attention_transfer=ATTENTION, **overrides)
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    return module.eval()  # dropout off: two modules give the same student outputs


class _CountingTeacher:
    """Counts the images the teacher network is run on."""

    def __init__(self, module: DistillationModule) -> None:
        self.images = 0
        module.teacher.network.register_forward_pre_hook(self._count)

    def _count(self, _, inputs) -> None:
        self.images += len(inputs[0])


def test_cached_teacher_gives_the_same_loss_and_runs_once_per_image(teacher_ckpt):
    plain, cached = _module(teacher_ckpt), _module(teacher_ckpt, teacher_cache=True)
    cached.load_state_dict(plain.state_dict())
    counter = _CountingTeacher(cached)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 48, 48), torch.randint(0, 5, (8,))
    expected, _ = plain.training_loss(images, labels)

    cached.training_loss(images[:3], labels[:3])  # three images seen before the full batch comes
    assert counter.images == 3
    first, _ = cached.training_loss(images, labels)  # five new ones, three from the cache
    assert counter.images == 8
    second, _ = cached.training_loss(images.flip(0), labels.flip(0))  # all eight from the cache, reordered
    assert counter.images == 8
    assert first.item() == pytest.approx(expected.item(), rel=1e-5)
    assert second.item() == pytest.approx(expected.item(), rel=1e-5)
    (cache,) = cached._teacher_caches.values()
    assert (len(cache), cache.hits, cache.misses) == (8, 11, 8)


def test_cache_keys_tell_apart_images_that_differ_in_one_value():
    images = torch.zeros(2, 1, 8, 8)
    images[1, 0, 7, 7] = 1e-6
    keys = image_keys(images)
    assert keys[0] != keys[1] and image_keys(images.contiguous(memory_format=torch.channels_last)) == keys


def test_cache_stops_storing_at_max_entries_and_still_answers():
    cache = TeacherCache(max_entries=2)
    calls = []

    def compute(batch):
        calls.append(len(batch))
        return (batch.flatten(1).sum(1, keepdim=True),)

    images = torch.arange(4.0).view(4, 1, 1, 1)
    (out,) = cache.lookup(images, compute)
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 3.0] and len(cache) == 2
    (out,) = cache.lookup(images, compute)
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 3.0] and calls == [4, 2]
    with pytest.raises(ValueError, match="max_entries"):
        TeacherCache(max_entries=0)


def test_augment_views_work_in_a_run_that_never_seeded_torch():
    """Plain user code without seed_everything: torch's initial seed is any 64-bit number."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2**64 - 1)  # what torch.seed() may draw
        datamodule = DMSDataModule(**DATA, augment_views=2)
        datamodule.setup("fit")
        images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 1, 48, 48) and labels.shape == (16,)


def test_augment_views_repeat_every_k_epochs_and_differ_between_views():
    datamodule = DMSDataModule(**DATA, augment_views=2)
    datamodule.setup("fit")
    dataset = datamodule.train_dataloader().dataset
    views = [dataset[5][0] for _ in range(4)]
    assert torch.equal(views[0], views[2]) and torch.equal(views[1], views[3])
    assert not torch.equal(views[0], views[1])
    fresh = DMSDataModule(**DATA)
    fresh.setup("fit")
    dataset = fresh.train_dataloader().dataset
    assert not torch.equal(dataset[5][0], dataset[5][0])  # default: a new augmentation every read
    with pytest.raises(ValueError, match="data.augment_views"):
        DMSDataModule(augment_views=0)


def test_views_are_computed_once_and_equal_a_fresh_computation(monkeypatch):
    datamodule = DMSDataModule(**DATA, augment_views=2)
    datamodule.setup("fit")
    dataset = datamodule.train_dataloader().dataset
    reads = []
    base_getitem = type(dataset.base).__getitem__
    monkeypatch.setattr(type(dataset.base), "__getitem__", lambda self, i: reads.append(i) or base_getitem(self, i))
    first = [dataset[i][0].clone() for i in range(6) for _ in range(2)]  # views 0 and 1 of six images
    assert len(reads) == 12
    again = [dataset[i][0] for i in range(6) for _ in range(2)]
    assert len(reads) == 12, "a kept view read the image and augmented it again"
    # The kept views are the ones a dataset that keeps nothing computes (same seeds, same order).
    uncached = DMSDataModule(**DATA, augment_views=2)
    uncached.setup("fit")
    plain = uncached.train_dataloader().dataset
    monkeypatch.setattr(type(plain), "VIEW_CACHE_BYTES", 0)
    for a, b, (i, view) in zip(first, again, [(i, v) for i in range(6) for v in range(2)], strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, plain[i][0]), f"image {i} view {view}"
    assert plain._view_cache == {} and len(dataset._view_cache) == 12


def test_fit_with_views_serves_later_epochs_from_the_cache(teacher_ckpt, tmp_path):
    module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=48,
                                attention_transfer=ATTENTION, teacher_cache=True)
    counter = _CountingTeacher(module)
    trainer = Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=DMSDataModule(**DATA, augment_views=2))
    # 48 images x 2 views run through the teacher in epochs 0-1; epochs 2-3 come from the cache.
    assert counter.images == 96
    assert trainer.callback_metrics["train/teacher_cache_hit_rate"] == pytest.approx(0.5)


def test_cache_switches_itself_off_when_no_image_repeats(teacher_ckpt, tmp_path):
    module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=48,
                                attention_transfer=ATTENTION, teacher_cache=True)
    trainer = Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="data.augment_views is not set"):
        trainer.fit(module, datamodule=DMSDataModule(**DATA))  # fresh augmentations: nothing repeats
    assert module._teacher_caches is None


def test_cache_switches_itself_off_after_epochs_without_a_hit_in_a_foreign_data_module(teacher_ckpt, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=48,
                                attention_transfer=ATTENTION, teacher_cache=True)
    module.CACHE_PATIENCE_EPOCHS = 2

    class Fresh(TensorDataset):  # new noise every read, like a random augmentation
        def __getitem__(self, index):
            return torch.randn(1, 48, 48), index % 5

    trainer = Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="no training image came back in 2 epochs"):
        trainer.fit(module, DataLoader(Fresh(torch.zeros(8)), batch_size=4))
    assert module._teacher_caches is None


def test_hints_run_the_teacher_every_batch_and_say_so(teacher_ckpt):
    with pytest.warns(UserWarning, match="teacher_cache is not used with model.feature_hints"):
        module = _module(teacher_ckpt, teacher_cache=True,
                         feature_hints=[{"student": "features.8", "teacher": "layer3"}])
    assert module._teacher_caches is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, _ = module.training_loss(torch.randn(2, 1, 48, 48), torch.tensor([0, 1]))
    assert torch.isfinite(loss)

"""DMSDataModule and its sources: determinism, folder / CSV layouts, errors a user can meet."""

from __future__ import annotations

import collections
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from dms_lightning import DMSDataModule
from dms_lightning.data.sources import CorruptImageError
from dms_lightning.data.synthetic import SYNTHETIC_CLASSES, render_sample


def _write_images(folder, classes=("alert", "phone"), per_class=6, size=40, mode="L"):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image, _ = render_sample(seed=c, split="train", index=i * len(SYNTHETIC_CLASSES) + c, size=size)
            img = Image.fromarray(image)
            img = img.convert("RGB") if mode == "RGB" else img
            img.save(folder / name / f"{i}.{'jpg' if i % 2 else 'png'}")


def test_synthetic_samples_are_a_pure_function_of_seed_split_and_index():
    a, label_a = render_sample(seed=3, split="train", index=17, size=48)
    b, label_b = render_sample(seed=3, split="train", index=17, size=48)
    other, _ = render_sample(seed=4, split="train", index=17, size=48)
    val, _ = render_sample(seed=3, split="val", index=17, size=48)
    assert np.array_equal(a, b) and label_a == label_b
    assert not np.array_equal(a, other)
    assert not np.array_equal(a, val)


def test_synthetic_splits_are_balanced_and_have_the_dms_classes(tiny_datamodule):
    dm = tiny_datamodule(train_size=100)
    dm.setup("fit")
    assert dm.class_names == ["alert", "eyes_closed", "yawning", "looking_away", "phone"]
    assert set(dm.class_counts["train"].values()) == {20}


def test_synthetic_images_vary_in_brightness_pose_and_noise():
    images = np.stack([render_sample(0, "train", i, 48)[0] for i in range(30)]).astype(np.float32)
    means = images.mean(axis=(1, 2))
    assert means.std() > 5.0, "nuisance factors should change global brightness between samples"
    assert images.std(axis=0).mean() > 15.0, "faces should not sit in the same place in every image"


def test_batches_have_the_configured_shape_and_normalisation(tiny_datamodule):
    dm = tiny_datamodule(channels=3, image_size=48, batch_size=8)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 48, 48) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.max()) < 5
    assert -2.5 < float(x.mean()) < 2.5


def test_training_augmentation_changes_images_but_not_shapes(tiny_datamodule):
    dm = tiny_datamodule(augment=True, batch_size=8)
    dm.setup("fit")
    torch.manual_seed(0)
    augmented, _ = next(iter(dm.train_dataloader()))
    plain = torch.stack([dm.val_dataloader().dataset.transform(dm.datasets["train"][i][0]) for i in range(8)])
    assert augmented.shape == plain.shape


def test_image_folder_is_split_with_a_fixed_seed_and_uses_folder_names(tmp_path):
    _write_images(tmp_path, classes=("eyes_closed", "alert", "phone"), per_class=10)
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=32, val_split=0.2, test_split=0.2,
                       batch_size=4)
    again = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=32, val_split=0.2,
                          test_split=0.2, batch_size=4)
    assert dm.class_names == ["alert", "eyes_closed", "phone"]
    dm.setup()
    again.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert dm.datasets["val"].samples == again.datasets["val"].samples
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32)


def test_image_folder_with_train_val_test_subfolders_is_used_as_given(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _write_images(tmp_path / split, per_class=n, mode="RGB")
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=32, channels=3)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 8, "val": 4, "test": 6}
    assert dm.datasets["test"][0][0].shape == (3, 32, 32)


def test_csv_manifest_paths_are_relative_to_the_manifest_and_split_column_is_honoured(tmp_path):
    _write_images(tmp_path / "imgs", per_class=6)
    rows = [["path", "label", "split"]]
    for i, path in enumerate(sorted((tmp_path / "imgs").rglob("*.*"))):
        rows.append([str(path.relative_to(tmp_path)), path.parent.name, ["train", "val", "test", ""][i % 4]])
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    dm = DMSDataModule(source="csv", manifest=str(tmp_path / "manifest.csv"), image_size=32, val_split=0.25,
                       test_split=0.25)
    dm.setup()
    assert dm.class_names == ["alert", "phone"]
    assert sum(len(d) for d in dm.datasets.values()) == 12
    assert len(dm.datasets["train"]) >= 3


def test_corrupt_image_error_names_the_file(tmp_path):
    _write_images(tmp_path, per_class=4)
    bad = tmp_path / "alert" / "broken.png"
    bad.write_bytes(b"not a png at all")
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=32, val_split=0.0,
                       test_split=0.0)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    index = [i for i, (p, _) in enumerate(dataset.samples) if p.endswith("broken.png")][0]
    with pytest.raises(CorruptImageError, match="broken.png"):
        dataset[index]


def test_skip_corrupt_drops_and_counts_unreadable_images(tmp_path):
    _write_images(tmp_path, per_class=4)
    (tmp_path / "phone" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=32, val_split=0.0,
                       test_split=0.0, skip_corrupt=True)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8
    assert dm.datasets["train"].skipped[0].endswith("broken.jpg")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "image_folder", "data_dir": "/no/such/dir"}, "data.data_dir='/no/such/dir'"),
        ({"source": "csv", "manifest": "/no/such.csv"}, "data.manifest='/no/such.csv'"),
        ({"source": "image_folder"}, "needs data.data_dir"),
        ({"source": "webcam"}, "data.source='webcam'"),
        ({"channels": 2}, "data.channels=2"),
        ({"image_size": 4}, "data.image_size=4"),
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"val_split": 0.6, "test_split": 0.5}, "leaves no training data"),
        ({"mean": [0.5, 0.5]}, "data.mean"),
    ],
)
def test_bad_configuration_is_rejected_before_training_with_the_field_and_value(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[")):
        DMSDataModule(**kwargs)


def test_manifest_row_pointing_at_a_missing_file_names_the_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nmissing.png,alert\n")
    with pytest.raises(FileNotFoundError, match="line 2"):
        DMSDataModule(source="csv", manifest=str(tmp_path / "m.csv"))


# ----------------------------------------------------------------------------- bit depth and odd files
def _gradient_16bit(size=32):
    # A NIR-like frame: nearly every value above 255, so an 8-bit conversion clips it to white.
    return (np.linspace(4000, 60000, size * size).reshape(size, size)).astype(np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_images_keep_their_levels_scaled_by_the_container_depth(tmp_path, suffix):
    frame = _gradient_16bit()
    for name in ("alert", "phone"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(frame).save(tmp_path / name / f"{i}{suffix}")
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=32, val_split=0.0,
                       test_split=0.0, mean=[0.0], std=[1.0])
    dm.setup("fit")
    image, _ = dm.datasets["train"][0]
    assert image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), frame / 65535.0, atol=1e-6)
    x, _ = next(iter(dm._loader("train")))
    assert float((x >= 0.999).float().mean()) < 0.01, "16-bit values were clipped to white"
    assert float(x.std()) > 0.2
    assert dm.preprocessing["scale"] == "1/65535"


def test_16bit_images_are_resized_and_replicated_to_rgb(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(_gradient_16bit(64)).save(path)
    from dms_lightning.data.sources import load_image

    image = load_image(path, 32, channels=3)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.05 < float(image.min()) and float(image.max()) < 0.95


@pytest.mark.parametrize(("array", "message"), [
    (np.full((16, 16), -5, np.int32), "signed"),
    (np.full((16, 16), 7.5, np.float32), r"\[0, 1\]"),
])
def test_images_the_loader_would_misread_are_refused_with_their_path(tmp_path, array, message):
    from dms_lightning.data.sources import load_image

    path = tmp_path / "odd.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(CorruptImageError, match=message) as info:
        load_image(path, 16, 1)
    assert "odd.tif" in str(info.value)


# ----------------------------------------------------------------------------- classes and splits
def test_class_folder_without_images_is_refused_naming_the_class(tmp_path):
    _write_images(tmp_path, per_class=4)
    (tmp_path / "yawning").mkdir()
    (tmp_path / "yawning" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="yawning"):
        DMSDataModule(source="image_folder", data_dir=str(tmp_path))


def test_class_whose_images_are_all_unreadable_is_refused_at_setup(tmp_path):
    _write_images(tmp_path, classes=("alert", "phone"), per_class=4)
    (tmp_path / "yawning").mkdir()
    for i in range(4):
        (tmp_path / "yawning" / f"{i}.png").write_bytes(b"broken")
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), val_split=0.0, test_split=0.0,
                       skip_corrupt=True, image_size=32)
    with pytest.raises(ValueError, match="train split has no images of class.*yawning"):
        dm.setup("fit")


def _manifest(tmp_path, rows):
    _write_images(tmp_path / "imgs", per_class=6)
    paths = sorted((tmp_path / "imgs").rglob("*.*"))
    lines = ["path,label,split"] + [f"{paths[i].relative_to(tmp_path)},{label},{split}" for i, label, split in rows]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "m.csv")


def test_csv_label_that_appears_only_in_val_or_test_is_refused(tmp_path):
    rows = [(i, "alert" if i % 2 else "phone", "train") for i in range(8)] + [(8, "phone", "val"), (9, "alert", "val"),
                                                                              (10, "eyes_closed", "test")]
    with pytest.raises(ValueError, match=r"train split has no images of class\(es\) \['eyes_closed'\]"):
        DMSDataModule(source="csv", manifest=_manifest(tmp_path, rows))


def test_labels_that_differ_only_in_case_or_whitespace_are_refused(tmp_path):
    rows = [(i, ["alert", "ALERT ", "phone"][i % 3], "") for i in range(12)]
    with pytest.raises(ValueError, match="differ only in case or whitespace.*ALERT"):
        DMSDataModule(source="csv", manifest=_manifest(tmp_path, rows))


def test_a_single_class_is_refused(tmp_path):
    _write_images(tmp_path, classes=("alert",), per_class=6)
    with pytest.raises(ValueError, match=r"1 class \['alert'\].*at least two"):
        DMSDataModule(source="image_folder", data_dir=str(tmp_path))


def test_a_val_split_without_a_class_is_refused(tmp_path):
    for split, classes in (("train", ("alert", "phone")), ("val", ("alert",))):
        _write_images(tmp_path / split, classes=classes, per_class=3)
    with pytest.raises(ValueError, match=r"val split has no images of class\(es\) \['phone'\]"):
        DMSDataModule(source="image_folder", data_dir=str(tmp_path), test_split=0.0)


def test_random_splits_are_stratified_so_a_rare_class_reaches_every_split(tmp_path):
    _write_images(tmp_path, classes=("alert",), per_class=40)
    _write_images(tmp_path, classes=("phone",), per_class=4)
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), val_split=0.1, test_split=0.1)
    counts = {s: collections.Counter(label for _, label in dm._files[s]) for s in ("train", "val", "test")}
    assert counts["val"] == {0: 4, 1: 1} and counts["test"] == {0: 4, 1: 1} and counts["train"] == {0: 32, 1: 2}


# ----------------------------------------------------------------------------- class imbalance
def _imbalanced(tmp_path):
    _write_images(tmp_path, classes=("alert",), per_class=30, size=16)
    _write_images(tmp_path, classes=("phone",), per_class=6, size=16)


def test_balanced_sampler_draws_each_class_about_equally(tmp_path):
    _imbalanced(tmp_path)
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), image_size=16, val_split=0.0, test_split=0.0,
                       batch_size=36, balance="sampler", augment=False)
    dm.setup("fit")
    labels = torch.cat([y for _ in range(5) for _, y in dm.train_dataloader()])
    share = float((labels == 1).float().mean())
    assert 0.38 < share < 0.62, f"phone drawn {share:.2f} of the time (1/6 without balancing)"
    assert dm.class_weights is None


def test_loss_weights_are_inverse_class_frequencies(tmp_path):
    _imbalanced(tmp_path)
    dm = DMSDataModule(source="image_folder", data_dir=str(tmp_path), val_split=0.0, test_split=0.0,
                       balance="loss_weights")
    assert dm.class_weights == pytest.approx([36 / (2 * 30), 36 / (2 * 6)])
    assert DMSDataModule(source="image_folder", data_dir=str(tmp_path), val_split=0.0,
                         test_split=0.0).class_weights is None


def test_class_weights_by_name_or_in_class_order_and_bad_ones_refused():
    def weights(value, **kwargs):
        return DMSDataModule(train_size=10, val_size=5, test_size=5, class_weights=value, **kwargs).class_weights

    assert weights({"eyes_closed": 2.0, "phone": 3}) == [1.0, 2.0, 1.0, 1.0, 3.0]
    assert weights([1, 1, 2, 1, 1]) == [1.0, 1.0, 2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"names \['eyes'\], which are not classes of this data; valid: one "
                                         r"positive number per class \['alert', 'eyes_closed'"):
        weights({"eyes": 2.0})
    for bad in ([1, 2], [1, 1, 0, 1, 1], [1, 1, float("nan"), 1, 1], "2", {"phone": -1}):
        with pytest.raises(ValueError, match="data.class_weights="):
            weights(bad)
    with pytest.raises(ValueError, match="both set the loss's class weights"):
        weights([1, 2, 1, 1, 1], balance="loss_weights")


@pytest.mark.parametrize("passed", [False, True])
def test_class_weights_a_script_forgets_to_pass_are_warned_about(passed, tiny_datamodule, fast_trainer_kwargs):
    # Outside the CLI nothing links data.class_weights into the model: a script that sets them on the data module
    # only trained an unweighted loss without a word.
    import warnings

    from lightning.pytorch import Trainer

    from dms_lightning import DMSClassifier

    dm = tiny_datamodule(class_weights={"eyes_closed": 2.0}, image_size=32)
    model = DMSClassifier(image_size=32, class_weights=dm.class_weights if passed else None)
    trainer = Trainer(**fast_trainer_kwargs, limit_train_batches=1, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    said = [str(w.message) for w in caught if "does not use them" in str(w.message)]
    if passed:
        assert not said
    else:
        assert len(said) == 1 and "data.class_weights gives class weights [1.0, 2.0, 1.0, 1.0, 1.0]" in said[0]
        assert "DMSClassifier(..., class_weights=datamodule.class_weights)" in said[0]


def test_unknown_balance_mode_is_refused():
    with pytest.raises(ValueError, match="data.balance='oversample'"):
        DMSDataModule(balance="oversample")


def test_auto_batch_size_gives_a_small_training_split_enough_steps_per_epoch(tmp_path):
    from dms_lightning.data.datamodule import auto_batch_size

    small = DMSDataModule(image_size=32, train_size=150, val_size=10, test_size=10)
    assert small.batch_size == 8 and len(small.train_dataloader()) == 18  # 150 images: 18 steps, not 2
    assert DMSDataModule(image_size=32, train_size=3000, val_size=10, test_size=10).batch_size == 64
    assert DMSDataModule(image_size=32, train_size=150, val_size=10, test_size=10, batch_size=64).batch_size == 64
    assert [auto_batch_size(n) for n in (10, 300, 1000, 1024)] == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="data.batch_size=0 must be a positive integer or 'auto'"):
        DMSDataModule(batch_size=0)


def test_max_batch_size_caps_auto_and_small_splits_still_get_their_steps():
    capped = DMSDataModule(image_size=32, train_size=3000, val_size=10, test_size=10, max_batch_size=32)
    assert capped.batch_size == 32
    capped.setup("fit")
    assert len(capped.train_dataloader()) == 93  # 3000 // 32: the last, partial batch is dropped
    assert DMSDataModule(image_size=32, train_size=150, val_size=10, test_size=10, max_batch_size=32).batch_size == 8
    with pytest.raises(ValueError, match=r"data.max_batch_size=0 must be a positive integer"):
        DMSDataModule(max_batch_size=0)
    assert DMSDataModule(image_size=32, train_size=3000, batch_size=16, max_batch_size=32).batch_size == 16


def test_synthetic_images_are_rendered_once_per_process(monkeypatch):
    """The pipeline's student stage serves the teacher stage's rendered images instead of rendering again."""
    import gc

    from dms_lightning.data import sources

    calls = []
    render = sources.render_sample

    def counting(*args):
        calls.append(args)
        return render(*args)

    monkeypatch.setattr(sources, "render_sample", counting)
    first = sources.SyntheticDMSDataset(6, image_size=32, split="val", seed=123)
    images = [first[i][0] for i in range(6)]
    assert len(calls) == 6
    second = sources.SyntheticDMSDataset(6, image_size=32, split="val", seed=123)
    assert all(torch.equal(second[i][0], images[i]) for i in range(6)) and len(calls) == 6
    other = sources.SyntheticDMSDataset(6, image_size=32, split="val", seed=124)  # other images: rendered
    other[0]
    assert len(calls) == 7
    del first, second, images, other
    gc.collect()
    sources.SyntheticDMSDataset(6, image_size=32, split="val", seed=123)[0]  # nothing holds them any more
    assert len(calls) == 8

"""Backbones and DMSClassifier: shapes, channel adaptation, local weights, a real short fit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torchvision

from dms_lightning import DMSClassifier
from dms_lightning.models.backbones import SUPPORTED_BACKBONES, DMSHead, build_backbone


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_supported_backbone_maps_images_to_class_logits(name, channels):
    model = build_backbone(name, num_classes=5, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 64, 64))
    assert out.shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_dms_head_is_linear_128_relu_dropout_linear(name):
    model = build_backbone(name, num_classes=7, head="dms")
    head = [m for m in model.modules() if isinstance(m, DMSHead)]
    assert len(head) == 1
    layers = list(head[0])
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert layers[0].out_features == 128 and layers[-1].out_features == 7


def test_torchvision_head_keeps_the_backbone_classifier_and_resizes_its_output():
    model = build_backbone("mobilenet_v3_small", num_classes=3, head="torchvision")
    assert model.classifier[0].out_features == 1024 and model.classifier[-1].out_features == 3


def test_local_rgb_weights_load_and_the_first_conv_sums_them_for_grayscale(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_backbone("resnet18", num_classes=5, in_channels=1, weights=str(path))
    assert torch.allclose(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    gray = torch.rand(1, 1, 64, 64)
    reference.fc = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    reference.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(model(gray), reference(gray.repeat(1, 3, 1, 1)), atol=1e-4)


def test_weights_from_a_lightning_checkpoint_are_accepted(tmp_path):
    source = DMSClassifier("mobilenet_v3_small", num_classes=5, image_size=32)
    path = tmp_path / "student.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_backbone("mobilenet_v3_small", num_classes=5, in_channels=1, weights=str(path))
    assert torch.equal(model.features[3].block[0][0].weight, source.model.features[3].block[0][0].weight)


def test_missing_weights_file_says_nothing_is_downloaded():
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_backbone("resnet18", weights="/no/such/weights.pth")


def test_unknown_backbone_lists_the_supported_ones():
    with pytest.raises(ValueError, match="backbone='resnet19'.*mobilenet_v3_small"):
        build_backbone("resnet19")


def test_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match="class_names has 2 names"):
        DMSClassifier(num_classes=5, class_names=["a", "b"])


def test_classifier_keeps_class_names_in_hparams_and_sets_example_input():
    model = DMSClassifier("resnet18", num_classes=2, class_names=["alert", "phone"], in_channels=3, image_size=80)
    assert model.hparams.class_names == ["alert", "phone"]
    assert model.example_input_array.shape == (1, 3, 80, 80)


@pytest.mark.slow
def test_a_short_fit_beats_chance_clearly(tiny_datamodule, fast_trainer_kwargs):
    pl.seed_everything(0)
    dm = tiny_datamodule(image_size=48, train_size=400, val_size=150, batch_size=32)
    model = DMSClassifier("resnet18", num_classes=5, image_size=48,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = pl.Trainer(**{**fast_trainer_kwargs, "max_epochs": 4})
    trainer.fit(model, dm)
    accuracy = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    print(f"short fit: val/acc={accuracy:.3f}")
    assert accuracy > 0.35, f"5 classes: chance is 0.2, got {accuracy:.3f}"


def test_bn_momentum_defaults_to_short_run_value_and_can_keep_torchvision():
    from torch import nn

    def momenta(module):
        return {m.momentum for m in module.modules() if isinstance(m, nn.BatchNorm2d)}

    assert momenta(DMSClassifier("mobilenet_v3_small", image_size=32)) == {0.1}
    assert momenta(DMSClassifier("mobilenet_v3_small", image_size=32, bn_momentum=None)) == {0.01}
    with pytest.raises(ValueError, match="bn_momentum=0.0"):
        build_backbone("mobilenet_v3_small", bn_momentum=0.0)


def test_inverted_residual_blocks_start_as_the_identity_and_resnet_blocks_keep_torchvision_init():
    from torchvision.models.mobilenetv3 import InvertedResidual

    student = build_backbone("mobilenet_v3_small").eval()
    blocks = [m for m in student.modules() if isinstance(m, InvertedResidual) and m.use_res_connect]
    assert len(blocks) == 6
    x = torch.randn(2, blocks[0].block[0][0].in_channels, 6, 6)
    assert torch.equal(blocks[0](x), x)  # branch output is BatchNorm's beta (0): the block is the identity
    teacher = build_backbone("resnet18")
    assert all(bool((b.bn2.weight == 1).all()) for b in teacher.modules() if hasattr(b, "bn2"))
    assert build_backbone("resnet18", zero_init_residual=True).layer1[0].bn2.weight.abs().sum() == 0
    untouched = build_backbone("mobilenet_v3_small", zero_init_residual=False)
    assert all(bool((b.block[-1][1].weight == 1).all()) for b in untouched.modules()
               if isinstance(b, InvertedResidual) and b.use_res_connect)


def test_loaded_weights_replace_the_zero_initialised_scales(tmp_path):
    trained = build_backbone("mobilenet_v3_small", zero_init_residual=False)
    with torch.no_grad():
        for module in trained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(0.5)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    loaded = build_backbone("mobilenet_v3_small", weights=str(tmp_path / "w.pth"))
    norms = [m for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((m.weight == 0.5).all()) for m in norms)


def test_relu_activation_replaces_every_hardswish_and_keeps_the_weights_interchangeable(tmp_path):
    default = build_backbone("mobilenet_v3_small")
    relu = build_backbone("mobilenet_v3_small", activation="relu")
    assert any(isinstance(m, torch.nn.Hardswish) for m in default.modules())
    assert not any(isinstance(m, (torch.nn.Hardswish, torch.nn.SiLU)) for m in relu.modules())
    # The squeeze-excitation gates keep their hard-sigmoid; only the activations change, not the parameters.
    assert sum(isinstance(m, torch.nn.Hardsigmoid) for m in relu.modules()) == 9
    relu.load_state_dict(default.state_dict())  # strict: the same tensors
    assert not any(isinstance(m, torch.nn.SiLU) for m in build_backbone("efficientnet_b0", activation="relu").modules())
    # Recorded in the hyper-parameters, so a reloaded checkpoint is the ReLU network again.
    module = DMSClassifier("mobilenet_v3_small", image_size=32, activation="relu")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "relu.ckpt")
    loaded = DMSClassifier.load_from_checkpoint(tmp_path / "relu.ckpt", weights_only=True)
    assert not any(isinstance(m, torch.nn.Hardswish) for m in loaded.modules())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "resnet18", "activation": "relu"}, "no hard-swish or SiLU"),
    ({"activation": "gelu"}, "activation='gelu' must be 'default'"),
])
def test_an_activation_the_backbone_cannot_take_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(**kwargs)

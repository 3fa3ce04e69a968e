"""Cross-layer equalization, bias correction and AdaRound: what a low-bit INT8 model gains, and what must not change."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import ONNXExport, PostTrainingQuantization
from dms_lightning.export import export_qdq_onnx
from dms_lightning.export.runtimes import ort_session
from dms_lightning.quant import QuantizationConfig, is_quantized, post_training_quantize, prepare_qat
from dms_lightning.quant.adaround import adaround
from dms_lightning.quant.calibration import calibrate
from dms_lightning.quant.equalization import correct_bias, equalize_cross_layer, float_simulation, replace_relu6
from dms_lightning.quant.modules import ChannelClamp
from dms_lightning.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PER_TENSOR = QuantizationConfig(weight=QuantSpec(8, symmetric=True, per_channel=False))


class _Unbalanced(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → depthwise → BN → ReLU6 → pool → linear, one outlier channel in conv₁.

    Channel 0 of the first conv's (folded) output is 400× the others and the second conv reads it 400× weaker:
    the float function is ordinary, but a per-tensor weight grid of conv₁ spends its levels on channel 0.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.relu, self.relu2, self.relu6 = nn.ReLU(), nn.ReLU(), nn.ReLU6()
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor([400.0] + [1.0] * 7))
            self.bn1.bias.copy_(torch.tensor([40.0] + [0.1] * 7))
            self.conv2.weight[:, 0] /= 400.0
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu6(self.bn3(self.dw(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _batches(count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=generator) for _ in range(count)]


def _ranges(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    folded = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    return folded.detach().abs().flatten(1).amax(dim=1)


@torch.no_grad()
def test_equalization_keeps_the_function_and_balances_the_channel_ranges():
    net = _Unbalanced().eval()
    x = torch.cat(_batches())
    before_out, before = net(x), _ranges(net.conv1, net.bn1)
    result = equalize_cross_layer(net, relu6="skip")
    after = _ranges(net.conv1, net.bn1)
    assert result.pairs == [("conv1", "conv2"), ("conv2", "dw")]
    torch.testing.assert_close(net(x), before_out, rtol=1e-4, atol=1e-4)
    assert float(before.max() / before.min()) > 100 and float(after.max() / after.min()) < 20
    assert result.range_ratio_after < result.range_ratio_before / 10
    # Equalized: each channel's output range of conv1 equals conv2's input range of that channel.
    conv2_in = (net.conv2.weight * (net.bn2.weight / torch.sqrt(net.bn2.running_var + net.bn2.eps)).reshape(-1, 1, 1, 1)
                ).abs().transpose(0, 1).flatten(1).amax(dim=1)
    torch.testing.assert_close(after, conv2_in, rtol=2e-2, atol=1e-6)


@torch.no_grad()
def test_relu6_pairs_are_skipped_or_their_relu6_replaced_as_asked():
    net = torchvision.models.mobilenet_v2(num_classes=5).eval()
    kept = equalize_cross_layer(net, relu6="skip")
    # Only the pairs with no activation between them: a block's projection feeding the next block's expansion.
    assert kept.pairs == [("features.1.conv.1", "features.2.conv.0.0"), ("features.17.conv.2", "features.18.0")]
    assert not kept.relu6_replaced
    assert any("ReLU6" in reason for reason in kept.skipped.values())
    assert any(isinstance(m, nn.ReLU6) for m in net.modules())
    replaced = equalize_cross_layer(net, relu6="relu")
    # Stem -> depthwise -> project of block 1, expand -> depthwise -> project of blocks 2-17 (two ReLU6 each).
    assert len(replaced.pairs) == 36 and len(replaced.relu6_replaced) == 34
    assert all(isinstance(net.get_submodule(name), nn.ReLU) for name in replaced.relu6_replaced)
    assert replaced.range_ratio_after < replaced.range_ratio_before


def _saturating_mobilenet_v2() -> nn.Module:
    """A MobileNetV2 whose ReLU6 clip: BatchNorm shifts put many activations above 6, as a trained one has."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=5).eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.bias.data.uniform_(2.0, 9.0)
            module.weight.data.uniform_(0.5, 4.0)
    return net


@torch.no_grad()
def test_relu6_becomes_a_per_channel_clamp_that_keeps_the_function_exactly():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    net = _saturating_mobilenet_v2()
    reference = net(x)
    as_relu = copy.deepcopy(net)
    equalize_cross_layer(as_relu, relu6="relu")
    result = equalize_cross_layer(net)  # relu6="clamp", the default
    assert len(result.pairs) == 36 and len(result.relu6_replaced) == 34 and result.relu6_mode == "clamp"
    clamps = [net.get_submodule(name) for name in result.relu6_replaced]
    assert all(isinstance(c, ChannelClamp) for c in clamps)
    assert [c.upper.numel() for c in clamps] == result.relu6_channels
    # The bounds moved off 6 (the channels were rescaled), and the network computes what it did.
    assert max(float((c.upper - 6).abs().max()) for c in clamps) > 1.0
    torch.testing.assert_close(net(x), reference, rtol=1e-4, atol=1e-4)
    # ReLU instead (AIMET's choice) changes this network, whose activations exceed 6.
    assert float((as_relu(x) - reference).abs().max()) > 0.1
    # A reload rebuilds the clamps from the record, their bounds from the state dict.
    rebuilt = torchvision.models.mobilenet_v2(num_classes=5).eval()
    replace_relu6(rebuilt, result.relu6_replaced, "clamp", result.relu6_channels)
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt(x), net(x))
    with pytest.raises(ValueError, match="relu6='sigmoid' must be one of"):
        equalize_cross_layer(torchvision.models.mobilenet_v2(num_classes=5), relu6="sigmoid")


@torch.no_grad()
def test_clamped_network_exports_and_runs_its_int8_qdq_in_onnx_runtime(tmp_path):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    net = _saturating_mobilenet_v2()
    int8 = post_training_quantize(net, [x], QuantizationConfig(weight=QuantSpec(8, True, per_channel=False)),
                                  cross_layer_equalization=True)
    assert int8.meta["equalization"].relu6_mode == "clamp"
    path = export_qdq_onnx(int8, x[:1], tmp_path / "clamped_int8.onnx")
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "Min" for node in graph.node) == 34
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), int8(x), rtol=0.05, atol=0.05 * float(int8(x).abs().max()))


def _output_error(quantized: nn.Module, reference: nn.Module, batches) -> float:
    x = torch.cat(batches)
    return float((quantized(x) - reference(x)).abs().mean())


@torch.no_grad()
def test_equalization_makes_per_tensor_ptq_of_an_unbalanced_net_far_more_accurate():
    batches = _batches()
    reference = _Unbalanced().eval()
    plain = post_training_quantize(_Unbalanced().eval(), batches, PER_TENSOR)
    equalized = post_training_quantize(_Unbalanced().eval(), batches, PER_TENSOR, cross_layer_equalization=True)
    assert equalized.meta["equalization"].pairs == [("conv1", "conv2"), ("conv2", "dw")]
    assert _output_error(equalized, reference, batches) < 0.3 * _output_error(plain, reference, batches)


@torch.no_grad()
def test_bias_correction_matches_output_means_without_touching_the_float_network(tmp_path):
    batches = _batches()
    net = _Unbalanced().eval()
    x = torch.cat(batches)
    float_out = net(x).clone()
    # 4-bit per-tensor weights and 16-bit activations: the weights' own error is what shifts the means.
    config = QuantizationConfig(weight=QuantSpec(4, symmetric=True, per_channel=False),
                                activation=QuantSpec(16, symmetric=False, per_channel=False))
    prepared = prepare_qat(net, config)
    calibrate(prepared, batches)
    uncorrected = prepared(x).clone()
    result = correct_bias(prepared, batches)
    assert result.mean_shift_after < 0.1 * result.mean_shift_before
    corrected = prepared(x)
    # The mean error of the logits (what a bias shifts) falls; the float network's output is unchanged.
    assert float((corrected - float_out).mean(0).abs().max()) < 0.2 * float((uncorrected - float_out).mean(0).abs().max())
    torch.testing.assert_close(net(x), float_out)
    # The offset is part of the deployed model: ONNX Runtime runs the QDQ export like the simulation.
    path = export_qdq_onnx(prepared, x[:1], tmp_path / "bc.onnx")
    session = ort_session(path, fuse_qdq=False)
    ort = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(ort, corrected.numpy(), atol=2e-3)
    # ... and travels in the state dict into a freshly prepared twin.
    twin = prepare_qat(_Unbalanced().eval(), config)
    twin.load_state_dict(prepared.state_dict())
    torch.testing.assert_close(twin.eval()(x), corrected)


@torch.no_grad()
def test_adaround_learns_a_rounding_that_cuts_the_output_error_and_exports_as_simulated(tmp_path):
    batches = _batches()
    net = _Unbalanced().eval()
    x = torch.cat(batches)
    float_out = net(x).clone()
    config = QuantizationConfig(weight=QuantSpec(4, symmetric=True, per_channel=True))
    nearest = post_training_quantize(net, batches, config)
    learned = post_training_quantize(net, batches, config, adaround=True, adaround_iterations=300)
    result = learned.meta["adaround"]
    assert result.layers == ["conv1", "conv2", "dw", "head"]
    # A layer's error also holds its input's quantization, which no rounding of its weights removes (conv1 reads
    # the quantized image: ratio 1.0); the later layers' fall (measured: 0.97, 0.91, 0.50).
    assert 0.0 < result.flipped_fraction < 0.5 and result.error_ratio < 0.9
    assert all(result.error_adaround[n] <= result.error_nearest[n] for n in result.layers)
    assert result.error_adaround["head"] < 0.6 * result.error_nearest["head"]
    # The network's output, not only each layer's, is closer to the float network's (measured: 0.30x the MSE).
    assert float((learned(x) - float_out).pow(2).mean()) < 0.5 * float((nearest(x) - float_out).pow(2).mean())
    torch.testing.assert_close(net(x), float_out)  # the shared float parameters are untouched
    # Every deployed weight sits on its grid point (what the QDQ file, the .tflite and the encodings store) ...
    for name in result.layers:
        layer = learned.get_submodule(name)
        weight, _ = layer.deploy_weight_and_bias()
        scale = layer.weight_quantizer.scale.reshape(-1, *([1] * (weight.dim() - 1)))
        torch.testing.assert_close(weight / scale, torch.round(weight / scale), atol=1e-3, rtol=0)
    # ... so ONNX Runtime runs the learned rounding, and a freshly prepared twin loads it from the state dict.
    path = export_qdq_onnx(learned, x[:1], tmp_path / "adaround.onnx")
    session = ort_session(path, fuse_qdq=False)
    ort = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(ort, learned(x).numpy(), atol=2e-3)
    twin = prepare_qat(_Unbalanced().eval(), config)
    twin.load_state_dict(learned.state_dict())
    torch.testing.assert_close(twin.eval()(x), learned(x))
    # The same seed gives the same rounding.
    again = post_training_quantize(net, batches, config, adaround=True, adaround_iterations=300)
    torch.testing.assert_close(again(x), learned(x))
    # Bias correction after AdaRound matches the *float* network's means, not those of the rounded weights: the
    # float simulation it (and AdaRound's targets) measure against leaves the offsets out.
    both = post_training_quantize(net, batches, config, adaround=True, adaround_iterations=50, bias_correction=True)
    with float_simulation(both):
        torch.testing.assert_close(both(x), float_out)
    assert both.meta["bias_correction"].mean_shift_after < 1e-4


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="iterations=0"):
        equalize_cross_layer(_Unbalanced(), iterations=0)
    with pytest.raises(ValueError, match="already fake-quantized"):
        equalize_cross_layer(prepare_qat(_Unbalanced()))
    with pytest.raises(ValueError, match="no quantized layer"):
        correct_bias(_Unbalanced(), _batches(1))
    with pytest.raises(ValueError, match="bias_correction='yes' must be true or false"):
        PostTrainingQuantization(bias_correction="yes")
    with pytest.raises(ValueError, match="adaround_iterations=0 must be a positive integer"):
        PostTrainingQuantization(adaround=True, adaround_iterations=0)
    with pytest.raises(ValueError, match="adaround='yes' must be true or false"):
        post_training_quantize(_Unbalanced().eval(), _batches(1), adaround="yes")
    with pytest.raises(ValueError, match="no quantized layer"):
        adaround(_Unbalanced(), _batches(1))
    with pytest.raises(ValueError, match="warm_up=1.0"):
        adaround(prepare_qat(_Unbalanced()), _batches(1), warm_up=1.0)


def test_callback_equalizes_corrects_and_restores_from_its_checkpoint(tmp_path):
    L.seed_everything(0)
    datamodule = DMSDataModule(image_size=32, train_size=64, val_size=32, test_size=32, batch_size=16, augment=False)
    ptq = PostTrainingQuantization(calibration_batches=2, per_channel=False, cross_layer_equalization=True,
                                   bias_correction=True, adaround=True, adaround_iterations=10,
                                   dirpath=str(tmp_path / "q"))
    writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(tmp_path / "export"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                        limit_train_batches=2, limit_val_batches=1, callbacks=[ptq, writer, ModelCheckpoint(
                            dirpath=tmp_path / "ckpt", save_last=True)])
    module = DMSClassifier("mobilenet_v2", image_size=32)
    trainer.fit(module, datamodule)
    equalization, correction = ptq.result["equalization"], ptq.result["bias_correction"]
    assert len(equalization["pairs"]) == 36 and len(equalization["relu6_replaced"]) == 34
    assert abs(equalization["fp32_accuracy_before"] - equalization["fp32_accuracy_after"]) <= 0.1
    assert correction["mean_shift_after"] < correction["mean_shift_before"]
    assert ptq.result["adaround"]["layers"] == len(ptq.bias_corrected.layers) == 54 and ptq.result["adaround"]["iterations"] == 10
    assert ptq.int8_networks and ptq.int8_networks[0].parity.min_top1_agreement == 0.99
    # A checkpoint saved after PTQ holds the ReLU (not ReLU6) network, the bias offsets and the learned rounding.
    saved = Path(tmp_path / "q" / "after_ptq.ckpt")
    trainer.save_checkpoint(saved)
    x = torch.cat([batch[0] for batch in datamodule.test_dataloader()])
    expected = module.model.eval()(x)
    fresh = DMSClassifier("mobilenet_v2", image_size=32)
    trainer2 = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "2"),
                         callbacks=[PostTrainingQuantization(calibration_batches=2, per_channel=False)])
    trainer2.test(fresh, datamodule, ckpt_path=str(saved), verbose=False)
    assert is_quantized(fresh.model)
    relu6 = [name for name, m in fresh.model.named_modules() if isinstance(m, nn.ReLU6)]
    assert relu6 == ["features.18.2"]  # the last one feeds the pooling, never a conv: it was never in a pair
    torch.testing.assert_close(fresh.model.eval()(x), expected)

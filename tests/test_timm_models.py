"""Networks built by timm in a user's own LightningModule: its norm + activation layers and ghost modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

timm = pytest.importorskip("timm")

from dms_lightning.export.qdq import fake_quant_disabled  # noqa: E402
from dms_lightning.quant import prepare_qat  # noqa: E402
from dms_lightning.quant.modules import QuantConvBn2d  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _timm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, in_chans=1, pretrained=False)


def test_fake_quant_twin_of_batchnormact_network_uses_running_statistics_in_eval():
    # timm's BatchNormAct2d is a BatchNorm2d subclass: traced into, torch.fx froze training=True in the graph.
    net = _timm("mobilenetv3_small_100").train()
    twin = prepare_qat(net).eval()
    before = {n: b.clone() for n, b in net.named_buffers()}
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        batch, single = twin(images)[:1], twin(images[:1])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert all(torch.equal(before[n], b) for n, b in net.named_buffers()), "eval updated running statistics"


def test_batchnormact_is_folded_and_keeps_its_activation():
    net = _timm("mobilenetv3_small_100").eval()
    twin = prepare_qat(net).eval()
    assert sum(isinstance(m, QuantConvBn2d) for m in twin.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad(), fake_quant_disabled():  # float twin: the folded conv + hardswish compute the network
        torch.testing.assert_close(twin(images), net(images), atol=1e-4, rtol=1e-4)


def test_ghost_module_channels_removed_are_exactly_the_masked_ones():
    # GhostNet concatenates x with a depthwise function of x: removing channel p of x also removes p + size.
    from dms_lightning.pruning import prune_channels, remove_pruned_channels

    net = _timm("ghostnet_100").eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(2, 1, 32, 32)
    chosen, _ = prune_channels(net, images[:1], 0.3, remove=False)
    nonzero = sum(int(torch.count_nonzero(p)) for p in net.parameters())
    with torch.no_grad():
        masked = net(images)
    report = remove_pruned_channels(net, images[:1], pruned_channels=chosen)
    with torch.no_grad():
        removed = net(images)
    torch.testing.assert_close(removed, masked, atol=1e-5, rtol=1e-4)
    assert report.params_after >= nonzero  # nothing beyond the masked channels went


def _trained_twin(net: torch.nn.Module, size: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    twin = prepare_qat(net.train())
    optimizer = torch.optim.SGD(twin.parameters(), lr=1e-3)
    for _ in range(3):  # moves the activation ranges and the weights, as QAT epochs would
        loss = twin(torch.randn(16, 1, size, size)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return twin.eval()


def test_relu_of_batchnormact_is_fused_into_the_conv_output_quantizer():
    # The conv folds the BatchNorm; its ReLU must follow it directly, so one quantizer sits after the ReLU
    # (what QLinearConv computes), rather than one between conv and ReLU and another after it.
    twin = prepare_qat(_timm("mobilenetv3_small_100").eval())
    conv = next(n for n in twin.graph.nodes if n.target == "blocks.1.0.conv_pw")
    (act,) = conv.users
    assert isinstance(twin.get_submodule(act.target), torch.nn.ReLU)
    (quantize,) = act.users
    assert str(quantize.target).startswith("activation_quantizers.")


def test_int8_export_quantizes_each_tensor_once_and_agrees_with_the_fake_quant_network(tmp_path):
    # timm's BatchNormAct2d ends a block's last BatchNorm with identity drop / act layers: a quantizer before
    # and another after them quantized the tensor twice, with two scales; ONNX Runtime merges such Q/DQ pairs
    # into one, so the exported graph computed something else than the network it was checked against.
    import onnx

    from dms_lightning.export.parity import check_parity
    from dms_lightning.export.qdq import export_qdq_onnx

    twin = _trained_twin(_timm("mobilenetv3_small_100"))
    path = export_qdq_onnx(twin, torch.zeros(1, 1, 32, 32), tmp_path / "int8.onnx")
    graph = onnx.load(str(path)).graph
    produced_by = {output: node for node in graph.node for output in node.output}
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    twice = [(producer.name, node.name) for node in graph.node if node.op_type == "QuantizeLinear"
             for producer in [produced_by.get(node.input[0])]
             if producer is not None and producer.op_type == "DequantizeLinear"
             and not (values[producer.input[1]] == values[node.input[1]]).all()]
    assert not twice, f"tensors quantized twice with different scales: {twice}"
    torch.manual_seed(1)
    result, _, _ = check_parity(twin, path, torch.randn(64, 1, 32, 32), atol=None, raise_on_failure=False,
                                fuse_qdq=False)
    assert result.top1_agreement >= 0.99, result.describe()


def test_channels_through_an_unequal_split_are_left_unpruned():
    # MobileViT-v2's attention splits qkv into [1, embed_dim, embed_dim], sizes stored on the module: pruning
    # through it emptied the 1-channel query slice (a crash at removal, after the whole schedule) or broke the
    # forward's split_with_sizes.
    from dms_lightning.pruning import prune_channels

    net = _timm("mobilevitv2_050").eval()
    qkv = {name: m.out_channels for name, m in net.named_modules() if name.endswith("attn.qkv_proj")}
    images = torch.randn(2, 1, 32, 32)
    with pytest.warns(UserWarning, match=r"attn\.qkv_proj' passes through a split into unequal parts \[1, "):
        _, report = prune_channels(net, images[:1], 0.3)
    assert report.params_after < 0.8 * report.params_before
    assert {name: net.get_submodule(name).out_channels for name in qkv} == qkv
    with torch.no_grad():
        assert net(images).shape == (2, 5)


def test_fastvit_prunes_around_its_depthwise_multiplier_convs():
    # FastViT's downsampling and final convs are depthwise with a channel multiplier (groups == in_channels <
    # out_channels): Torch-Pruning's L1 scores raised IndexError at the first pruning point for the groups
    # feeding them. Those groups stay whole; the rest is pruned and removed exactly.
    from dms_lightning.pruning import prune_channels, remove_pruned_channels

    net = _timm("fastvit_t8").eval()
    images = torch.randn(2, 1, 64, 64)
    with pytest.warns(UserWarning, match=r"feeds the depthwise conv 'final_conv\.conv_kxk\.0\.conv'"):
        chosen, _ = prune_channels(net, images[:1], 0.3, remove=False)
    with torch.no_grad():
        masked = net(images)
    report = remove_pruned_channels(net, images[:1], pruned_channels=chosen)
    with torch.no_grad():
        torch.testing.assert_close(net(images), masked, atol=1e-5, rtol=1e-4)
    assert report.params_after < 0.9 * report.params_before


class _TimmUser(LightningModule):
    """A user's own module around a timm network: no ``compression_target``, no ``example_input_array``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.net = _timm(name)
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("quantization", ["ptq", "qat"])
def test_network_torch_fx_cannot_trace_is_refused_before_training(quantization, tiny_datamodule, fast_trainer_kwargs):
    # MobileViT-v2's attention branches on a tensor size: torch.fx cannot trace it. The quantizers are wrapped at
    # QAT's start_epoch or when fit ends (PTQ), so the run trained for nothing and then crashed.
    from dms_lightning.callbacks import PostTrainingQuantization, QuantizationAwareTraining

    callback = PostTrainingQuantization(calibration_batches=1, export=False) if quantization == "ptq" else \
        QuantizationAwareTraining(start_epoch=1, export=False)
    module = _TimmUser("mobilevitv2_050")
    trainer = Trainer(callbacks=[callback], **{**fast_trainer_kwargs, "max_epochs": 2})
    with pytest.raises(MisconfigurationException, match=r"cannot quantize _TimmUser\.net: ByobNet cannot be traced "
                                                        r"by torch\.fx.*, at .*mobilevit\.py:\d+ in forward"):
        trainer.fit(module, tiny_datamodule(image_size=32))
    assert module.steps == 0


def test_n_m_pruning_reports_the_sparsity_its_pattern_applies(tiny_datamodule, fast_trainer_kwargs):
    # N:M applies its whole pattern at the first point: the log and pruning/target_sparsity said 0.000 there.
    from dms_lightning.callbacks import IterativePruning

    pruning = IterativePruning(method="n_m", start_epoch=0, end_epoch=1, plot_layer_sparsity=False)
    trainer = Trainer(callbacks=[pruning], **{**fast_trainer_kwargs, "max_epochs": 2, "limit_train_batches": 1,
                                              "limit_val_batches": 1})
    trainer.fit(_TimmUser("mobilenetv3_small_100"), tiny_datamodule(image_size=32))
    assert [entry["target"] for entry in pruning.history] == [0.5, 0.5]
    assert all(entry["sparsity"] == pytest.approx(entry["target"], abs=1e-3) for entry in pruning.history)

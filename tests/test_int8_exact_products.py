"""ONNX Runtime's saturating uint8 x int8 kernels on x86 CPUs without VNNI: detected, and avoided where they bite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dms_lightning.export import export_onnx
from dms_lightning.export import runtimes
from dms_lightning.export.qdq import export_qdq_onnx
from dms_lightning.quant import post_training_quantize
from dms_lightning.quant.targets import target_profile
from dms_lightning.utils import cpu


@pytest.mark.parametrize(("machine", "flags", "saturates"), [
    ("x86_64", {"avx2", "fma"}, True),                   # AVX2 without VNNI: vpmaddubsw pairs
    ("x86_64", {"avx2", "avx512f"}, True),               # AVX-512 without VNNI: the same instruction, wider
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("x86_64", set(), True),                              # flags unreadable: assume the worst
    ("aarch64", {"asimddp"}, False),
])
def test_which_cpus_add_int8_products_in_saturating_pairs(monkeypatch, machine, flags, saturates):
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    assert cpu.int8_pair_sums_saturate() is saturates


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exact_int8")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    example, calibration = torch.zeros(1, 8, 12, 12), [torch.randn(4, 8, 12, 12)]
    x86 = target_profile("cpu_x86")
    return {
        "fp32": export_onnx(net, example, folder / "fp32.onnx"),
        "int8": export_qdq_onnx(post_training_quantize(net, calibration, x86.config()), example, folder / "w8.onnx"),
        "int8, 7-bit weights": export_qdq_onnx(post_training_quantize(net, calibration, x86.config(weight_bits=7)),
                                               example, folder / "w7.onnx"),
    }


def _exact(session) -> str:
    options = session.get_session_options()
    try:
        return options.get_session_config_entry(runtimes.EXACT_INT8_PRODUCTS)
    except RuntimeError:  # never set
        return ""


def test_sessions_ask_for_exact_products_only_where_8_bit_weights_would_saturate(monkeypatch, models):
    monkeypatch.setattr(runtimes, "int8_pair_sums_saturate", lambda: True)  # an AVX2 machine
    needed = {name: runtimes.exact_int8_products_needed(path) for name, path in models.items()}
    assert needed == {"fp32": False, "int8": True, "int8, 7-bit weights": False}
    assert _exact(runtimes.ort_session(models["int8"])) == "1"
    assert _exact(runtimes.ort_session(models["int8"], exact_int8=False)) != "1"
    # a graph run with float Q/DQ has no integer products to saturate
    assert _exact(runtimes.ort_session(models["int8"], fuse_qdq=False)) != "1"
    monkeypatch.setattr(runtimes, "int8_pair_sums_saturate", lambda: False)  # a VNNI machine: exact anyway
    assert not runtimes.exact_int8_products_needed(models["int8"])
    assert _exact(runtimes.ort_session(models["int8"])) != "1"


def _output_step(path) -> float:
    """The scale of the DequantizeLinear that writes the graph's output: one step of the INT8 logits."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    last = next(node for node in model.graph.node if node.output[0] == model.graph.output[0].name)
    assert last.op_type == "DequantizeLinear"
    return float(constants[last.input[1]])


def test_exact_products_compute_what_the_graph_does_on_any_cpu(models):
    x = torch.randn(3, 8, 12, 12).numpy()
    graph = runtimes.session_outputs(runtimes.ort_session(models["int8"], fuse_qdq=False), x, None)
    exact = runtimes.session_outputs(runtimes.ort_session(models["int8"], exact_int8=True), x, None)
    # fused kernels requantize in fixed point, the graph in float: at most one step of the output grid apart
    assert abs(exact - graph).max() <= _output_step(models["int8"]) * 1.001
    if not cpu.int8_pair_sums_saturate():  # a VNNI CPU: the default kernels are exact too, the option changes nothing
        default = runtimes.session_outputs(runtimes.ort_session(models["int8"], exact_int8=False), x, None)
        assert abs(default - exact).max() <= 1e-6

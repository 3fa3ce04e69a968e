"""Qualcomm's own reader of the bundle's encodings: aimet-onnx's QuantizationSimModel of ``snpe_bundle/model.onnx``
with ``encodings.json`` loaded must simulate what our ``model_qdq.onnx`` computes (runs when aimet-onnx is
installed: ``pip install -e ".[aimet]"``)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import PostTrainingQuantization, SNPEExport
from dms_lightning.export import ENCODINGS_VERSIONS, format_encodings, read_encodings
from dms_lightning.export.runtimes import ort_session

quantsim = pytest.importorskip("aimet_onnx.quantsim")

IMAGE = 48


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """MobileNetV3-small trained 72 steps (predictions that depend on the input), PTQ, bundled; the test images."""
    root = tmp_path_factory.mktemp("aimet")
    L.seed_everything(0)
    datamodule = DMSDataModule(image_size=IMAGE, train_size=768, val_size=64, test_size=128, batch_size=32,
                               augment=False)
    model = DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32,
                          optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(root), callbacks=[
                            PostTrainingQuantization(calibration_batches=1, evaluate_batches=1, min_agreement=0.0,
                                                     export=False),
                            SNPEExport(dirpath=str(root), checkpoint="last", calibration_images=4)])
    trainer.fit(model, datamodule)
    datamodule.setup("test")
    images = np.concatenate([x.numpy() for x, _ in datamodule.test_dataloader()])
    return root / "snpe_bundle", images


def _logits(session, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))])


@pytest.mark.slow
@pytest.mark.parametrize("version", ENCODINGS_VERSIONS)
def test_aimet_loads_the_bundle_encodings_as_written_and_simulates_our_int8_model(bundle, tmp_path, version):
    directory, images = bundle
    ours = read_encodings(directory / "encodings.json")
    path = tmp_path / "encodings.json"
    path.write_text(json.dumps(format_encodings(ours, version)))

    sim = quantsim.QuantizationSimModel(onnx.load(str(directory / "model.onnx")))
    # Non-strict: AIMET's default placement also quantizes tensors our graph keeps float (hardswish outputs, ...);
    # those quantizers are disabled, and only such placement differences may be reported.
    mismatches = quantsim.load_encodings_to_sim(sim, str(path), strict=False)
    for info in mismatches:
        settings = {k: v for k, v in vars(info).items() if k not in ("quantizer_name", "enabled_mismatch") and v}
        assert not settings, f"{info.quantizer_name}: AIMET reads a different grid than written: {settings}"

    # Every encoding is simulated with exactly the scale and offset written.
    for section in ("activation_encodings", "param_encodings"):
        for name, entries in ours[section].items():
            quantizer = sim.qc_quantize_op_dict[name]
            assert quantizer.enabled, name
            loaded = quantizer.get_encodings()
            np.testing.assert_allclose([e.delta for e in loaded], [e["scale"] for e in entries], rtol=1e-7)
            assert [int(e.offset) for e in loaded] == [e["offset"] for e in entries], name

    # The network input, where every pixel of the default preprocessing used to sit on a rounding tie: AIMET's
    # simulated integers must be ours for every test image.
    graph = sim.model.model.graph
    (quantized_input,) = [n.output[0] for n in graph.node if n.op_type == "QcQuantizeOp" and n.input[0] == "input"]
    graph.output.append(onnx.helper.make_empty_tensor_value_info(quantized_input))
    session = ort.InferenceSession(sim.model.model.SerializeToString(), sim._ort_session_options,
                                   providers=["CPUExecutionProvider"])
    (entry,) = ours["activation_encodings"]["input"]
    aimet_input = np.concatenate([session.run([quantized_input], {"input": images[i:i + 1]})[0]
                                  for i in range(len(images))])
    ours_input = (np.clip(np.rint(images / np.float32(entry["scale"])) - entry["offset"], 0, 255)
                  + entry["offset"]) * np.float32(entry["scale"])
    np.testing.assert_allclose(aimet_input, ours_input, rtol=0, atol=entry["scale"] * 1e-3)

    simulated = _logits(sim.session, images)
    # Our QDQ model's own semantics: Q/DQ as float ops, no graph rewrites (ONNX Runtime's optimised float kernels
    # flip near-tied predictions of this short-trained network by themselves).
    reference = _logits(ort_session(directory / "model_qdq.onnx", fuse_qdq=False, optimize=False), images)
    agreement = float((simulated.argmax(1) == reference.argmax(1)).mean())
    assert agreement >= 0.99, f"AIMET's simulation agrees with model_qdq.onnx on {agreement:.1%} of test top-1"

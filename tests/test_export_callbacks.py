"""ONNXExport and SNPEExport in real (tiny) fits: best-checkpoint export, INT8, manifest, bundle, fake SDK."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_export_units import FakeQuantCNN
from torch import nn

from dms_lightning import DMSDataModule
from dms_lightning.callbacks import ONNXExport, SNPEExport
from dms_lightning.export import ParityError, fake_quant_disabled, has_qdq, read_encodings
from dms_lightning.export.runtimes import onnxruntime_outputs, openvino_available
from dms_lightning.export.sdk import SDKToolError
from dms_lightning.utils.artifacts import variants
from dms_lightning.utils.io import sha256_file

CLASSES = ["alert", "eyes_closed", "yawning", "looking_away", "phone"]
SDK_TOOLS = ("snpe-onnx-to-dlc", "snpe-dlc-quantize", "snpe-dlc-graph-prepare", "qnn-onnx-converter",
             "qnn-model-lib-generator", "qnn-context-binary-generator")


class FloatCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        self.eager_offset = 0.0  # set to simulate a model the exporter does not reproduce

    def forward(self, x):
        logits = self.fc(self.features(x))
        return logits if torch.jit.is_tracing() else logits + self.eager_offset


class TinyClassifier(LightningModule):
    """Logs ``val/score = -epoch`` so the best checkpoint is always epoch 0; optionally narrows at epoch 1."""

    def __init__(self, in_channels: int = 1, fake_quant: bool = False, prune_at_epoch: int | None = None,
                 width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = FakeQuantCNN(in_channels) if fake_quant else FloatCNN(in_channels, width=width)
        self.class_names, self.in_channels, self.image_size = CLASSES, in_channels, 16

    @property
    def compression_target(self) -> nn.Module:
        return self.model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -float(self.current_epoch))

    def on_train_epoch_start(self):
        if self.hparams.prune_at_epoch == self.current_epoch:
            narrow = FloatCNN(self.in_channels, width=6)
            self.model = narrow.to(self.device)  # a physically smaller network than the best checkpoint's
            self.trainer.strategy.setup_optimizers(self.trainer)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def make_fake_sdk(root: Path, record: Path, fail: str | None = None) -> Path:
    """An SDK directory whose tools record their argv and cwd, check their inputs and touch their outputs."""
    bindir = root / "bin" / "x86_64-linux-clang"
    bindir.mkdir(parents=True)
    (root / "lib" / "x86_64-linux-clang").mkdir(parents=True)
    (root / "lib" / "x86_64-linux-clang" / "libQnnHtp.so").touch()
    for tool in SDK_TOOLS:
        failure = f'echo "ERROR: calibration input list is empty" >&2; exit 3' if tool == fail else ""
        script = f"""#!/usr/bin/env bash
record="${{RECORD:-{record}}}"
printf '%s' "$(basename "$0")" >> "$record"; for a in "$@"; do printf ' %s' "$a" >> "$record"; done
printf '\\n' >> "$record"; echo "$PWD" >> "$record.cwd"
{failure}
prev=""; out=""; target=""; binary=""
for a in "$@"; do
  case "$prev" in
    --input_network|--input_dlc|--input_list|--quantization_overrides|-c|-b|--model|--backend)
      [ -e "$a" ] || {{ echo "missing input $a" >&2; exit 2; }};;
    --output_path|--output_dlc) mkdir -p "$(dirname "$a")"; touch "$a"; out="$a";;
    -o|--output_dir) out="$a";;
    -t) target="$a";;
    --binary_file) binary="$a";;
  esac
  prev="$a"
done
case "$(basename "$0")" in
  qnn-onnx-converter) touch "${{out%.cpp}}.bin";;
  qnn-model-lib-generator) mkdir -p "$out/$target"; touch "$out/$target/libmodel.so";;
  qnn-context-binary-generator) touch "$out/$binary.bin";;
esac
"""
        path = bindir / tool
        path.write_text(script)
        path.chmod(0o755)
    return root


def _trainer(tmp_path: Path, callbacks: list, epochs: int = 2) -> Trainer:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_last=True)
    return Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=2, limit_val_batches=1,
                   logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[checkpoint, *callbacks],
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _datamodule(channels: int = 1) -> DMSDataModule:
    return DMSDataModule(image_size=16, channels=channels, train_size=32, val_size=32, test_size=16,
                         batch_size=16, augment=False)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """One fit of a fake-quant network with both callbacks, the SDK faked, 3-channel images."""
    tmp = tmp_path_factory.mktemp("qat")
    record = tmp / "argv.txt"
    sdk = make_fake_sdk(tmp / "sdk", record)
    torch.manual_seed(0)
    module, datamodule = TinyClassifier(in_channels=3, fake_quant=True), _datamodule(channels=3)
    onnx_export = ONNXExport(name="tiny")
    snpe_export = SNPEExport(runtime="htp", calibration_images=6, sdk_root=str(sdk))
    trainer = _trainer(tmp, [onnx_export, snpe_export])
    trainer.fit(module, datamodule)
    export_dir = Path(trainer.log_dir) / "export"
    return dict(trainer=trainer, module=module, datamodule=datamodule, dir=export_dir, sdk=sdk, record=record,
                bundle=export_dir / "snpe_bundle", best=trainer.checkpoint_callback.best_model_path)


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """One fit of a float network that is narrowed (pruned) at epoch 1, without export callbacks."""
    tmp = tmp_path_factory.mktemp("float")
    torch.manual_seed(0)
    module, datamodule = TinyClassifier(prune_at_epoch=1), _datamodule()
    trainer = _trainer(tmp, [])
    trainer.fit(module, datamodule)
    return dict(trainer=trainer, module=module, tmp=tmp)


def test_best_checkpoint_is_exported_in_fp32_and_int8(qat_run):
    exported = {p.name for p in qat_run["dir"].glob("*.onnx")}
    assert exported == {"tiny_fp32.onnx", "tiny_int8.onnx"}
    fp32 = onnx.load(str(qat_run["dir"] / "tiny_fp32.onnx"))
    int8 = onnx.load(str(qat_run["dir"] / "tiny_int8.onnx"))
    assert not has_qdq(fp32) and has_qdq(int8)
    assert "epoch=0" in qat_run["best"]
    best = FakeQuantCNN(3)
    best.load_state_dict({k[6:]: v for k, v in torch.load(qat_run["best"])["state_dict"].items()})
    best.eval()
    images = next(iter(qat_run["datamodule"].val_dataloader()))[0]
    with torch.no_grad():
        int8_reference = best(images).numpy()
        with fake_quant_disabled():
            fp32_reference = best(images).numpy()
        final = qat_run["module"].model.eval()(images).numpy()
    ort_fp32 = onnxruntime_outputs(qat_run["dir"] / "tiny_fp32.onnx", images.numpy())
    np.testing.assert_allclose(ort_fp32, fp32_reference, atol=1e-4)
    assert np.abs(ort_fp32 - final).max() > 1e-2  # the last epoch's weights were not the ones exported
    agreement = (onnxruntime_outputs(qat_run["dir"] / "tiny_int8.onnx", images.numpy()).argmax(1)
                 == int8_reference.argmax(1)).mean()
    assert agreement >= 0.95


def test_metadata_carries_classes_and_preprocessing_for_a_runtime(qat_run):
    model = onnx.load(str(qat_run["dir"] / "tiny_fp32.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert props["image_size"] == "16" and props["channels"] == "3"
    assert json.loads(props["mean"]) == [0.5] * 3 and json.loads(props["std"]) == [0.25] * 3
    assert json.loads(props["preprocessing"])["class_names"] == CLASSES
    graph_input = model.graph.input[0]
    assert graph_input.name == "input" and model.graph.output[0].name == "logits"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnxruntime_outputs(model, np.zeros((3, 3, 16, 16), np.float32)).shape == (3, 5)


def test_manifest_lists_every_artifact_with_hash_size_opset_shape_and_parity(qat_run):
    manifest = json.loads((qat_run["dir"] / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["artifacts"]}
    assert set(entries) == {"tiny_fp32", "tiny_int8", "snpe_bundle"}
    for name in ("tiny_fp32", "tiny_int8"):
        entry, path = entries[name], qat_run["dir"] / f"{name}.onnx"
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        assert entry["opset"] == 18 and entry["input_shape"] == ["batch", 3, 16, 16]
        assert entry["parity"]["passed"] and entry["parity"]["samples"] == 16
        assert entry["source"]["checkpoint"] == "best" and "epoch=0" in entry["source"]["path"]
        assert (qat_run["dir"] / f"{name}_parity.png").stat().st_size > 0
    assert entries["tiny_fp32"]["parity"]["max_abs_diff"] < 1e-3
    assert entries["tiny_int8"]["parity"]["runtime"] == "onnxruntime (QDQ unfused)"  # the graph's semantics
    assert entries["tiny_int8"]["onnxruntime_int8_kernels"]["samples"] == 16  # ORT's fused kernels, reported
    bundle_files = {f["path"] for f in entries["snpe_bundle"]["files"]}
    assert "snpe_bundle/model.onnx" in bundle_files and "snpe_bundle/convert.sh" in bundle_files
    registered = {v.name: v.precision for v in variants(qat_run["trainer"])}
    assert registered == {"tiny_fp32": "fp32", "tiny_int8": "int8"}
    events = EventAccumulator(qat_run["trainer"].log_dir)
    events.Reload()
    assert {"export/tiny_fp32/max_abs_diff", "export/tiny_int8/top1_agreement"} <= set(events.Tags()["scalars"])
    assert "export/tiny_int8_parity" in events.Tags()["images"]


def test_fake_sdk_receives_the_exact_commands_paths_and_flags(qat_run):
    calls = qat_run["record"].read_text().splitlines()
    backend = qat_run["sdk"] / "lib" / "x86_64-linux-clang" / "libQnnHtp.so"
    assert calls == [
        "snpe-onnx-to-dlc --input_network model.onnx --output_path snpe/model.dlc "
        "--quantization_overrides encodings.json",
        "snpe-dlc-quantize --input_dlc snpe/model.dlc --input_list input_list.txt --output_dlc "
        "snpe/model_quantized.dlc --override_params --bias_bitwidth 32",
        "snpe-dlc-graph-prepare --input_dlc snpe/model_quantized.dlc --output_dlc snpe/model_htp.dlc "
        "--htp_socs sm8550",
        "qnn-onnx-converter --input_network model.onnx --output_path qnn/model.cpp --input_list input_list.txt "
        "--quantization_overrides encodings.json --bias_bw 32",
        "qnn-model-lib-generator -c qnn/model.cpp -b qnn/model.bin -o qnn/libs -t x86_64-linux-clang",
        f"qnn-context-binary-generator --backend {backend} --model qnn/libs/x86_64-linux-clang/libmodel.so "
        "--binary_file model_htp --output_dir qnn",
    ]
    # The tools ran in the staging copy, renamed onto the bundle only after they all succeeded.
    workdirs = set(Path(qat_run["record"].with_suffix(".txt.cwd")).read_text().split())
    assert len(workdirs) == 1 and Path(workdirs.pop()).name.startswith(".snpe_bundle.")
    bundle = qat_run["bundle"]
    assert (bundle / "snpe" / "model_htp.dlc").exists() and (bundle / "qnn" / "model_htp.bin").exists()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["conversion"]["status"] == "converted" and len(manifest["conversion"]["steps"]) == 6
    # convert.sh is the same command list: rerun it against the fake SDK and compare.
    rerun = qat_run["record"].with_name("rerun.txt")
    env = dict(os.environ, SNPE_ROOT=str(qat_run["sdk"]), QNN_SDK_ROOT=str(qat_run["sdk"]), RECORD=str(rerun))
    subprocess.run(["bash", str(bundle / "convert.sh")], env=env, check=True, capture_output=True)
    assert rerun.read_text().splitlines() == calls


def test_bundle_model_is_static_batch_one_and_its_encodings_cover_every_quantized_tensor(qat_run):
    bundle = qat_run["bundle"]
    model = onnx.load(str(bundle / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]
    assert not has_qdq(model) and has_qdq(onnx.load(str(bundle / "model_qdq.onnx")))
    encodings = read_encodings(bundle / "encodings.json")
    tensors = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {"input"}
    names = set(encodings["activation_encodings"]) | set(encodings["param_encodings"])
    assert {"input", "conv1.weight", "conv2.weight", "fc.weight"} <= names <= tensors
    for entries in list(encodings["activation_encodings"].values()) + list(encodings["param_encodings"].values()):
        assert all({"bitwidth", "min", "max", "scale", "offset", "is_symmetric"} <= set(e) for e in entries)
    coverage = json.loads((bundle / "manifest.json").read_text())["encodings_coverage"]
    assert coverage["missing"] == [] and coverage["covered"] == len(names)


def test_calibration_raws_round_trip_to_the_validation_images(qat_run):
    bundle = qat_run["bundle"]
    listed = (bundle / "input_list.txt").read_text().split()
    assert len(listed) == 6
    images = next(iter(qat_run["datamodule"].val_dataloader()))[0][:6]
    for line, image in zip(listed, images):
        raw = np.fromfile(bundle / line, dtype=np.float32).reshape(16, 16, 3)  # NHWC as SNPE reads it
        np.testing.assert_array_equal(raw.transpose(2, 0, 1), image.numpy())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["device_shape"] == [1, 16, 16, 3] and manifest["input"]["device_layout"] == "NHWC"


def test_without_sdk_the_bundle_is_written_and_one_line_says_conversion_was_skipped(float_run, monkeypatch, caplog):
    monkeypatch.delenv("SNPE_ROOT", raising=False)
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    callback = SNPEExport(dirpath=str(float_run["tmp"] / "skip"), runtime="cpu", checkpoint="last",
                          calibration_images=3)
    with caplog.at_level(logging.INFO):
        bundle = callback.export(float_run["trainer"], float_run["module"])
    skipped = [r.getMessage() for r in caplog.records if "conversion skipped" in r.getMessage()]
    assert len(skipped) == 1 and "convert.sh" in skipped[0]
    assert {p.name for p in bundle.iterdir()} == {"model.onnx", "calibration", "input_list.txt", "convert.sh",
                                                  "manifest.json"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["conversion"]["status"] == "skipped" and manifest["precision"] == "fp32"
    assert "--override_params" not in (bundle / "convert.sh").read_text()


def test_failing_sdk_tool_surfaces_its_stderr_and_leaves_no_finished_bundle(float_run, tmp_path):
    sdk = make_fake_sdk(tmp_path / "sdk", tmp_path / "argv.txt", fail="snpe-dlc-quantize")
    callback = SNPEExport(dirpath=str(tmp_path / "out"), checkpoint="last", calibration_images=2, sdk_root=str(sdk))
    with pytest.raises(SDKToolError, match=r"(?s)snpe-dlc-quantize failed with exit code 3.*input list is empty"):
        callback.export(float_run["trainer"], float_run["module"])
    assert not (tmp_path / "out" / "snpe_bundle").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
    failed = tmp_path / "out" / "snpe_bundle.failed"
    assert (failed / "convert.sh").exists() and any((failed / "logs").iterdir())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["snpe_bundle.failed"]


def test_best_checkpoint_of_an_older_architecture_is_rebuilt_through_load_from_checkpoint(float_run):
    trainer, module = float_run["trainer"], float_run["module"]
    assert module.model.fc.in_features == 6  # narrowed after the best epoch
    paths = ONNXExport(dirpath=str(float_run["tmp"] / "best"), opset=17).export(trainer, module)
    weight_shapes = {i.name: list(i.dims) for i in onnx.load(str(paths["model_fp32"])).graph.initializer}
    assert weight_shapes["fc.weight"] == [5, 8]
    last = ONNXExport(dirpath=str(float_run["tmp"] / "last"), checkpoint="last").export(trainer, module)
    assert {i.name: list(i.dims) for i in onnx.load(str(last["model_fp32"])).graph.initializer}["fc.weight"] == [5, 6]


def test_parity_failure_in_the_callback_raises_with_figures_and_writes_nothing(float_run):
    module, directory = float_run["module"], float_run["tmp"] / "perturbed"
    module.model.eager_offset = 0.75
    try:
        with pytest.raises(ParityError, match=r"model_fp32 failed the parity check.*max \|diff\| 0\.75"):
            ONNXExport(dirpath=str(directory), checkpoint="last").export(float_run["trainer"], module)
    finally:
        module.model.eager_offset = 0.0
    assert not list(directory.glob("*.onnx")) and not (directory / "manifest.json").exists()
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    module = TinyClassifier()
    trainer = _trainer(tmp_path, [ONNXExport(dirpath=str(blocker / "export"))], epochs=1)
    with pytest.raises(PermissionError, match="ONNXExport.dirpath="):
        trainer.fit(module, _datamodule())
    assert trainer.global_step == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"opset": 11}, "opset=11"), ({"checkpoint": "middle"}, "checkpoint='middle'"),
    ({"int8_min_top1_agreement": 1.5}, "int8_min_top1_agreement=1.5"), ({"name": "a/b"}, "name='a/b'"),
])
def test_onnx_export_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ONNXExport(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runtime": "npu"}, "runtime='npu'"), ({"toolchains": ["tflite"]}, "toolchains=\\['tflite'\\]"),
    ({"calibration_images": 0}, "calibration_images=0"), ({"sdk_root": "/no/such/sdk"}, "sdk_root='/no/such/sdk'"),
])
def test_snpe_export_arguments_are_validated(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        SNPEExport(**kwargs)


@pytest.mark.skipif(not openvino_available(), reason="openvino is an optional extra")
def test_openvino_loads_the_export_and_agrees_with_onnxruntime(float_run):
    paths = ONNXExport(dirpath=str(float_run["tmp"] / "ov"), checkpoint="last", openvino=True).export(
        float_run["trainer"], float_run["module"])
    manifest = json.loads((paths["model_fp32"].parent / "manifest.json").read_text())
    figures = manifest["artifacts"][0]["openvino"]
    assert figures["passed"] and figures["runtime"] == "openvino" and figures["max_abs_diff"] < 1e-3



def test_network_quantized_by_the_qat_callback_exports_int8_and_a_fully_encoded_bundle(tmp_path):
    qat = pytest.importorskip("dms_lightning.quant.qat")
    torch.manual_seed(0)
    module = TinyClassifier()
    callbacks = [qat.QuantizationAwareTraining(start_epoch=0, export=False),
                 ONNXExport(checkpoint="last"), SNPEExport(checkpoint="last", calibration_images=4, runtime="dsp")]
    trainer = _trainer(tmp_path, callbacks, epochs=1)
    trainer.fit(module, _datamodule())
    export_dir = Path(trainer.log_dir) / "export"
    entries = {e["name"]: e for e in json.loads((export_dir / "manifest.json").read_text())["artifacts"]}
    assert entries["model_int8"]["parity"]["passed"] and entries["model_fp32"]["parity"]["max_abs_diff"] < 1e-3
    int8 = onnx.load(str(export_dir / "model_int8.onnx"))
    weights = [i for i in int8.graph.initializer if len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)  # integers, not float + Q
    bundle = json.loads((export_dir / "snpe_bundle" / "manifest.json").read_text())
    assert bundle["precision"] == "int8" and bundle["encodings_coverage"]["missing"] == []
    assert bundle["encodings_coverage"]["not_overridden"] == []
    assert "snpe-dlc-graph-prepare" not in (export_dir / "snpe_bundle" / "convert.sh").read_text()  # dsp, not htp


def test_bundle_takes_encodings_from_a_registered_onnxruntime_ptq_variant(float_run, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from dms_lightning.export import export_onnx
    from dms_lightning.utils.artifacts import Variant

    trainer, module = float_run["trainer"], float_run["module"]
    images = next(iter(trainer.datamodule.val_dataloader()))[0]
    fp32 = export_onnx(module.model.eval(), images[:1], tmp_path / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": images[i:i + 4].numpy()} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(tmp_path / "ptq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)

    class Producer(Callback):
        produces_variants = True
        variants = [Variant("ptq_test_int8", str(tmp_path / "ptq.onnx"), "int8", "PostTrainingQuantization")]

    trainer.callbacks.append(producer := Producer())
    try:
        bundle = SNPEExport(dirpath=str(tmp_path / "out"), checkpoint="last", calibration_images=4,
                            int8_variant="ptq_test_int8").export(trainer, module)
    finally:
        trainer.callbacks.remove(producer)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and "ptq_test_int8" in manifest["encodings_source"]
    assert manifest["encodings_coverage"]["missing"] == [] and manifest["parity"]["top1_agreement"] == 1.0
    encodings = read_encodings(bundle / "encodings.json")
    float_graph = onnx.load(str(bundle / "model.onnx"))
    conv_weights = [n.input[1] for n in float_graph.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w in encodings["param_encodings"] for w in conv_weights)


def test_a_rerun_into_the_same_export_folder_lists_only_its_own_artifacts(tmp_path):
    """A plain Trainer rerun without INT8 into the folder of a run with INT8: the manifest forgets the INT8."""
    export_dir = tmp_path / "export"

    def run(export_int8: bool) -> dict:
        torch.manual_seed(0)
        callbacks = [ONNXExport(dirpath=str(export_dir), name="tiny", checkpoint="last", export_int8=export_int8)]
        trainer = _trainer(tmp_path / f"run_{export_int8}", callbacks, epochs=1)
        trainer.fit(TinyClassifier(fake_quant=export_int8), _datamodule())
        return {e["name"] for e in json.loads((export_dir / "manifest.json").read_text())["artifacts"]}

    first = run(export_int8=True)
    assert {"tiny_fp32", "tiny_int8"} <= first
    second = run(export_int8=False)
    assert "tiny_fp32" in second and "tiny_int8" not in second


class _TwoOutputs(LightningModule):
    """forward returns (logits, embedding), as multi-output projects do; the logits network is ``self.net``."""

    def __init__(self, with_target: bool) -> None:
        super().__init__()
        self.net = FloatCNN(1)
        self.with_target = with_target
        self.class_names, self.in_channels, self.image_size = CLASSES, 1, 16

    @property
    def compression_target(self) -> nn.Module:
        return self.net if self.with_target else self

    def forward(self, x):
        logits = self.net(x)
        return logits, logits.softmax(dim=1)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])[0], batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_returning_several_outputs_is_refused_before_training_with_the_recipe(tmp_path):
    export = ONNXExport(dirpath=str(tmp_path / "export"), checkpoint="last", parity_batches=1)
    trainer = _trainer(tmp_path, [export], epochs=1)
    with pytest.raises(MisconfigurationException,
                       match=r"ONNXExport exports _TwoOutputs .* returns a tuple of 2 .* `compression_target`"):
        trainer.fit(_TwoOutputs(with_target=False), _datamodule())
    assert trainer.global_step == 0 and not list((tmp_path / "export").glob("*.onnx"))

    # the recipe: compression_target names the logits network, and the export goes through
    trainer = _trainer(tmp_path / "fixed", [ONNXExport(dirpath=str(tmp_path / "fixed_export"), checkpoint="last",
                                                       parity_batches=1)], epochs=1)
    trainer.fit(_TwoOutputs(with_target=True), _datamodule())
    assert (tmp_path / "fixed_export" / "model_fp32.onnx").is_file()


def test_the_logits_check_leaves_every_submodule_in_its_mode():
    from types import SimpleNamespace

    from dms_lightning.export.source import check_logits_output

    module = _TwoOutputs(with_target=True).train()
    module.example_input_array = torch.zeros(1, 1, 16, 16)
    frozen = module.net.features[1].eval()  # e.g. a frozen BatchNorm in a user's network
    check_logits_output("ONNXExport", SimpleNamespace(), module)
    assert module.net.training and not frozen.training
    assert all(m.training for m in module.net.modules() if m is not frozen)


class _Head(nn.Module):
    def __init__(self, make_output) -> None:
        super().__init__()
        self.conv, self.make_output = nn.Conv2d(1, 5, 3), make_output

    def forward(self, x):
        return self.make_output(self.conv(x))


@pytest.mark.parametrize("make_output, refused", [
    (lambda y: y.mean((2, 3)), None),                       # N x classes
    (lambda y: y.mean((2, 3), keepdim=True), None),         # N x classes x 1 x 1: a fully convolutional head
    (lambda y: y, r"shape \(1, 5, 14, 14\)"),               # a feature map
    (lambda y: {"logits": y.mean((2, 3))}, r"a dict of 1"),
])
def test_the_logits_check_takes_classifier_outputs_only(make_output, refused):
    from types import SimpleNamespace

    from dms_lightning.export.source import check_logits_output

    module = _TwoOutputs(with_target=True)
    module.net = _Head(make_output)
    module.example_input_array = torch.zeros(1, 1, 16, 16)
    if refused is None:
        check_logits_output("ONNXExport", SimpleNamespace(), module)
    else:
        with pytest.raises(MisconfigurationException, match=refused):
            check_logits_output("ONNXExport", SimpleNamespace(), module)

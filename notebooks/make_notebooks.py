"""Regenerate the notebooks from this script (so their source is reviewable as code; outputs are never committed).

    python notebooks/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

QUICKSTART = [
    new_markdown_cell("""# 01 · Quickstart: data, training, TensorBoard, report

This notebook walks the dms_lightning flow on the embedded synthetic near-infrared driver set:

1. look at the data,
2. train a small classifier with ONNX export, post-training INT8 quantization and the compression report,
3. read the training curves and the confusion matrix back from the TensorBoard logs,
4. show the report table and the accuracy-vs-size / accuracy-vs-latency Pareto plots.

Set `DMS_NOTEBOOK_FAST=1` for the tiny settings CI uses; unset, it trains for a few minutes on a CPU."""),
    new_code_cell("""import os, tempfile
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, Markdown, display

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import CompressionReport, ONNXExport, PostTrainingQuantization
from dms_lightning.data.synthetic import SYNTHETIC_CLASSES, render_sample
from dms_lightning.utils.plotting import image_grid_figure

FAST = os.environ.get("DMS_NOTEBOOK_FAST") == "1"
IMAGE_SIZE = 48 if FAST else 96
WORKDIR = Path(tempfile.mkdtemp(prefix="dms_quickstart_"))
pl.seed_everything(0)
print("working in", WORKDIR)"""),
    new_markdown_cell("""## 1 · The synthetic DMS set

Every image is rendered from `(seed, split, index)`: head pose, eye opening, mouth opening, phone and hands are
latent factors; illumination fall-off, gain, blur, noise, glasses, glare and steering wheel are nuisances."""),
    new_code_cell("""samples = [render_sample(seed=0, split="train", index=i, size=96) for i in range(24)]
figure = image_grid_figure(np.stack([s[0] for s in samples]) / 255.0, [SYNTHETIC_CLASSES[s[1]] for s in samples], columns=8)
plt.show()"""),
    new_markdown_cell("""## 2 · Train, export, quantize, report

`PostTrainingQuantization` turns the network into its INT8 fake-quant twin and calibrates it on 16 batches;
`ONNXExport` after it writes the FP32 ONNX of the float twin and the INT8 QDQ model PTQ hands down (both
parity-checked in ONNX Runtime), and `CompressionReport` (last in the list) measures every variant on the
test split."""),
    new_code_cell("""datamodule = DMSDataModule(image_size=IMAGE_SIZE, train_size=200 if FAST else 3000, val_size=60 if FAST else 500,
                           test_size=60 if FAST else 1000, batch_size=32 if FAST else 64)
model = DMSClassifier("mobilenet_v3_small", num_classes=datamodule.num_classes, class_names=datamodule.class_names,
                      image_size=IMAGE_SIZE, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
logger = pl.loggers.TensorBoardLogger(WORKDIR / "runs", name="quickstart")
trainer = pl.Trainer(
    max_epochs=1 if FAST else 8, accelerator="cpu", logger=logger, log_every_n_steps=2, enable_progress_bar=not FAST,
    callbacks=[
        PostTrainingQuantization(calibration_batches=2 if FAST else 16),
        ONNXExport(dirpath=str(WORKDIR / "export"), name="student", checkpoint="last", export_int8=False),
        CompressionReport(output_dir=str(WORKDIR / "report"), latency_runs=20 if FAST else 200,
                          warmup_runs=5 if FAST else 20, throughput_runs=2 if FAST else 10),
    ],
)
trainer.fit(model, datamodule)"""),
    new_markdown_cell("## 3 · Training curves and confusion matrix, read back from TensorBoard"),
    new_code_cell("""from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
events.Reload()
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, tag in zip(axes, ["train/loss", "val/acc"]):
    points = events.Scalars(tag)
    ax.plot([p.step for p in points], [p.value for p in points], marker="o")
    ax.set_title(tag); ax.set_xlabel("step")
plt.show()
confusion = events.Images("val/confusion_matrix")[-1]
display(Image(data=confusion.encoded_image_string))"""),
    new_markdown_cell("## 4 · The compression report"),
    new_code_cell("""report_dir = WORKDIR / "report"
display(Markdown((report_dir / "report.md").read_text()))
for png in sorted(report_dir.glob("*.png")):
    display(Image(filename=str(png)))"""),
]

CALLBACKS = [
    new_markdown_cell("""# 02 · dms_lightning callbacks in your own Lightning project

Nothing here is DMS specific: a plain `LightningModule` on a toy task (is the bright blob left or right?) gets
iterative channel pruning with physical removal, quantization-aware training and ONNX export just by adding
callbacks. The module exposes the network to compress as `compression_target` (optional: without it the
callbacks act on the whole module)."""),
    new_code_cell("""import os, tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning.callbacks import IterativePruning, ONNXExport, QuantizationAwareTraining

FAST = os.environ.get("DMS_NOTEBOOK_FAST") == "1"
WORKDIR = Path(tempfile.mkdtemp(prefix="dms_callbacks_"))
pl.seed_everything(0)"""),
    new_code_cell("""def blobs(n, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = 0.1 * torch.randn(n, 3, 32, 32, generator=generator)
    for i, label in enumerate(labels):
        x0 = 4 if label == 0 else 20
        images[i, :, 12:20, x0:x0 + 8] += 1.0
    return TensorDataset(images, labels)


class LitNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    @property
    def compression_target(self):
        return self.net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


model = LitNet()
params_before = sum(p.numel() for p in model.net.parameters())
train = DataLoader(blobs(256 if FAST else 2048, 0), batch_size=32, shuffle=True)
val = DataLoader(blobs(128, 1), batch_size=64)"""),
    new_code_cell("""trainer = pl.Trainer(
    max_epochs=4 if FAST else 10, accelerator="cpu", logger=False, enable_progress_bar=not FAST,
    default_root_dir=WORKDIR,
    callbacks=[
        IterativePruning(method="channel", target_sparsity=0.5, start_epoch=0, end_epoch=1),
        QuantizationAwareTraining(start_epoch=2, dirpath=str(WORKDIR / "qat"), parity_split="val"),
        ONNXExport(dirpath=str(WORKDIR / "export"), name="litnet", checkpoint="last"),
    ],
)
trainer.fit(model, train, val)
params_after = sum(p.numel() for p in model.net.parameters() if p.dtype.is_floating_point)
print(f"parameters: {params_before} -> {params_after} ({params_after / params_before:.2f}x)")
print("val_acc:", float(trainer.callback_metrics["val_acc"]))"""),
    new_code_cell("""onnx_files = sorted(WORKDIR.rglob("*.onnx"))
for path in onnx_files:
    print(f"{path.relative_to(WORKDIR)}  {path.stat().st_size / 1024:.1f} KiB")
session = ort.InferenceSession(str(onnx_files[0]), providers=["CPUExecutionProvider"])
x, y = next(iter(val))
logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
print("ONNX Runtime accuracy on a validation batch:", float((logits.argmax(1) == y.numpy()).mean()))"""),
]


def write(name, cells):
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_callbacks_in_your_project.ipynb", CALLBACKS)

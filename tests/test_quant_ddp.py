"""QuantizationAwareTraining under DDP (two CPU processes, gloo): ranks end with identical quantized models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Run as a script, as users run DDP: Lightning's "ddp" strategy re-launches this file for rank 1. A plain
# LightningModule without ``compression_target``: QAT quantizes its ``net`` child.
SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dms_lightning.callbacks import ONNXExport, QuantizationAwareTraining


    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
            self.example_input_array = torch.zeros(1, 1, 16, 16)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            # Rank-dependent scale: without range synchronisation the ranks would learn different ranges.
            data = TensorDataset(torch.randn(64, 1, 16, 16, generator=g) * torch.linspace(0.5, 3, 64).view(-1, 1, 1, 1),
                                 torch.randint(0, 4, (64,), generator=g))
            return DataLoader(data, batch_size=8)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        seed_everything(0)
        module = Net()
        qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, dirpath=sys.argv[1] + "/quant")
        writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=sys.argv[1] + "/export")
        trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, callbacks=[qat, writer],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        trainer.fit(module)
        with torch.no_grad():  # weight ranges follow the weights on each eager forward: settle them after the last step
            module.eval()(torch.zeros(1, 1, 16, 16))
        digest = hashlib.sha256()
        for key, value in module.state_dict().items():
            if "quantizer" in key or "weight" in key:
                digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
        ranges = {k: v.tolist() for k, v in module.state_dict().items() if "activation_quantizers" in k and "scale" in k}
        result = {"rank": trainer.global_rank, "digest": digest.hexdigest(), "ranges": ranges,
                  "exported": str(writer.exported["qat_int8"]) if "qat_int8" in writer.exported else None, "quantized_since": qat.quantized_since}
        with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as fh:
            json.dump(result, fh)
        if trainer.global_rank == 0:
            x = torch.randn(8, 1, 16, 16)
            np_out = module.eval()(x).detach().numpy()
            import numpy as np
            np.save(f"{sys.argv[1]}/input.npy", x.numpy())
            np.save(f"{sys.argv[1]}/torch_out.npy", np_out)
''')


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_share_quantization_ranges_and_rank0_exports(tmp_path):
    script = tmp_path / "ddp_qat.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["quantized_since"] == rank1["quantized_since"] == 1
    assert rank0["ranges"] and rank0["ranges"] == rank1["ranges"]
    assert rank0["digest"] == rank1["digest"]  # weights, BN-folded quantizers and ranges identical
    assert rank0["exported"] and rank1["exported"] is None  # written once, by rank 0

    from dms_lightning.export.runtimes import ort_session

    x, reference = np.load(tmp_path / "input.npy"), np.load(tmp_path / "torch_out.npy")
    logits = ort_session(rank0["exported"]).run(None, {"input": x})[0]
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.99 or np.abs(logits - reference).max() < 0.05

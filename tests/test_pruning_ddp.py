"""IterativePruning under DDP: two CPU processes (gloo) choose identical masks and stay in sync after removal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run as a script, as users run DDP: Lightning's "ddp" strategy re-launches this file for rank 1.
SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dms_lightning.callbacks import IterativePruning


    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
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
            data = TensorDataset(torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
            return DataLoader(data, batch_size=8)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        seed_everything(0)
        module = Net()
        pruning = IterativePruning("channel", target_sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=1,
                                   min_channels=4)
        trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, callbacks=[pruning],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        trainer.fit(module)
        digest = hashlib.sha256()
        for key, value in module.named_parameters():  # BatchNorm buffers differ per rank by design
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
        result = {"rank": trainer.global_rank, "pruned_channels": pruning.pruned_channels,
                  "history": pruning.history, "removed": pruning.removed, "global_step": trainer.global_step,
                  "widths": {n: m.out_channels for n, m in module.named_modules() if isinstance(m, nn.Conv2d)},
                  "parameters": digest.hexdigest()}
        with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as fh:
            json.dump(result, fh)
''')


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_choose_identical_masks_and_stay_in_sync_after_removal(tmp_path):
    script = tmp_path / "ddp_pruning.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert rank0["removed"] and rank1["removed"]
    assert rank0["pruned_channels"] == rank1["pruned_channels"] != {}
    assert rank0["widths"] == rank1["widths"] and rank0["widths"]["net.3"] == 16
    # Each rank saw other batches: equal parameters after the post-removal epoch mean DDP still averaged
    # the gradients of the rebuilt (smaller) parameters.
    assert rank0["global_step"] == rank1["global_step"] == 12
    assert rank0["parameters"] == rank1["parameters"]

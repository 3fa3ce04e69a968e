"""BatchNorm re-estimation under DDP: two CPU processes (gloo) end with the statistics of all ranks' data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dms_lightning.callbacks import BatchNormReestimation


    def data():
        g = torch.Generator().manual_seed(0)
        images = torch.randn(64, 1, 8, 8, generator=g) * torch.linspace(0.5, 3.0, 64).view(-1, 1, 1, 1)
        return TensorDataset(images, torch.randint(0, 2, (64,), generator=g))


    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: the statistics are known

        def train_dataloader(self):
            return DataLoader(data(), batch_size=8, shuffle=True)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        seed_everything(0)
        module = Net()
        callback = BatchNormReestimation(num_batches=None, every_epoch="never", log_accuracy=False)
        trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=2,
                          callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        trainer.fit(module)
        bn = module.net[1]
        with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as fh:
            json.dump({"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist(),
                       "history": callback.history}, fh)
''')


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_end_with_the_pooled_statistics_of_all_ranks(tmp_path):
    script = tmp_path / "ddp_bn.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # Expected: the statistics of the first conv's output over all 64 images (each rank saw only 32).
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 8, 8, generator=g) * torch.linspace(0.5, 3.0, 64).view(-1, 1, 1, 1)
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        features = conv(images).double()
    for rank in (rank0, rank1):
        assert rank["history"][0]["samples"] == 32 and rank["history"][0]["world_size"] == 2
        torch.testing.assert_close(torch.tensor(rank["mean"]).double(), features.mean(dim=(0, 2, 3)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(rank["var"]).double(), features.var(dim=(0, 2, 3)),
                                   rtol=1e-5, atol=1e-5)

"""Shared fixtures: tiny synthetic data and models so the whole suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")


# Under pytest-xdist (README's test command runs one worker per core) each worker gets one intra-op thread.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores: at most two intra-op threads per test process (one per xdist worker) avoids oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(_THREADS, previous)))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread, for tests that compare two runs value for value (resume equality)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_datamodule():
    """A factory of small synthetic data modules (64 px, a few batches)."""
    from dms_lightning import DMSDataModule

    def make(**overrides) -> DMSDataModule:
        kwargs = dict(image_size=64, train_size=96, val_size=48, test_size=48, batch_size=16, augment=False)
        kwargs.update(overrides)
        return DMSDataModule(**kwargs)

    return make


@pytest.fixture
def fast_trainer_kwargs(tmp_path):
    """Trainer keyword arguments for short CPU runs that write only under ``tmp_path``."""
    return dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                num_sanity_val_steps=0)

"""IterativePruning inside ``fit``: removal mid-run, optimizers and LR, checkpoints, resume, logging, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import IterativePruning
from dms_lightning.pruning import UntraceableModelError

DATA = dict(image_size=32, train_size=32, val_size=16, test_size=16, batch_size=16, augment=False)
TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two OpenMP threads on two shared, busy cores are ~50x slower than one (module scope: it must
    # also hold while module-scoped fixtures train).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(LightningModule):
    """A plain user LightningModule: no compression_target, no restore_architecture, fixed data order."""

    def __init__(self, samples: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
        self.example_input_array = torch.zeros(1, 1, 16, 16)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(samples, 1, 16, 16, generator=generator)
        self.labels = torch.randint(0, 4, (samples,), generator=generator)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.05 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8, shuffle=False)


class LearningRates(Callback):
    """Records (global step, learning rate, parameters with optimizer state) before every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []
        self.with_state: dict[int, tuple[int, int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.seen.append((trainer.global_step, optimizer.param_groups[0]["lr"]))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.with_state[trainer.global_step] = (sum(1 for p in params if optimizer.state.get(p)), len(params))


def _conv_widths(module: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------------------- DMSClassifier run
@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """MobileNetV3-small: AGP to 50 % channels over epochs 0-1, removed at epoch 1, trained on to epoch 3."""
    root = tmp_path_factory.mktemp("pruned_run")
    torch.manual_seed(0)
    model = DMSClassifier("mobilenet_v3_small", image_size=32, class_names=DMSDataModule(**DATA).class_names)
    widths_before = _conv_widths(model.model)
    params_before = sum(p.numel() for p in model.parameters())
    pruning = IterativePruning("channel", target_sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=1,
                               round_to=8)
    rates = LearningRates()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1, filename="e{epoch}", auto_insert_metric_name=False)
    trainer = Trainer(max_epochs=3, logger=TensorBoardLogger(root, name="tb"), callbacks=[pruning, rates, checkpoint],
                      limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1, **TRAINER)
    with torch.autograd.set_detect_anomaly(False):
        trainer.fit(model, datamodule=DMSDataModule(**DATA))
    return SimpleNamespace(root=root, model=model, trainer=trainer, pruning=pruning, rates=rates,
                           widths_before=widths_before, params_before=params_before,
                           ckpt=root / "ckpt", log_dir=Path(trainer.logger.log_dir))


def test_channel_pruning_removes_channels_mid_fit_in_multiples_of_round_to(pruned_run):
    widths = _conv_widths(pruned_run.model.model)
    changed = {n: w for n, w in widths.items() if w != pruned_run.widths_before[n]}
    assert changed, "no convolution lost channels"
    assert all(w % 8 == 0 for w in changed.values())
    assert sum(p.numel() for p in pruned_run.model.parameters()) < 0.7 * pruned_run.params_before
    assert pruned_run.pruning.removed and pruned_run.trainer.global_step == 6  # training went on after removal


def test_optimizer_is_rebuilt_for_the_smaller_network(pruned_run):
    optimizer_params = {id(p) for group in pruned_run.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in pruned_run.model.parameters()}


def test_optimizer_state_of_kept_channels_survives_removal(pruned_run):
    # Channels are removed at the start of epoch 1 (step 2): the first step on the smaller network already
    # finds Adam moments for every parameter, sliced from the old ones, instead of starting from zero.
    with_state, total = pruned_run.rates.with_state[2]
    assert with_state == total
    optimizer = pruned_run.trainer.optimizers[0]
    for param in pruned_run.model.parameters():
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and float(state["step"]) == 6


def test_learning_rate_schedule_continues_across_removal(pruned_run):
    scheduler = pruned_run.trainer.lr_scheduler_configs[0].scheduler
    base_lr, factor = scheduler.base_lrs[0], scheduler.lr_lambdas[0]
    assert scheduler.last_epoch == pruned_run.trainer.global_step
    # Removal happened at the start of epoch 1 (step 2): the LR seen at every step is still on the curve.
    for step, lr in pruned_run.rates.seen:
        assert lr == pytest.approx(base_lr * factor(step))


def test_checkpoint_after_removal_reloads_with_load_from_checkpoint(pruned_run):
    reloaded = DMSClassifier.load_from_checkpoint(pruned_run.ckpt / "last.ckpt", map_location="cpu")
    assert _conv_widths(reloaded.model) == _conv_widths(pruned_run.model.model)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(reloaded.eval()(x), pruned_run.model.eval()(x))


def test_checkpoint_after_removal_resumes_with_ckpt_path(pruned_run, tmp_path):
    model = DMSClassifier("mobilenet_v3_small", image_size=32, class_names=DMSDataModule(**DATA).class_names)
    pruning = IterativePruning("channel", target_sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=1,
                               round_to=8)
    trainer = Trainer(max_epochs=4, logger=False, enable_checkpointing=False, callbacks=[pruning],
                      limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path, **TRAINER)
    trainer.fit(model, datamodule=DMSDataModule(**DATA), ckpt_path=pruned_run.ckpt / "last.ckpt")
    assert _conv_widths(model.model) == _conv_widths(pruned_run.model.model)
    assert trainer.global_step == 7 and pruning.removed


def test_pre_removal_checkpoint_still_loads_the_original_architecture(pruned_run):
    reloaded = DMSClassifier.load_from_checkpoint(pruned_run.ckpt / "e0.ckpt", map_location="cpu")
    assert _conv_widths(reloaded.model) == pruned_run.widths_before


def test_sparsity_params_macs_and_layer_chart_reach_tensorboard(pruned_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pruned_run.log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"pruning/sparsity", "pruning/channel_sparsity", "pruning/nonzero_params", "pruning/macs",
            "pruning/params"} <= scalars
    assert "pruning/layer_sparsity" in events.Tags()["images"]
    channel_sparsity = [e.value for e in events.Scalars("pruning/channel_sparsity")]
    assert channel_sparsity[0] == 0.0 and channel_sparsity[-1] == pytest.approx(0.5, abs=0.1)


# --------------------------------------------------------------------------------------- unstructured / N:M
def _fit_tiny(callback: IterativePruning, tmp_path, max_epochs: int = 2, **kwargs) -> TinyNet:
    torch.manual_seed(0)
    module = TinyNet()
    kwargs.setdefault("callbacks", [callback])
    Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False,
            default_root_dir=tmp_path, **{**TRAINER, **kwargs}).fit(module)
    return module


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_reaches_target_within_half_a_percent(scope, tmp_path):
    pruning = IterativePruning("unstructured", target_sparsity=0.6, schedule="linear", start_epoch=0, end_epoch=1,
                               scope=scope, keep_first_conv=False, keep_classifier=False)
    module = _fit_tiny(pruning, tmp_path, max_epochs=3)
    weights = [m.weight for m in module.net if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros / total == pytest.approx(0.6, abs=0.005)  # still so after a full epoch of optimizer steps
    if scope == "layer":
        for w in weights:
            assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.005 + 1 / w.numel())


def test_n_m_pruning_leaves_at_most_n_nonzeros_in_every_group_of_m(tmp_path):
    pruning = IterativePruning("n_m", pattern="2:4", schedule="one_shot", start_epoch=0, keep_first_conv=False,
                               keep_classifier=False)
    module = _fit_tiny(pruning, tmp_path)
    checked = 0
    for layer in module.net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.shape[1] % 4 == 0:
            groups = layer.weight.detach().movedim(1, -1).reshape(-1, 4)
            assert int((groups != 0).sum(dim=1).max()) <= 2
            checked += 1
    assert checked == 3  # two convs with 16 / 32 input channels and the classifier


@pytest.mark.parametrize("importance", ["l2", "bn_gamma", "taylor"])
def test_every_channel_criterion_prunes_and_training_goes_on(importance, tmp_path):
    pruning = IterativePruning("channel", target_sparsity=0.5, schedule="one_shot", start_epoch=1,
                               importance=importance, min_channels=4)
    module = _fit_tiny(pruning, tmp_path, max_epochs=3)
    assert pruning.removed and _conv_widths(module)["net.3"] == 16
    if importance == "taylor":  # ranked on gradients averaged over epoch 0, then the running sums reset
        assert pruning._method._gradient_steps == 0 and not pruning._method._gradient_sums
    loss = F.cross_entropy(module(module.images), module.labels)
    assert torch.isfinite(loss)


class StopAfterEpoch(Callback):
    """Ends fit early, as EarlyStopping or a time limit would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_channels_pruned_so_far_are_removed_when_fit_ends_before_the_schedule(tmp_path):
    pruning = IterativePruning("channel", target_sparsity=0.5, schedule="linear", start_epoch=0, end_epoch=4,
                               min_channels=4)
    with pytest.warns(UserWarning, match="fit ended before the last pruning point"):
        module = _fit_tiny(pruning, tmp_path, max_epochs=6, callbacks=[pruning, StopAfterEpoch(2)])
    assert pruning.removed and pruning.next_point == 3  # points 0..2 of 0..4 reached: 25 % at the end
    assert _conv_widths(module)["net.3"] == 24


def test_end_epoch_beyond_max_epochs_is_refused_before_training(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module = TinyNet()
    trainer = Trainer(max_epochs=3, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[IterativePruning("channel", start_epoch=0, end_epoch=4)], **TRAINER)
    with pytest.raises(MisconfigurationException, match=r"IterativePruning\(end_epoch=4\).*max_epochs=3"):
        trainer.fit(module)
    assert trainer.global_step == 0


class MomentumSnapshot(Callback):
    """The SGD momentum buffer of one layer's weight at the start of epoch 1."""

    def __init__(self, layer: str) -> None:
        self.layer, self.buffer = layer, None

    def on_train_epoch_start(self, trainer, pl_module, *args):
        if trainer.current_epoch == 1:
            weight = pl_module.get_submodule(self.layer).weight
            self.buffer = trainer.optimizers[0].state[weight]["momentum_buffer"].clone()


def test_momentum_of_kept_channels_is_carried_over_exactly(tmp_path):
    before, after = MomentumSnapshot("net.3"), MomentumSnapshot("net.3")
    pruning = IterativePruning("channel", target_sparsity=0.5, schedule="one_shot", start_epoch=1, min_channels=4)
    torch.manual_seed(0)
    module = TinyNet()
    Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False,
            callbacks=[before, pruning, after], default_root_dir=tmp_path, **TRAINER).fit(module)
    kept = [c for c in range(32) if c not in pruning.pruned_channels["net.3"]]
    assert len(kept) == 16
    torch.testing.assert_close(after.buffer, before.buffer[kept])


def test_sparsity_counts_each_shared_tensor_once():
    from dms_lightning.pruning import sparsity_report

    shared = nn.Linear(10, 10, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with torch.no_grad():
        shared.weight[:3] = 0
    report = sparsity_report(model, ["0.weight"])
    assert report.params == 100 and report.nonzero_params == 70 and report.sparsity == pytest.approx(0.3)


# --------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["channel", "unstructured"])
def test_resuming_mid_schedule_ends_with_the_same_masks(method, tmp_path):
    def make() -> IterativePruning:
        return IterativePruning(method, target_sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=3,
                                min_channels=2, remove_channels=False)

    def fit(module, pruning, max_epochs, ckpt_path=None, callbacks=()):
        Trainer(max_epochs=max_epochs, logger=False, callbacks=[pruning, *callbacks], default_root_dir=tmp_path,
                **TRAINER).fit(module, ckpt_path=ckpt_path)

    torch.manual_seed(0)
    uninterrupted, pruning = TinyNet(), make()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="e{epoch}", auto_insert_metric_name=False)
    fit(uninterrupted, pruning, 5, callbacks=[checkpoint])

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed, pruning_resumed = TinyNet(), make()
    fit(resumed, pruning_resumed, 5, ckpt_path=tmp_path / "ckpt" / "e1.ckpt")

    assert pruning_resumed.next_point == pruning.next_point == 4
    if method == "channel":
        assert pruning_resumed.pruned_channels == pruning.pruned_channels
        assert any(pruning.pruned_channels.values())
    for name, mask in pruning.masks.items():
        assert torch.equal(mask.cpu(), pruning_resumed.masks[name].cpu()), name
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_plain_module_resumes_after_removal_through_ckpt_path(tmp_path):
    pruning = IterativePruning("channel", target_sparsity=0.5, schedule="one_shot", start_epoch=1, min_channels=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    module = TinyNet()
    Trainer(max_epochs=2, logger=False, callbacks=[pruning, checkpoint], default_root_dir=tmp_path,
            **TRAINER).fit(module)
    widths = _conv_widths(module)
    assert widths["net.3"] == 16

    fresh = TinyNet()  # built at full width; the checkpoint holds the pruned one
    Trainer(max_epochs=3, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
            callbacks=[IterativePruning("channel", target_sparsity=0.5, schedule="one_shot", start_epoch=1,
                                        min_channels=4)], **TRAINER).fit(fresh, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert _conv_widths(fresh) == widths


# --------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teacher = DMSClassifier("mobilenet_v3_small", image_size=32, class_names=DMSDataModule(**DATA).class_names)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, limit_train_batches=1,
                      limit_val_batches=0, default_root_dir=root, **TRAINER)
    trainer.fit(teacher, datamodule=DMSDataModule(**DATA))
    trainer.save_checkpoint(root / "teacher.ckpt", weights_only=True)
    return str(root / "teacher.ckpt")


def test_distillation_prunes_the_student_only_and_keeps_hinted_layers(teacher_ckpt, tmp_path):
    from dms_lightning import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=32,
                                class_names=DMSDataModule(**DATA).class_names,
                                feature_hints=[{"student": "features.8", "teacher": "features.8"}])
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = sum(p.numel() for p in module.model.parameters())
    hinted_width = module.model.features[8].block[-1][0].out_channels
    pruning = IterativePruning("channel", target_sparsity=0.4, schedule="one_shot", start_epoch=1)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[pruning],
                      limit_train_batches=2, limit_val_batches=0, default_root_dir=tmp_path, **TRAINER)
    trainer.fit(module, datamodule=DMSDataModule(**DATA))

    assert sum(p.numel() for p in module.model.parameters()) < 0.8 * student_before
    assert module.model.features[8].block[-1][0].out_channels == hinted_width  # the adapter still fits
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    optimizer_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimizer_ids & teacher_ids and trainer.global_step == 4


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(target_sparsity=1.0), r"target_sparsity=1\.0 must be in \[0, 1\)"),
    (dict(target_sparsity=-0.1), r"target_sparsity=-0\.1 must be in \[0, 1\)"),
    (dict(method="n_m", pattern="4:2"), r"N=4 must be at least 1 and smaller than M=2"),
    (dict(method="n_m", pattern="2-4"), r"pattern='2-4' must be 'N:M'"),
    (dict(start_epoch=3, end_epoch=1), r"start_epoch=3 is after end_epoch=1"),
    (dict(start_step=10, end_step=5), r"start_step=10 is after end_step=5"),
    (dict(start_epoch=0, end_step=5), r"not both"),
    (dict(schedule="cubical"), r"schedule='cubical' must be one of"),
    (dict(frequency=0), r"frequency=0 must be an integer >= 1"),
    (dict(method="unstructured", importance="taylor"), r"importance='taylor' is not available"),
    (dict(method="pruning"), r"method='pruning' must be one of"),
    (dict(round_to=0), r"round_to=0 must be an integer >= 1"),
])
def test_bad_arguments_are_rejected_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IterativePruning(**kwargs)


def test_unknown_layer_name_fails_before_training(tmp_path):
    module = TinyNet()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[IterativePruning(ignored_layers=["net.99"])], **TRAINER)
    with pytest.raises(ValueError, match=r"ignored_layers: 'net\.99' names no module of TinyNet"):
        trainer.fit(module)
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_untraceable_model_fails_before_training(tmp_path):
    class NumpyForward(TinyNet):
        def forward(self, x):
            features = self.net[:-1](x)
            return self.net[-1](torch.from_numpy(features.numpy()))

    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[IterativePruning("channel")], **TRAINER)
    with pytest.raises(UntraceableModelError, match="cannot trace NumpyForward"):
        trainer.fit(NumpyForward())
    assert trainer.global_step == 0



def test_group_that_cannot_be_scored_fails_before_training(tmp_path, monkeypatch):
    # A layer layout Torch-Pruning's criteria do not know (FastViT's depthwise multiplier raised an IndexError)
    # must stop the run at fit start, naming the group, not at the first pruning point.
    from torch_pruning.pruner import importance

    def unknown_layout(self, group):
        raise IndexError("index 1 is out of bounds for dimension 0 with size 1")

    monkeypatch.setattr(importance.GroupMagnitudeImportance, "__call__", unknown_layout)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[IterativePruning("channel", start_epoch=1, end_epoch=1)], **TRAINER)
    with pytest.raises(UntraceableModelError, match=r"cannot score channel group 'net\.\d'.*ignored_layers.*"
                                                    r"method='unstructured'"):
        trainer.fit(TinyNet())
    assert trainer.global_step == 0

# --------------------------------------------------------------------------------------- CLI config
def test_prune_config_prunes_removes_and_reloads_through_the_cli(tmp_path):
    import yaml

    from dms_lightning.cli import main

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "prune.yaml").read_text())
    pruning_args = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("IterativePruning"))
    pruning_args["init_args"].update(start_epoch=0, end_epoch=1)  # the same run, two epochs long
    config["trainer"]["max_epochs"] = 2
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(args=["fit", "--config", str(path), "--data.image_size=32", "--data.train_size=32",
                     "--data.val_size=16", "--data.test_size=16", "--data.batch_size=16",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, IterativePruning))
    assert pruning.removed and pruning.round_to == 8
    reloaded = DMSClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    assert _conv_widths(reloaded.model) == _conv_widths(cli.model.model)


def test_channel_removal_under_a_spawn_launcher_is_refused_before_training():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    trainer = Trainer(strategy="ddp_spawn", devices=2, max_epochs=3,
                      **{k: v for k, v in TRAINER.items() if k != "devices"})
    with pytest.raises(MisconfigurationException, match="strategy='ddp'"):
        IterativePruning("channel").setup(trainer, TinyNet(), "fit")
    IterativePruning("unstructured").setup(trainer, TinyNet(), "fit")  # masks only: fine anywhere

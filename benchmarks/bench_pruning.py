"""Channel pruning that makes models faster: IterativePruning vs Lightning's ModelPruning vs Torch-Pruning.

Two measurements, each within one run on one machine:

1. **Latency** (ONNX Runtime CPUExecutionProvider, batch 1, 112 px, 1 intra-op thread) of ResNet-18 and
   MobileNetV3-small DMS classifiers at 50 % channel sparsity, pruned four ways at the same amount:
   not at all; ``IterativePruning(method="channel")`` inside a (one-step) ``fit`` — channels physically
   removed; Lightning's ``ModelPruning`` (``ln_structured``, L1, dim 0 — masks only, the graph keeps its
   shape); Torch-Pruning's ``MetaPruner`` used directly. All variants are timed in interleaved rounds so
   machine noise hits them alike. Targets: pruned/unpruned ≤ 0.6 (ResNet-18), ≤ 0.75 (MobileNetV3-small).
2. **Accuracy** after a short fine-tune on the synthetic DMS set: a MobileNetV3-small trained for
   ``--epochs`` is fine-tuned ``--finetune-epochs`` more (cosine learning rate) with and without 30 % channel
   pruning (AGP over the first ``--prune-end`` fine-tune epochs, channels removed, training continues).
   Target: ≤ 1 pt test accuracy, reported against the baseline pruning started from and against the
   unpruned model fine-tuned for the same epochs.

Run (about 10 minutes on 2 cores, so under the shared lock)::

    flock /tmp/cpu.lock python benchmarks/bench_pruning.py
    python benchmarks/bench_pruning.py --quick      # wiring check on tiny sizes, no result written

Writes ``benchmarks/results/pruning.md`` and ``pruning.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.callbacks import IterativePruning  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.pruning import count_module_macs  # noqa: E402
from dms_lightning.pruning.functional import default_ignored_layers  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.report.measure import open_session  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

import readme_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"resnet18": 0.6, "mobilenet_v3_small": 0.75}
TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)


# ------------------------------------------------------------------------------------------- variants
def ours(backbone: str, size: int, sparsity: float, round_to: int, workdir: Path) -> nn.Module:
    """IterativePruning in a real fit: one-shot at epoch 0, removal, one optimizer step on the smaller model."""
    module = DMSClassifier(backbone, image_size=size)
    data = DMSDataModule(image_size=size, train_size=16, val_size=16, test_size=16, batch_size=16, augment=False)
    pruning = IterativePruning("channel", target_sparsity=sparsity, schedule="one_shot", start_epoch=0,
                               round_to=round_to, min_channels=8, plot_layer_sparsity=False)
    Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=str(workdir),
            callbacks=[pruning], **TRAINER).fit(module, data)
    return module.model.eval()


def lightning_model_pruning(backbone: str, size: int, sparsity: float) -> nn.Module:
    """Lightning's ModelPruning on the same layers at the same amount: L1 filter masks, made permanent."""
    from lightning.pytorch.callbacks import ModelPruning

    module = DMSClassifier(backbone, image_size=size)
    skip = set(default_ignored_layers(module.model, torch.zeros(1, 1, size, size)))
    convs = [(m, "weight") for n, m in module.model.named_modules() if isinstance(m, nn.Conv2d) and n not in skip]
    pruning = ModelPruning("ln_structured", parameters_to_prune=convs, amount=sparsity, pruning_dim=0, pruning_norm=1,
                           use_global_unstructured=False,
                           verbose=0)
    pruning.setup(None, module, "fit")
    pruning.apply_pruning(sparsity)
    pruning.make_pruning_permanent(module)
    return module.model.eval()


def torch_pruning_direct(backbone: str, size: int, sparsity: float) -> nn.Module:
    """Torch-Pruning's MetaPruner with L1 group importance, same ignored layers, same ratio."""
    import torch_pruning as tp

    model = DMSClassifier(backbone, image_size=size).model.eval()
    example = torch.zeros(1, 1, size, size)
    skip = set(default_ignored_layers(model, example))
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=sparsity,
                                  ignored_layers=[m for n, m in model.named_modules() if n in skip])
    pruner.step()
    return model


# ------------------------------------------------------------------------------------------- latency
def latency_table(backbone: str, args, workdir: Path) -> list[dict]:
    size = args.latency_size
    torch.manual_seed(0)
    dense = DMSClassifier(backbone, image_size=size).model.eval()
    variants = {
        "unpruned": dense,
        f"IterativePruning (channel, removed, round_to={args.round_to})": ours(backbone, size, args.latency_sparsity,
                                                                             args.round_to, workdir),
        "IterativePruning (channel, removed, round_to=1)": ours(backbone, size, args.latency_sparsity, 1, workdir),
        "Lightning ModelPruning (ln_structured, masks)": lightning_model_pruning(backbone, size, args.latency_sparsity),
        "Torch-Pruning MetaPruner (used directly)": torch_pruning_direct(backbone, size, args.latency_sparsity),
    }
    example = torch.zeros(1, 1, size, size)
    rows, sessions = [], {}
    for name, model in variants.items():
        path = export_onnx(model, example, workdir / f"{backbone}_{len(sessions)}.onnx", dynamic_batch=False)
        sessions[name] = open_session(path, threads=1)
        dense_macs, _ = count_module_macs(model, example)
        rows.append({"backbone": backbone, "variant": name, "params": sum(int(torch.count_nonzero(p))
                                                                          for p in model.parameters()),
                     "macs": dense_macs, "onnx_mb": path.stat().st_size / 2 ** 20})
    image = np.random.default_rng(0).standard_normal((1, 1, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm-up
        for _ in range(args.warmup_runs):
            session.run(None, {"input": image})
    for _ in range(args.rounds):  # interleaved: a noisy neighbour slows every variant alike
        for name, session in sessions.items():
            for _ in range(args.runs_per_round):
                start = time.perf_counter_ns()
                session.run(None, {"input": image})
                times[name].append((time.perf_counter_ns() - start) / 1e6)
    base = float(np.median(times["unpruned"]))
    for row in rows:
        row["p50_ms"] = float(np.median(times[row["variant"]]))
        row["p90_ms"] = float(np.percentile(times[row["variant"]], 90))
        row["ratio"] = row["p50_ms"] / base
    return rows


# ------------------------------------------------------------------------------------------- accuracy
def classifier(args, lr: float, cosine_epochs: int | None = None) -> DMSClassifier:
    # Fine-tunes start from trained weights: a per-epoch cosine from the fine-tune LR to 0, without the
    # default schedule's warm-up (which is there for training from scratch).
    schedule = (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cosine_epochs)) \
        if cosine_epochs else None
    return DMSClassifier("mobilenet_v3_small", image_size=args.image_size, bn_momentum=args.bn_momentum,
                         lr_scheduler=schedule,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01))


def accuracy_table(args, workdir: Path) -> dict:
    seed_everything(0)
    data = dict(image_size=args.image_size, train_size=args.train_size, val_size=args.val_size,
                test_size=args.test_size, batch_size=args.batch_size)
    base = classifier(args, args.lr)
    start = time.perf_counter()
    Trainer(max_epochs=args.epochs, limit_val_batches=0, default_root_dir=str(workdir), **TRAINER).fit(
        base, DMSDataModule(**data))
    base_seconds = time.perf_counter() - start

    def test_acc(module) -> float:
        return float(Trainer(**TRAINER).test(module, DMSDataModule(**data), verbose=False)[0]["test/acc"])

    def finetune(pruning: IterativePruning | None) -> tuple[DMSClassifier, float]:
        seed_everything(1)
        module = classifier(args, args.finetune_lr, cosine_epochs=args.finetune_epochs)
        module.model.load_state_dict(copy.deepcopy(base.model.state_dict()))
        began = time.perf_counter()
        Trainer(max_epochs=args.finetune_epochs, limit_val_batches=0, default_root_dir=str(workdir),
                callbacks=[pruning] if pruning else [], **TRAINER).fit(module, DMSDataModule(**data))
        return module, time.perf_counter() - began

    dense, dense_seconds = finetune(None)
    prune_end = min(args.prune_end, args.finetune_epochs - 1)
    pruning = IterativePruning("channel", target_sparsity=args.accuracy_sparsity, schedule="agp", start_epoch=0,
                               end_epoch=prune_end,
                               round_to=args.accuracy_round_to, plot_layer_sparsity=False)
    pruned, pruned_seconds = finetune(pruning)
    example = torch.zeros(1, 1, args.image_size, args.image_size)
    result = {
        "baseline_acc": test_acc(base), "dense_finetuned_acc": test_acc(dense), "pruned_acc": test_acc(pruned),
        "baseline_params": sum(p.numel() for p in base.model.parameters()),
        "pruned_params": sum(p.numel() for p in pruned.model.parameters()),
        "baseline_macs": count_module_macs(base.model, example)[0], "pruned_macs": count_module_macs(pruned.model, example)[0],
        "channel_sparsity": pruning.history[-1].get("channel_sparsity") if pruning.history else None,
        "prune_end": prune_end,
        "seconds": {"baseline": base_seconds, "dense_finetune": dense_seconds, "pruned_finetune": pruned_seconds},
    }
    result["drop_pt"] = 100 * (result["dense_finetuned_acc"] - result["pruned_acc"])
    result["drop_vs_baseline_pt"] = 100 * (result["baseline_acc"] - result["pruned_acc"])
    return result


# ------------------------------------------------------------------------------------------- report
def _verdict(drop_pt: float, target: float = 1.0) -> str:
    return "✅" if drop_pt <= target else f"❌ (missed by {drop_pt - target:.2f} pt)"


def markdown(latency: list[dict], accuracy: dict, args, info: dict) -> str:
    lines = ["# Channel pruning benchmark", "", f"Machine: {machine_summary(info)}.", "",
             f"Command: `python benchmarks/bench_pruning.py` (torch {torch.__version__}, "
             f"{args.rounds} interleaved rounds × {args.runs_per_round} runs after {args.warmup_runs} warm-up runs).",
             "", f"## Latency at {args.latency_sparsity:.0%} channel sparsity "
             f"(ONNX Runtime CPU, batch 1, {args.latency_size} px, 1 thread)", "",
             "| backbone | variant | non-zero params | dense MMACs | ONNX MB | p50 ms | p90 ms | p50 / unpruned | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in latency:
        target = TARGETS[row["backbone"]]
        verdict = ""
        if row["variant"].startswith("IterativePruning"):
            verdict = f"≤ {target} {'✅' if row['ratio'] <= target else '❌'}"
        lines.append(f"| {row['backbone']} | {row['variant']} | {row['params']:,} | {row['macs'] / 1e6:.1f} | "
                     f"{row['onnx_mb']:.2f} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['ratio']:.3f} | {verdict} |")
    lines += ["", "Lightning's `ModelPruning` zeroes filters but leaves every tensor in place: the exported graph "
              "has the same shapes and runs at the same speed. Physically removing the channels (ours, or "
              "Torch-Pruning by hand) is what makes the model faster.", ""]
    if accuracy:
        a = accuracy
        lines += [f"## Accuracy after a short fine-tune ({args.accuracy_sparsity:.0%} channels, MobileNetV3-small, "
                  f"synthetic DMS set, {args.image_size} px)", "",
                  f"Baseline trained {args.epochs} epochs ({args.train_size} images, AdamW lr {args.lr}, BatchNorm "
                  f"momentum {args.bn_momentum}); then "
                  f"{args.finetune_epochs} fine-tune epochs (lr {args.finetune_lr}, cosine to 0) with and without "
                  f"IterativePruning (AGP from epoch 0 to {a['prune_end']}, round_to={args.accuracy_round_to}, "
                  f"channels removed at the start of epoch {a['prune_end']}, training continues; measured channel "
                  f"sparsity {a['channel_sparsity']:.1%}). Test set: {args.test_size} images.", "",
                  "| model | params | MMACs | test acc |", "| --- | ---: | ---: | ---: |",
                  f"| baseline ({args.epochs} epochs) | {a['baseline_params']:,} | {a['baseline_macs'] / 1e6:.2f} | "
                  f"{a['baseline_acc']:.4f} |",
                  f"| + {args.finetune_epochs} epochs, unpruned | {a['baseline_params']:,} | "
                  f"{a['baseline_macs'] / 1e6:.2f} | {a['dense_finetuned_acc']:.4f} |",
                  f"| + {args.finetune_epochs} epochs, IterativePruning {args.accuracy_sparsity:.0%} channels | "
                  f"{a['pruned_params']:,} | {a['pruned_macs'] / 1e6:.2f} | {a['pruned_acc']:.4f} |", "",
                  f"Accuracy cost of pruning (target ≤ 1 pt), two ways:", "",
                  f"* vs the model pruning started from (the baseline — what a user deploys if they do not prune): "
                  f"**{a['drop_vs_baseline_pt']:.2f} pt** {_verdict(a['drop_vs_baseline_pt'])};",
                  f"* vs the unpruned model given the same {args.finetune_epochs} extra epochs (equal compute; "
                  f"stricter while the baseline is still improving): **{a['drop_pt']:.2f} pt** "
                  f"{_verdict(a['drop_pt'])}.", "",
                  f"Wall time: baseline {a['seconds']['baseline']:.0f} s, fine-tunes "
                  f"{a['seconds']['dense_finetune']:.0f} s / {a['seconds']['pruned_finetune']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-size", type=int, default=112)
    parser.add_argument("--latency-sparsity", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--warmup-runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs-per-round", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--prune-end", type=int, default=4)
    parser.add_argument("--accuracy-round-to", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--accuracy-sparsity", type=float, default=0.3)
    parser.add_argument("--bn-momentum", type=float, default=0.1)
    parser.add_argument("--train-threads", type=int, default=2, help="torch threads for the accuracy part")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no result written")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.runs_per_round, args.warmup_runs = 1, 5, 2
        args.train_size, args.test_size, args.epochs, args.finetune_epochs = 64, 64, 1, 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine are far slower than one
    workdir = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    latency = []
    for backbone in ("resnet18", "mobilenet_v3_small"):
        latency += latency_table(backbone, args, workdir)
    torch.set_num_threads(args.train_threads)
    accuracy = {} if args.skip_accuracy else accuracy_table(args, workdir)
    info = machine_info(threads=1)
    text = markdown(latency, accuracy, args, info)
    print(text)
    if not args.quick:
        write_text_atomic(RESULTS / "pruning.md", text + "\n")
        write_json_atomic(RESULTS / "pruning.json", {"machine": info, "args": vars(args), "latency": latency,
                                                     "accuracy": accuracy})
        readme_results.main()  # the README shows the latest table


if __name__ == "__main__":
    main()

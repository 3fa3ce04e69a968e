"""Per-step cost of each dms_lightning callback, as a ratio to the same training step in plain Lightning.

Targets (issue 7): IterativePruning ≤ 1.05× a plain step between pruning events, QuantizationAwareTraining
≤ 2×. A small model (MobileNetV3-small, 64 px, batch 32) trains on in-memory synthetic images so the data
pipeline does not hide the callbacks' cost. A timer callback placed first (``on_train_batch_start``) and
last (``on_train_batch_end``) times every whole step, the callbacks' hooks and the optimizer step included.
Each configuration runs in several interleaved rounds (plain, pruning, QAT, then pruning, QAT, plain, ...: the
order rotates every round) so slow drifts of a shared machine hit them alike; the ratio is of medians over all
timed steps. The time spent inside each callback's own hooks is measured too: for a callback whose per-step
work is all hook work (pruning's mask re-application) it gives the overhead free of step-to-step noise.

Run (heavy: ~2-4 minutes on 2 cores, so under the shared lock)::

    flock /tmp/cpu.lock python benchmarks/bench_overhead.py
    python benchmarks/bench_overhead.py --steps 10 --rounds 1   # quick look, not for the table

Writes ``benchmarks/results/overhead.md`` and ``overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

import readme_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

RESULTS = ROOT / "benchmarks" / "results"


class StepClock:
    """Two callbacks sharing one clock: ``start`` goes first in the list, ``stop`` last.

    ``times`` holds whole steps; ``hook_times`` the part of each step spent inside the hooks of the
    callbacks passed to :meth:`instrument` (their own per-step work, free of the machine's step-to-step noise).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self._t0 = 0.0
        self._in_step = False
        self._hook_time = 0.0
        clock = self

        class Start(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock._in_step, clock._hook_time = True, 0.0
                clock._t0 = time.perf_counter()

        class Stop(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.times.append(time.perf_counter() - clock._t0)
                clock.hook_times.append(clock._hook_time)
                clock._in_step = False

        self.start, self.stop = Start(), Stop()

    def instrument(self, callback: Callback) -> Callback:
        """Time every hook ``callback`` overrides (an instance attribute shadows the class method)."""
        for name in dir(type(callback)):
            if not name.startswith("on_") or getattr(type(callback), name) is getattr(Callback, name, None):
                continue
            method = getattr(callback, name)
            if not callable(method):
                continue

            def timed(*args, _method=method, **kwargs):
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    if self._in_step:
                        self._hook_time += time.perf_counter() - start

            setattr(callback, name, timed)
        return callback


def _pruning(steps: int) -> list[Callback]:
    from dms_lightning.callbacks import IterativePruning

    # One pruning event at the start of the run, none afterwards: the timed steps are the ones "between
    # pruning events" (mask enforcement after every optimizer step is the cost being measured). Channels are
    # not removed: removal changes the network, and its cost is once per run, not per step.
    return [IterativePruning(method="channel", target_sparsity=0.5, schedule="constant", start_epoch=0,
                             end_epoch=0, frequency=1, remove_channels=False)]


def _pruning_unstructured(steps: int) -> list[Callback]:
    from dms_lightning.callbacks import IterativePruning

    return [IterativePruning(method="unstructured", target_sparsity=0.5, schedule="constant", start_epoch=0,
                             end_epoch=0, frequency=1, remove_channels=False)]


def _qat(steps: int) -> list[Callback]:
    from dms_lightning.callbacks import QuantizationAwareTraining

    return [QuantizationAwareTraining(start_epoch=0)]


def _pruning_and_qat(steps: int) -> list[Callback]:
    return _pruning(steps) + _qat(steps)


def _qat_every_tensor(steps: int) -> list[Callback]:
    from dms_lightning.callbacks import QuantizationAwareTraining

    return [QuantizationAwareTraining(start_epoch=0, placement="every_tensor")]


#: Configurations that run with torch's own per-tensor fake-quant kernel instead of FakeQuantizer's CPU path.
TORCH_KERNEL = {"qat_every_tensor_torch_kernel"}


#: name → (callbacks factory, target ratio or None, what the row shows)
CONFIGS: dict[str, tuple[Callable[[int], list[Callback]] | None, float | None, str]] = {
    "plain": (None, None, "plain Lightning step (reference)"),
    "pruning_channel": (_pruning, 1.05, "IterativePruning(method='channel'), between pruning events"),
    "pruning_unstructured": (_pruning_unstructured, 1.05,
                             "IterativePruning(method='unstructured'), between pruning events"),
    "qat": (_qat, 2.0, "QuantizationAwareTraining, fake-quant active"),
    "pruning_channel+qat": (_pruning_and_qat, 2.0, "IterativePruning(channel) + QuantizationAwareTraining together"),
    "qat_every_tensor": (_qat_every_tensor, 2.0, "QuantizationAwareTraining(placement='every_tensor'), as the main job"),
    "qat_every_tensor_torch_kernel": (_qat_every_tensor, None, "the same with torch's per-tensor fake-quant kernel "
                                      "(FakeQuantizer.vectorised_cpu = False)"),
}


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else f"missed by {ratio - target:.3f}×"


def make_loader(image_size: int, batch_size: int, samples: int) -> DataLoader:
    dm = DMSDataModule(image_size=image_size, train_size=samples, val_size=8, test_size=8, batch_size=batch_size,
                       augment=False)
    images, labels = zip(*[batch for batch in dm.train_dataloader()])
    dataset = TensorDataset(torch.cat(images), torch.cat(labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)


def time_steps(config: str, loader: DataLoader, steps: int, warmup: int, image_size: int
               ) -> tuple[list[float], list[float]]:
    """Train ``warmup + steps`` steps with ``config``'s callbacks; return (step seconds, in-callback seconds)."""
    factory = CONFIGS[config][0]
    seed_everything(0, verbose=False)
    model = DMSClassifier("mobilenet_v3_small", image_size=image_size)
    clock = StepClock()
    measured = [clock.instrument(cb) for cb in (factory(steps) if factory else [])]
    callbacks = [clock.start] + measured + [clock.stop]
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=warmup + steps,
                      limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    from dms_lightning.quant.fake_quant import FakeQuantizer

    FakeQuantizer.vectorised_cpu = config not in TORCH_KERNEL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train_dataloaders=loader)
    finally:
        FakeQuantizer.vectorised_cpu = True
    return clock.times[warmup:], clock.hook_times[warmup:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configurations")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for all runs)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--output", default=str(RESULTS / "overhead"), help="path stem of the .md / .json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    configs = ["plain"] + [c for c in args.configs if c != "plain"]
    loader = make_loader(args.image_size, args.batch_size, (args.warmup + args.steps) * args.batch_size)
    times: dict[str, list[float]] = {c: [] for c in configs}
    hook_times: dict[str, list[float]] = {c: [] for c in configs}
    round_medians: dict[str, list[float]] = {c: [] for c in configs}
    unavailable: dict[str, str] = {}
    for round_index in range(args.rounds):
        # Rotate the order each round, so no configuration always runs first (right after data loading) or last.
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            if config in unavailable:
                continue
            try:
                step_times, in_callbacks = time_steps(config, loader, args.steps, args.warmup, args.image_size)
                times[config] += step_times
                hook_times[config] += in_callbacks
                round_medians[config].append(statistics.median(step_times))
            except Exception as err:  # noqa: BLE001 - one failing callback must not lose the other rows
                unavailable[config] = f"{type(err).__name__}: {str(err)[:200]}"
                print(f"round {round_index + 1}/{args.rounds} {config}: failed: {unavailable[config]}", flush=True)
                continue
            print(f"round {round_index + 1}/{args.rounds} {config}: median "
                  f"{1e3 * statistics.median(times[config][-args.steps:]):.1f} ms", flush=True)

    plain = statistics.median(times["plain"])
    # Round-to-round spread of the plain step: how much the shared machine moves an end-to-end median.
    noise = (max(round_medians["plain"]) - min(round_medians["plain"])) / plain if round_medians["plain"] else 0.0
    rows = []
    for config in configs:
        _, target, what = CONFIGS[config]
        if config in unavailable:
            rows.append({"config": config, "what": what, "target": target, "status": "not run",
                         "reason": unavailable[config]})
            continue
        median = statistics.median(times[config])
        ratio = median / plain
        own = statistics.median(hook_times[config])
        own_ratio = (plain + own) / plain
        row = {"config": config, "what": what, "steps": len(times[config]), "median_ms": 1e3 * median,
               "p90_ms": 1e3 * sorted(times[config])[int(0.9 * (len(times[config]) - 1))], "ratio": ratio,
               "in_callback_ms": 1e3 * own, "in_callback_ratio": own_ratio, "target": target,
               "round_medians_ms": [1e3 * m for m in round_medians[config]]}
        if target is None:
            row["status"] = "reference" if config == "plain" else "for comparison"
        else:
            row["status"] = _verdict(ratio, target)
            # Only meaningful for callbacks whose whole per-step cost is hook work (pruning's mask re-application).
            row["in_callback_status"] = (_verdict(own_ratio, target) if config.startswith("pruning")
                                         and "qat" not in config else "n/a: cost is in forward/backward")
        rows.append(row)

    info = machine_info(threads=None)
    info["torch_threads"] = args.threads
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    lines = [
        "# Callback overhead per training step (ratio to plain Lightning)\n",
        f"Machine: {machine_summary(info)}; torch {torch.__version__} with {args.threads} intra-op thread(s).  ",
        f"Model: DMSClassifier(mobilenet_v3_small), {args.image_size} px, batch {args.batch_size}, in-memory "
        f"synthetic images; {args.rounds} interleaved round(s) in rotating order × {args.steps} timed steps per configuration "
        f"after {args.warmup} warm-up steps. Step = first callback's on_train_batch_start to last callback's "
        "on_train_batch_end (forward, backward, optimizer step and every hook).  ",
        "**End-to-end** = median step / median plain step. **Own work** = (median plain step + median time spent "
        "inside the callback's own hooks during a step) / median plain step: the per-step work a hook-only "
        "callback such as pruning adds (mask re-application after the optimizer step), free of step-to-step "
        "machine noise. QAT's cost is mostly in the fake-quantized forward and backward, which only the "
        f"end-to-end ratio sees. Round-to-round spread of the plain median on this run: ±{50 * noise:.1f} %.\n",
        "| configuration | what | timed steps | median step (ms) | p90 (ms) | end-to-end | in callback hooks (ms/step) "
        "| own work | target | result end-to-end | result own work |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = "–" if row["target"] is None else f"≤ {row['target']:.2f}×"
        if row["status"] == "not run":
            lines.append(f"| {row['config']} | {row['what']} | – | – | – | – | – | – | {target} | "
                         f"not run: {row['reason']} | – |")
        else:
            lines.append(f"| {row['config']} | {row['what']} | {row['steps']} | {row['median_ms']:.1f} | "
                         f"{row['p90_ms']:.1f} | {row['ratio']:.3f}× | {row['in_callback_ms']:.2f} | "
                         f"{row['in_callback_ratio']:.3f}× | {target} | {row['status']} | "
                         f"{row.get('in_callback_status', '–')} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    output = Path(args.output)
    write_text_atomic(output.with_suffix(".md"), markdown)
    result = {"machine": info, "settings": settings, "plain_round_spread": noise, "rows": rows}
    write_json_atomic(output.with_suffix(".json"), result)
    print(f"written: {output.with_suffix('.md')}, {output.with_suffix('.json')}")
    if output == RESULTS / "overhead":
        readme_results.main()  # the README shows the latest table
    return result


if __name__ == "__main__":
    main()

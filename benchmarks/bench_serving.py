"""Serving the student under concurrent clients: per-request latency and throughput, with and without dynamic batching.

No Triton server runs on this machine (PyTriton bundles one but needs numpy < 2 in an environment of
its own, and the CI machine has no room for it), so the serving loop is reproduced with ONNX Runtime:
``--clients`` threads each send batch-1 requests back to back to one model instance (one
``InferenceSession``, what ``instance_group { count: 1 }`` gives). Without batching the instance runs
each request alone; with dynamic batching it takes what is queued, waits up to
``--max-queue-delay-us`` for more, and runs batches up to the largest preferred size (the scheduler
settings ``TritonExport`` writes into ``config.pbtxt``). Latency is measured from a request's
submission to its result (queueing included): p50 / p95 / p99, and requests served per second.

Run (about a minute on 2 cores, so under the shared lock)::

    flock /tmp/cpu.lock python benchmarks/bench_serving.py
    python benchmarks/bench_serving.py --quick      # wiring check, no result written

Writes ``benchmarks/results/serving.md`` and ``serving.json``.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSClassifier  # noqa: E402
from dms_lightning.export import export_fp16_onnx, export_onnx  # noqa: E402
from dms_lightning.export.triton import TritonSettings  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class _Request:
    __slots__ = ("image", "submitted", "done", "latency")

    def __init__(self, image: np.ndarray) -> None:
        self.image, self.submitted, self.done, self.latency = image, time.perf_counter(), threading.Event(), 0.0


def _instance(session, name: str, requests: queue.Queue, stop: threading.Event, max_batch: int,
              max_delay_s: float) -> None:
    """One model instance: batch-1 execution (``max_batch == 1``) or dynamic batching."""
    while not stop.is_set():
        try:
            first = requests.get(timeout=0.05)
        except queue.Empty:
            continue
        batch = [first]
        deadline = time.perf_counter() + max_delay_s
        while len(batch) < max_batch:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(requests.get_nowait() if remaining <= 0 else requests.get(timeout=remaining))
            except queue.Empty:
                break
        outputs = session.run(None, {name: np.concatenate([r.image for r in batch])})[0]
        finished = time.perf_counter()
        for request, _ in zip(batch, outputs):
            request.latency = finished - request.submitted
            request.done.set()


def serve(path: Path, clients: int, requests_per_client: int, image: np.ndarray, max_batch: int,
          max_delay_s: float, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = image.astype(np.float32)
    session.run(None, {name: np.repeat(feed, max_batch, axis=0)})  # warm-up at the largest batch
    session.run(None, {name: feed})
    requests: queue.Queue = queue.Queue()
    stop = threading.Event()
    worker = threading.Thread(target=_instance, args=(session, name, requests, stop, max_batch, max_delay_s),
                              daemon=True)
    worker.start()
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        mine = []
        for _ in range(requests_per_client):
            request = _Request(feed)
            requests.put(request)
            request.done.wait()
            mine.append(request.latency)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    pool = [threading.Thread(target=client) for _ in range(clients)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - start
    stop.set()
    worker.join()
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_rps": len(ms) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=300, help="requests per client")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the instance")
    parser.add_argument("--max-queue-delay-us", type=int, default=TritonSettings().max_queue_delay_microseconds)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.clients, args.requests = 32, [1, 4], 20
    settings = TritonSettings(max_queue_delay_microseconds=args.max_queue_delay_us)
    max_batch = max(settings.preferred_batch_sizes)
    torch.manual_seed(0)
    net = DMSClassifier(in_channels=1, image_size=args.image_size).model.eval()
    example = torch.randn(1, 1, args.image_size, args.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": export_onnx(net, example, Path(tmp) / "fp32.onnx", simplify=True),
                 "fp16": export_fp16_onnx(net, example, Path(tmp) / "fp16.onnx", simplify=True)}
        for precision, path in files.items():
            for clients in args.clients:
                for mode, batch in (("one request at a time", 1), ("dynamic batching", max_batch)):
                    result = serve(path, clients, args.requests, example.numpy(), batch,
                                   args.max_queue_delay_us / 1e6, args.threads)
                    rows.append({"precision": precision, "clients": clients, "mode": mode, **result})
                    print(f"{precision} {clients:>2} clients, {mode:<22}: p50 {result['p50_ms']:.2f} ms, "
                          f"p95 {result['p95_ms']:.2f}, p99 {result['p99_ms']:.2f}, "
                          f"{result['throughput_rps']:.0f} req/s", flush=True)
    machine = machine_info()
    load = os.getloadavg()[0]
    lines = [
        "# Serving under concurrent clients (ONNX Runtime, one model instance)",
        "",
        f"Machine: {machine_summary(machine)}. MobileNetV3-small student, {args.image_size} px, 1 channel, "
        f"{args.requests} batch-1 requests per client, {args.threads} intra-op threads. Dynamic batching: up to "
        f"{max_batch} requests, max queue delay {args.max_queue_delay_us} µs (TritonExport's defaults). No Triton "
        "server here (PyTriton needs numpy < 2 in its own environment): the scheduler is reproduced in "
        "`benchmarks/bench_serving.py`. Latency includes queueing. FP16 runs in float32 after casts on "
        "ONNX Runtime's CPU provider, so it is no faster on a CPU. "
        f"1-minute load average at the end of the run: {load:.1f} (on 2 cores, above 2 the numbers are noisy).",
        "",
        "| precision | clients | mode | p50 ms | p95 ms | p99 ms | requests/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['precision']} | {r['clients']} | {r['mode']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['throughput_rps']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_text_atomic(RESULTS / "serving.md", text)
        write_json_atomic(RESULTS / "serving.json", {"machine": machine, "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

"""What Prometheus metrics cost on pull and push throughput: with and without.

    python benchmarks/metrics_overhead.py [--quick] [--rounds N]

Two pserver processes of the same job (P=1, async, dim 64): one with metrics off
(metrics.port = -1, the default), one with metrics on (metrics.port = 0), scraped
once a second while it is measured (Prometheus scrapes every 15 s by default: this
is harsher). Uniform ids over 10M, 256 and 4,096 ids per call, rows created by a
warm-up. Each figure is measured off and on back to back (0.5 s each, the order
alternating), `--rounds` times, so the machine's load hits both alike; rows/s
are medians over rounds, the overhead is 1 - the median of the on/off ratios,
with the interquartile range of that overhead. On a shared machine
the difference drowns in noise, so the hooks are also timed in process: the
microseconds metrics add to one Pull or Push (the timing wrapper and the counter
updates), against the time a call takes. The last line is JSON: rows/s off and
on, the measured overhead (1 - on/off) in percent, the hooks' microseconds per
call and the overhead they make per call size, and the microseconds a trainer's
metrics and curves line add to a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import timeit
import urllib.request
from pathlib import Path

import numpy as np
from _common import rate, start_pservers, stop, workdir

from pserver import config as cfg
from pserver.metrics import server_metrics as pmetrics
from pserver.rpc.client import PSClient
from pserver.tables.shard import Shard

DIM = 64
SIZES = (256, 4096)


def start(config: cfg.JobConfig, metrics: bool, wd: Path) -> tuple[PSClient, list, int | None]:
    env = {"PSRT_METRICS__PORT": "0", "PSRT_METRICS__TARGETS_DIR": str(wd / "targets")}
    saved = dict(os.environ)
    if metrics:
        os.environ.update(env)
    try:
        bound, procs = start_pservers(config, wd)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    port = None
    if metrics:
        target = json.loads((wd / "targets" / "pserver_0.json").read_text())
        port = int(target[0]["targets"][0].rsplit(":", 1)[1])
    client = PSClient(bound)
    client.wait_ready()
    return client, procs, port


def scraper(port: int, stop_event: threading.Event) -> int:
    """Scrape /metrics once a second until stopped; returns the scrapes made."""
    n = 0
    while not stop_event.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()
        n += 1
    return n


def measure(client: PSClient, verb: str, ids: np.ndarray, grads: np.ndarray,
            min_time: float) -> float:
    if verb == "pull":
        return rate(lambda i: client.pull("emb", ids), len(ids), min_time)
    return rate(lambda i: client.push("emb", ids, grads), len(ids), min_time)


def hook_cost_us(config: cfg.JobConfig, n: int = 4096) -> dict[str, float]:
    """Microseconds the metrics hooks add to one Pull and one Push (on minus off)."""
    shard = Shard(config, 0)
    on = pmetrics.ServerMetrics(config, 0, shard)  # counts, but serves no port
    rows = np.zeros((n, DIM), np.float32)

    def handler(raw: bytes, ctx: object) -> bytes:
        return raw

    out = {}
    for verb, hook in (("pull", "pulled"), ("push", "pushed")):
        cost = {}
        for name, m in (("off", pmetrics.NULL), ("on", on)):
            wrapped, count = m.timed("Pull", handler), getattr(m, hook)

            def call(wrapped=wrapped, count=count) -> None:
                wrapped(b"", None)
                count("emb", rows)

            cost[name] = min(timeit.repeat(call, number=20_000, repeat=5)) / 20_000 * 1e6
        out[f"{verb}_hook_us"] = round(cost["on"] - cost["off"], 3)
    return out


def trainer_step_us() -> dict[str, float]:
    """Microseconds a trainer's metrics (and, with curves_dir, its curves line) add to a step."""
    import tempfile

    from trainer.metrics_export import TrainerExport

    out = {}
    for key, curves in (("trainer_step_hook_us", ""),
                        ("trainer_step_hook_with_curves_us", tempfile.mkdtemp())):
        export = TrainerExport(cfg.build({"metrics": {"curves_dir": curves}}), 0)
        t = min(timeit.repeat(lambda e=export: e.step(0, 5, 0.5, 512), number=20_000,
                              repeat=5))
        out[key] = round(t / 20_000 * 1e6, 2)
        export.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter timings (smoke test)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    min_time = 0.2 if args.quick else 0.5
    rounds = 2 if args.quick else args.rounds
    config = cfg.build({"job": {"mode": "async", "pservers": ["127.0.0.1:0"]},
                        "tables": {"emb": {"dim": DIM, "optimizer": "adagrad"}}})
    rng = np.random.default_rng(0)
    batches = {n: (rng.integers(0, 10_000_000, n).astype(np.uint64)
                   * np.uint64(0x9E3779B97F4A7C15)) for n in SIZES}
    batches = {n: np.unique(b) for n, b in batches.items()}
    grads = {n: np.full((len(b), DIM), 1e-3, np.float32) for n, b in batches.items()}
    runs = {v: start(config, v == "on", workdir()) for v in ("off", "on")}
    stop_scraping = threading.Event()
    scrapes: list[int] = []
    th = threading.Thread(target=lambda: scrapes.append(scraper(runs["on"][2], stop_scraping)))
    th.start()
    got: dict[str, list[float]] = {}
    try:
        for client, _, _ in runs.values():
            for b in batches.values():
                client.pull("emb", b)  # warm-up: create the rows
        for r in range(rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for n, b in batches.items():
                for verb in ("pull", "push"):
                    pair = {}
                    for variant in order:  # off and on back to back: the same load
                        pair[variant] = measure(runs[variant][0], verb, b, grads[n], min_time)
                        got.setdefault(f"{verb}_{n}_{variant}", []).append(pair[variant])
                    got.setdefault(f"{verb}_{n}_ratio", []).append(pair["on"] / pair["off"])
                    print(f"round {r} {verb} {n:5d} ids: off {pair['off']:>11,.0f} rows/s  "
                          f"on {pair['on']:>11,.0f} rows/s", flush=True)
    finally:
        stop_scraping.set()
        th.join()
        for client, procs, _ in runs.values():
            client.close()
            stop(procs)
    out: dict[str, float] = {"rounds": rounds, "scrapes": scrapes[0] if scrapes else 0}
    for verb in ("pull", "push"):
        for n in SIZES:
            off = statistics.median(got[f"{verb}_{n}_off"])
            on = statistics.median(got[f"{verb}_{n}_on"])
            out[f"{verb}_rows_per_s_{n}_off"] = round(off)
            out[f"{verb}_rows_per_s_{n}_on"] = round(on)
            ratios = sorted(got[f"{verb}_{n}_ratio"])
            q = len(ratios) // 4
            out[f"{verb}_overhead_pct_{n}"] = round(100 * (1 - statistics.median(ratios)), 2)
            out[f"{verb}_overhead_pct_{n}_iqr"] = [round(100 * (1 - ratios[-1 - q]), 1),
                                                   round(100 * (1 - ratios[q]), 1)]
    hooks = hook_cost_us(config)
    out.update(hooks)
    out.update(trainer_step_us())
    for verb in ("pull", "push"):
        for n in SIZES:
            call_us = n / out[f"{verb}_rows_per_s_{n}_off"] * 1e6
            out[f"{verb}_hook_pct_{n}"] = round(100 * hooks[f"{verb}_hook_us"] / call_us, 3)
    print(f"metrics hooks: pull {hooks['pull_hook_us']:.2f} us, push {hooks['push_hook_us']:.2f} "
          "us per call", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

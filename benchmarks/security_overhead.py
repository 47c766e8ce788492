"""What TLS (or mutual TLS) and the token cost pull and push, measured side by side.

    python benchmarks/security_overhead.py [--mode mtls|tls] [--rounds 8] [--ids 65536]

One plaintext pserver and one secured pserver (TLS or mTLS plus the token), as
real processes, each with its own client; dim 64, uniform ids, async mode. The
two are timed in alternating short bursts (pull, then push, plaintext then
secured, `--rounds` times) so that the load of a shared machine hits both
alike; the figures are the medians of the rounds and the ratio secured/plaintext.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from _common import rate, start_pservers, stop, workdir
from pull_push import DIM, id_batches, security_keys

from pserver import config as cfg
from pserver.rpc.client import PSClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("tls", "mtls"), default="mtls")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--ids", type=int, default=65536, help="ids per call")
    ap.add_argument("--burst", type=float, default=0.5, help="seconds per timed burst")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batches = id_batches("uniform", args.ids, 4, rng)
    grads = [np.full((len(b), DIM), 1e-3, dtype=np.float32) for b in batches]
    procs, clients = [], {}
    try:
        for name, rpc in (("plain", {}), ("secure", security_keys(args.mode))):
            config = cfg.build({"job": {"mode": "async", "pservers": ["127.0.0.1:0"]},
                                "tables": {"emb": {"dim": DIM, "optimizer": "adagrad"}},
                                "rpc": rpc})
            bound, ps = start_pservers(config, workdir())
            procs += ps
            clients[name] = PSClient(bound)
            clients[name].wait_ready()
            for b in batches:  # warm-up: create the rows
                clients[name].pull("emb", b)
        n, k = args.ids, len(batches)
        runs: dict[str, list[float]] = {f"{m}_{op}": [] for m in clients for op in ("pull", "push")}
        for r in range(args.rounds):
            for name, c in clients.items():
                runs[f"{name}_pull"].append(rate(lambda i, c=c: c.pull("emb", batches[i % k]),
                                                 n, args.burst))
                runs[f"{name}_push"].append(rate(
                    lambda i, c=c: c.push("emb", batches[i % k], grads[i % k]), n, args.burst))
            print(f"round {r}: " + "  ".join(f"{key} {v[-1]:,.0f}" for key, v in runs.items()),
                  flush=True)
        for c in clients.values():
            c.close()
    finally:
        stop(procs)
    med = {f"{key}_rows_per_s": round(statistics.median(v)) for key, v in runs.items()}
    out = {"mode": args.mode, "ids": args.ids, "rounds": args.rounds, **med,
           "pull_secure_vs_plain": round(med["secure_pull_rows_per_s"]
                                         / med["plain_pull_rows_per_s"], 3),
           "push_secure_vs_plain": round(med["secure_push_rows_per_s"]
                                         / med["plain_push_rows_per_s"], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Pull and push throughput against real pserver processes, and the transport ceiling.

    python benchmarks/pull_push.py [--quick] [--security off|tls|mtls]

Dim 64; 4,096 and 65,536 ids per call; uniform ids and Zipf(1.1) over 10M ids;
P=1 and P=2 pservers (async mode, so nothing waits on other trainers). The
ceiling is a bare gRPC unary method with raw-bytes request and response of the
same sizes as a 65,536-id pull (and push), called from one client thread.
Rows are created by a warm-up pass, so the timed calls measure steady state.
`--security tls` or `mtls` runs the pservers and the client with TLS (or mutual
TLS) and the shared token, certificates made on the spot with trustme (the
test extra); the ceiling stays plaintext.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import grpc
import numpy as np
from _common import ROOT, rate, start_pservers, stop, wait_ready_file, workdir

from pserver import config as cfg
from pserver.rpc.client import PSClient

DIM = 64
UNIVERSE = 10_000_000


def id_batches(kind: str, n: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "uniform":
        raw = [rng.integers(0, UNIVERSE, n) for _ in range(count)]
    else:
        raw = [np.minimum(rng.zipf(1.1, n), UNIVERSE) for _ in range(count)]
    # spread the id space over 64 bits, as hashed feature ids are
    return [(r.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) for r in raw]


def measure(client: PSClient, batches: list[np.ndarray], min_time: float) -> dict[str, float]:
    grads = [np.full((len(b), DIM), 1e-3, dtype=np.float32) for b in batches]
    for b in batches:  # warm-up: create the rows
        client.pull("emb", b)
    n = len(batches[0])
    k = len(batches)
    pull = rate(lambda i: client.pull("emb", batches[i % k]), n, min_time)
    push = rate(lambda i: client.push("emb", batches[i % k], grads[i % k]), n, min_time)
    return {"pull_rows_per_s": pull, "push_rows_per_s": push}


def ceiling(n: int, min_time: float) -> dict[str, float]:
    wd = workdir()
    ready = wd / "ceiling.ready"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "_ceiling_server.py"),
                             str(ready)])
    try:
        addr = wait_ready_file(ready, proc)
        opts = [("grpc.max_send_message_length", 1 << 29),
                ("grpc.max_receive_message_length", 1 << 29)]
        ch = grpc.insecure_channel(addr, options=opts)
        echo = ch.unary_unary("/ceiling/Echo")
        pull_req = (n * DIM * 4).to_bytes(8, "little") + bytes(n * 8 - 8)
        push_req = (8).to_bytes(8, "little") + bytes(n * (8 + DIM * 4) - 8)
        echo(pull_req, timeout=60)
        out = {
            "ceiling_rows_per_s": rate(lambda i: echo(pull_req, timeout=60), n, min_time),
            "ceiling_push_rows_per_s": rate(lambda i: echo(push_req, timeout=60), n, min_time),
        }
        ch.close()
        return out
    finally:
        proc.terminate()
        proc.wait()


def security_keys(mode: str) -> dict[str, str]:
    """[rpc] keys for `mode`, with a throwaway CA, certificate and token."""
    if mode == "off":
        return {}
    import secrets

    import trustme

    wd = workdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(wd / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(wd / "cert.pem"))
    cert.private_key_pem.write_to_path(str(wd / "cert.key"))
    (wd / "token").write_text(secrets.token_hex(32))
    return {"tls": mode, "tls_cert": str(wd / "cert.pem"), "tls_key": str(wd / "cert.key"),
            "tls_ca": str(wd / "ca.pem"), "token_file": str(wd / "token")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter timings (for smoke tests)")
    ap.add_argument("--security", choices=("off", "tls", "mtls"), default="off",
                    help="TLS or mutual TLS, with the token, between client and pservers")
    args = ap.parse_args()
    rpc = security_keys(args.security)
    min_time = 0.3 if args.quick else 2.0
    rng = np.random.default_rng(0)
    results: dict[str, float] = {}
    for p in (1, 2):
        config = cfg.build({"job": {"mode": "async", "pservers": ["127.0.0.1:0"] * p},
                            "tables": {"emb": {"dim": DIM, "optimizer": "adagrad"}},
                            "rpc": rpc})
        bound, procs = start_pservers(config, workdir())
        try:
            client = PSClient(bound)
            client.wait_ready()
            for kind in ("uniform", "zipf"):
                for n in (4096, 65536):
                    r = measure(client, id_batches(kind, n, 4, rng), min_time)
                    for key, v in r.items():
                        results[f"{key}_{kind}_{n}_p{p}"] = round(v)
                    print(f"P={p} {kind:7s} {n:6d} ids: pull {r['pull_rows_per_s']:>11,.0f} "
                          f"rows/s  push {r['push_rows_per_s']:>11,.0f} rows/s", flush=True)
            client.close()
        finally:
            stop(procs)
    ceil = ceiling(65536, min_time)
    print(f"ceiling (raw bytes, 65536 rows): pull {ceil['ceiling_rows_per_s']:,.0f} rows/s  "
          f"push {ceil['ceiling_push_rows_per_s']:,.0f} rows/s", flush=True)
    summary = {
        "security": args.security,
        "pull_rows_per_s": results["pull_rows_per_s_uniform_65536_p1"],
        "push_rows_per_s": results["push_rows_per_s_uniform_65536_p1"],
        "ceiling_rows_per_s": round(ceil["ceiling_rows_per_s"]),
        "ceiling_push_rows_per_s": round(ceil["ceiling_push_rows_per_s"]),
    }
    summary["pull_vs_ceiling"] = round(summary["pull_rows_per_s"] / summary["ceiling_rows_per_s"],
                                       3)
    summary["push_vs_ceiling"] = round(
        summary["push_rows_per_s"] / summary["ceiling_push_rows_per_s"], 3)
    print(json.dumps({**summary, **results}))


if __name__ == "__main__":
    main()

"""Memory and in-process pull rate of one large sparse table.

    python benchmarks/table_memory.py [--rows N] [--batch B]

Fills ONE `pserver.tables.sparse.SparseTable` (dim 64, Adagrad) in this process to
`--rows` rows (default 10,000,000) through its public `pull`, `--batch` new
ids per call, ids spread over 64 bits (``arange * odd constant``). Then it
reports the process RSS (VmRSS after a gc.collect()) against the payload
(ids + values + optimizer state of the live rows, `table.payload_bytes`), the
id index's bytes, and the in-process pull rate of 4,096 random existing ids.
`baseline_rss_bytes` is a bare ``python -c "import numpy"`` process;
`rss_vs_payload` is total RSS / payload (baseline included).

Where the memory goes: every growth of the row arrays or the id index is
logged with the RSS after it and the peak RSS while it happened, and at the
end the resident bytes of every array are read from /proc/self/pagemap
(capacity allocated but never touched costs address space, not RSS).
Targets: rss_vs_payload <= 1.3, inproc_pull_rows_per_s >= 2,000,000.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
from _common import rate

from pserver.config import OptimizerSpec, TableSpec
from pserver.tables.sparse import SparseTable

DIM = 64
SPREAD = np.uint64(0x9E3779B97F4A7C15)  # odd: arange * SPREAD is a bijection on 64 bits
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss() -> int:
    gc.collect()
    return status_bytes("VmRSS")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def baseline_rss() -> int:
    """VmRSS of a bare python process that imported numpy."""
    code = ("import gc, numpy\ngc.collect()\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


def resident_bytes(arr: np.ndarray) -> int | None:
    """Bytes of `arr`'s buffer (whole allocation) that are in RAM, from /proc/self/pagemap."""
    base = arr.base if isinstance(arr.base, np.ndarray) else arr
    start = base.ctypes.data
    first, last = start // PAGE, (start + max(base.nbytes, 1) - 1) // PAGE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        present = 0
        chunk = 1 << 18  # pages per read
        for lo in range(first, last + 1, chunk):
            n = min(chunk, last + 1 - lo)
            entries = np.frombuffer(os.pread(fd, 8 * n, 8 * lo), dtype=np.uint64)
            present += int(np.count_nonzero(entries >> np.uint64(63)))
        return present * PAGE
    finally:
        os.close(fd)


def table_arrays(table: SparseTable) -> dict[str, np.ndarray]:
    """The table's row arrays and the id index's slot array (internals, read only)."""
    return {**table.columns, "index": table._index._slots}


def fill(table: SparseTable, rows: int, batch: int) -> tuple[float, list[dict], float, int]:
    """Pull `rows` new ids in batches: (seconds, one record per growth, seconds inside
    pull, peak RSS)."""
    growths: list[dict] = []
    shape = (table.capacity, table._index.nbytes)
    can_reset = reset_peak()
    peak = status_bytes("VmRSS")
    started = time.perf_counter()
    pulled_s = 0.0
    for lo in range(0, rows, batch):
        ids = np.arange(lo, min(lo + batch, rows), dtype=np.uint64) * SPREAD
        t0 = time.perf_counter()
        table.pull(ids)
        pulled_s += time.perf_counter() - t0
        now = (table.capacity, table._index.nbytes)
        if now != shape:
            hwm = status_bytes("VmHWM")
            peak = max(peak, hwm)
            rec = {"rows": len(table), "capacity": now[0], "index_bytes": now[1],
                   "rss_bytes": status_bytes("VmRSS"), "peak_rss_bytes": hwm,
                   "payload_bytes": table.payload_bytes,
                   "seconds": round(time.perf_counter() - started, 2)}
            growths.append(rec)
            if rec["capacity"] >= 1 << 20 or rec["index_bytes"] >= 32 * MiB:
                what = "rows" if now[0] != shape[0] else "index"
                print(f"grew {what:5s} at {rec['rows']:>11,} rows: capacity "
                      f"{rec['capacity']:>11,}, index {rec['index_bytes'] / MiB:7.0f} MiB, "
                      f"RSS {rec['rss_bytes'] / MiB:7.0f} MiB (peak {hwm / MiB:7.0f} MiB), "
                      f"payload {rec['payload_bytes'] / MiB:7.0f} MiB", flush=True)
            shape = now
            if can_reset:
                reset_peak()
    peak = max(peak, status_bytes("VmHWM"))
    return time.perf_counter() - started, growths, pulled_s, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows to fill (default 10M)")
    ap.add_argument("--batch", type=int, default=65_536, help="new ids per pull while filling")
    ap.add_argument("--pull-ids", type=int, default=4096, help="ids per timed pull")
    args = ap.parse_args()

    baseline = baseline_rss()
    start_rss = rss()
    spec = TableSpec(name="emb", dim=DIM, optimizer=OptimizerSpec(kind="adagrad"))
    table = SparseTable(spec)
    print(f"baseline (python + numpy) RSS {baseline / MiB:.0f} MiB; this process before the "
          f"table {start_rss / MiB:.0f} MiB; filling {args.rows:,} rows of dim {DIM} (adagrad), "
          f"{args.batch:,} ids per pull", flush=True)
    fill_s, growths, pull_s, peak = fill(table, args.rows, args.batch)

    total = rss()
    payload = table.payload_bytes
    index_bytes = table._index.nbytes
    arrays = table_arrays(table)
    allocated = {name: a.nbytes for name, a in arrays.items()}
    resident = {name: resident_bytes(a) for name, a in arrays.items()}
    print(f"filled {len(table):,} rows in {fill_s:.1f}s ({len(table) / fill_s:,.0f} rows/s); "
          f"RSS {total / MiB:.0f} MiB, payload {payload / MiB:.0f} MiB "
          f"(x{total / payload:.3f}), index {index_bytes / MiB:.0f} MiB, "
          f"peak RSS while filling {peak / MiB:.0f} MiB", flush=True)
    for name in arrays:
        res = resident[name]
        print(f"  {name:6s} allocated {allocated[name] / MiB:8.0f} MiB, resident "
              f"{'?' if res is None else f'{res / MiB:8.0f}'} MiB", flush=True)

    rng = np.random.default_rng(0)
    n = len(table)
    batches = [rng.integers(0, n, args.pull_ids).astype(np.uint64) * SPREAD for _ in range(64)]
    for b in batches[:4]:
        table.pull(b)
    pull_rate = rate(lambda i: table.pull(batches[i % len(batches)]), args.pull_ids,
                     min_time=2.0, min_calls=200)
    print(f"in-process pull of {args.pull_ids:,} random existing ids: {pull_rate:,.0f} rows/s",
          flush=True)

    known = sum(r for r in resident.values() if r is not None)
    result = {
        "rows": len(table),
        "rss_bytes": total,
        "payload_bytes": payload,
        "rss_vs_payload": round(total / payload, 4),
        "index_bytes": index_bytes,
        "baseline_rss_bytes": baseline,
        "start_rss_bytes": start_rss,
        "rss_minus_baseline_vs_payload": round((total - baseline) / payload, 4),
        "peak_rss_bytes": peak,
        "peak_rss_vs_payload": round(peak / payload, 4),
        "capacity": table.capacity,
        "allocated_bytes": sum(allocated.values()),
        "resident_array_bytes": known,
        "resident_by_array": resident,
        "other_rss_bytes": total - known,
        "fill_seconds": round(fill_s, 2),
        "fill_rows_per_s": round(len(table) / fill_s),
        "fill_pull_seconds": round(pull_s, 2),
        "inproc_pull_rows_per_s": round(pull_rate),
        "growths": len(growths),
        "target_rss_vs_payload": 1.3,
        "target_inproc_pull_rows_per_s": 2_000_000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

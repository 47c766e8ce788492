"""Checkpoints of two pservers: blocking and background saves, deltas, restore, resharding.

    python benchmarks/checkpoint.py [--rows N] [--dir DIR] [--touch F] [--window S] [--rounds R]
                                    [--duty D] [--priority P]

Two pserver processes hold one table of N rows (default 4,000,000) of dim 64
with Adagrad state. The script saves a checkpoint through the coordinator (as
the job's only trainer: barrier, its part, commit) and times it (`blocking_save_s`);
then stops both pservers, evicts the files from the page cache, starts them
again with `background = true` and `full_every = 2`, and times the restore (the
coordinator's checksum verification plus the slowest pserver's load). Then:
it pushes gradients to a fraction F of the rows (default 1%) and saves a delta
(`incremental_bytes_vs_full`: its bytes over the full checkpoint's); saves
fulls in the background and times how long the trainer is held (`stall_s`: the
pservers note their row counts and copy the dense state) against the blocking
save; and runs a trainer's load (pushes of 4096 random rows, back to back) for
S seconds with no save, then while a full save is written (with
`background_duty = D` and `background_priority = P`, by default the keys'
defaults), R times, after one save under load to warm up
(`train_during_save_vs_idle`: the median of pushes/s during over pushes/s
idle; `save_cost_s`: the median of (1 - that ratio) x the seconds the save
was written, i.e. the seconds of training a save costs; `writer_cpu_s`: the
median CPU seconds of one pserver's writing thread per timed save, from the
pservers' logs).
Last, it restores the newest (full) checkpoint cold onto two pservers and
onto three, twice each, alternating (the best of each: `plain_restore_s`,
`reshard_restore_s`, and their ratio `reshard_vs_plain_restore`).
In the same run, on the same file system, it measures the disk: a
sequential write of the same byte count with fsync, and a cold read of it,
right before the save and again at the end (the mean of the two is the
ceiling: this machine's disk speed swings a lot from minute to minute).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import wait_ready_file

from ckpt import CheckpointConfig, reader, writer
from ckpt.config import PRIORITIES
from ckpt.local import LocalStorage
from pserver import config as cfg
from pserver.rpc.client import PSClient
from pserver.rpc.coord import CoordinatorClient
from trainer.demo import dump_toml

DIM = 64


def evict(path: Path) -> None:
    """Drop a directory's files from the page cache (they are clean: fsynced)."""
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_ceiling(directory: Path, nbytes: int) -> tuple[float, float]:
    """(write GB/s with fsync, cold read GB/s) of one sequential file of nbytes."""
    path = directory / "ceiling.bin"
    chunk = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = nbytes
    while left > 0:
        left -= os.write(fd, chunk[:min(left, len(chunk))])
    os.fsync(fd)
    os.close(fd)
    write = nbytes / (time.perf_counter() - start) / 1e9
    evict(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(bytearray(8 << 20)):
            pass
    read = nbytes / (time.perf_counter() - start) / 1e9
    path.unlink()
    return write, read


def start(job: Path, work: Path, tag: str, n: int = 2
          ) -> tuple[list[subprocess.Popen], list[Path], float]:
    """`n` pservers (pserver 0 first: it hosts the coordinator); returns when all serve."""
    logs = [work / f"{tag}-pserver{i}.log" for i in range(n)]
    ready = [work / f"{tag}-pserver{i}.ready" for i in range(n)]
    for r in ready:
        r.unlink(missing_ok=True)  # a file of an earlier run in --dir
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "pserver", "--config", str(job), "--log-level", "INFO"]

    def one(i: int, extra: list[str]) -> subprocess.Popen:
        return subprocess.Popen([*base, "--id", str(i), "--ready-file", str(ready[i]), *extra],
                                env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)

    pservers = '["' + '","'.join(["127.0.0.1:0"] * n) + '"]'
    procs = [one(0, ["--set", f"job.pservers={pservers}"])]
    first = wait_ready_file(ready[0], procs[0], 600)
    pservers = pservers.replace("127.0.0.1:0", first, 1)
    procs += [one(i, ["--set", f"job.pservers={pservers}"]) for i in range(1, n)]
    addrs = [first] + [wait_ready_file(ready[i], procs[i], 600) for i in range(1, n)]
    seconds = time.perf_counter() - t0
    (work / "addresses").write_text("\n".join(addrs) + "\n")
    return procs, logs, seconds


def connect(job: Path, work: Path) -> cfg.JobConfig:
    addrs = (work / "addresses").read_text().split()
    return cfg.load(job, ["job.pservers=[" + ",".join(f'"{a}"' for a in addrs) + "]"])


class Saver:
    """The job's only trainer towards the coordinator: barrier, its part, commit."""

    def __init__(self, config: cfg.JobConfig, storage: LocalStorage) -> None:
        self.coord, self.storage = CoordinatorClient(config), storage
        serial = self.coord.join_trainer(0)
        self.step = reader.read_trainer(storage, serial, 0)[2]["global_step"] if serial >= 0 \
            else 0

    def save(self, final: bool = False) -> tuple[int, float, float]:
        """(serial, seconds the trainer is held, seconds until committed)."""
        while True:  # -1: the last save is still being finished (committed, not yet done)
            self.step += 1
            t0 = time.perf_counter()
            new = self.coord.barrier(0, self.step, 0, self.step, final)
            if new >= 0:
                break
            time.sleep(0.05)
        part = writer.write_trainer(self.storage, new, 0, 0, self.step,
                                    {"global_step": self.step})
        self.coord.commit(0, new, part, None)
        stall = time.perf_counter() - t0
        while not self.storage.exists(f"checkpoint_{new}/_SUCCESS"):
            time.sleep(0.02)
        return new, stall, time.perf_counter() - t0

    def close(self) -> None:
        self.coord.close()


class Pusher:
    """A trainer's load: pushes of BATCH rows (Adagrad), back to back, in a thread; records
    when each push ended."""

    BATCH = 4096

    def __init__(self, config: cfg.JobConfig, ids: np.ndarray) -> None:
        self.client = PSClient(config, 0)
        self.ids, self.done, self.stop = ids, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        grads = rng.standard_normal((self.BATCH, DIM)).astype(np.float32) * 1e-3
        while not self.stop.is_set():
            batch = np.unique(self.ids[rng.integers(0, len(self.ids), self.BATCH)])
            self.client.push("emb", batch, grads[:len(batch)])
            self.done.append(time.perf_counter())

    def rate(self, t0: float, t1: float) -> float:
        """Pushes per second that ended within [t0, t1]."""
        return sum(t0 <= t <= t1 for t in self.done) / max(t1 - t0, 1e-9)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.client.close()


def touch(config: cfg.JobConfig, ids: np.ndarray, fraction: float) -> int:
    """Push gradients to `fraction` of the rows (the first ones: any rows would do)."""
    n = int(len(ids) * fraction)
    client = PSClient(config, 0)
    grads = np.full((65_536, DIM), 1e-3, dtype=np.float32)
    for lo in range(0, n, 65_536):
        chunk = ids[lo:min(n, lo + 65_536)]
        client.push("emb", chunk, grads[:len(chunk)])
    client.close()
    return n


def restore_seconds(logs: list[Path]) -> tuple[float, float]:
    """(verify + the slowest pserver's load, that load) from a start's logs."""
    text = "".join(p.read_text() for p in logs)
    loads = [float(x) for x in re.findall(
        r"restored checkpoint_\d+(?: \(chain [^)]*\))? \(step \d+\) in ([\d.]+)s", text)]
    assert len(loads) == len(logs), text[-2000:]
    verify_s = float(re.search(r"verified in ([\d.]+)s", text).group(1))
    return verify_s + max(loads), max(loads)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    ap.add_argument("--touch", type=float, default=0.01,
                    help="fraction of the rows changed before the delta (default 0.01)")
    ap.add_argument("--window", type=float, default=3.0,
                    help="seconds of pushes timed with no save running (default 3)")
    ap.add_argument("--duty", type=float, default=None,
                    help="checkpoint.background_duty of the background saves (default: the "
                         "key's default)")
    ap.add_argument("--priority", choices=PRIORITIES, default=None,
                    help="checkpoint.background_priority of the background saves (default: "
                         "the key's default)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="pushes timed with no save, then during a full save: how many "
                         "times (default 3; the median ratio is reported)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="psrt-ckpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckdir = work / "ckpt"
    shutil.rmtree(ckdir, ignore_errors=True)
    doc = {"job": {"name": "bench", "mode": "async", "pservers": ["127.0.0.1:0"] * 2},
           "tables": {"emb": {"dim": DIM, "optimizer": "adagrad"}},
           "checkpoint": {"checkpoint_dir": str(ckdir), "max_num_checkpoints": 2},
           "rpc": {"checkpoint_timeout_s": 3600.0}}
    job = work / "job.toml"
    job.write_text(dump_toml(doc))
    out: dict = {"rows": args.rows}
    ids = np.arange(args.rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    before = blocking_phase(job, work, ckdir, ids, out)
    # background saves, a full one every 2: restored full, then delta, full, delta, ...
    background = {**doc["checkpoint"], "background": True, "full_every": 2}
    if args.duty is not None:
        background["background_duty"] = args.duty
    if args.priority is not None:
        background["background_priority"] = args.priority
    out["background_duty"] = background.get("background_duty",
                                            CheckpointConfig("d").background_duty)
    out["background_priority"] = background.get("background_priority",
                                                CheckpointConfig("d").background_priority)
    job.write_text(dump_toml({**doc, "checkpoint": background}))
    background_phase(job, work, ckdir, ids, args, out)
    # the newest checkpoint (full) restored cold onto 2 and onto 3 pservers, twice each,
    # alternating: the best of each
    times: dict[int, list[float]] = {2: [], 3: []}
    for n in (2, 3, 2, 3):
        evict(ckdir)
        procs, logs, _ = start(job, work, f"reshard{n}", n=n)
        stop(procs)
        times[n].append(restore_seconds(logs)[0])
    out["plain_restore_s"], out["reshard_restore_s"] = min(times[2]), min(times[3])
    print(f"the newest checkpoint restored onto 2 pservers in {times[2]} s, onto 3 in "
          f"{times[3]} s", flush=True)
    after = disk_ceiling(work, out["bytes"])
    print(f"disk after: write+fsync {after[0]:.2f} GB/s, cold read {after[1]:.2f} GB/s",
          flush=True)
    print(json.dumps(summary(out, before, after)))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


def blocking_phase(job: Path, work: Path, ckdir: Path, ids: np.ndarray,
                   out: dict) -> tuple[float, float]:
    """Fill the table, time a blocking full save; returns the disk speed measured before."""
    procs, _, _ = start(job, work, "fill")
    config = connect(job, work)
    client = PSClient(config)
    client.wait_ready()
    t0 = time.perf_counter()
    for lo in range(0, len(ids), 262_144):
        client.pull("emb", ids[lo:lo + 262_144], unique=True)
    client.close()
    print(f"filled {len(ids):,} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    # this kind of machine's disk speed swings from run to run (bursts, throttling):
    # measure it right before the save and again after the restore, and use the mean
    before = disk_ceiling(work, len(ids) * (DIM * 8 + 24))
    print(f"disk before: write+fsync {before[0]:.2f} GB/s, cold read {before[1]:.2f} GB/s",
          flush=True)
    storage = LocalStorage(ckdir)
    saver = Saver(config, storage)
    serial, out["save_s"], _ = saver.save(final=True)
    saver.close()
    out["bytes"] = reader.load_manifest(storage, serial).total_bytes
    print(f"saved checkpoint_{serial}: {out['bytes'] / 1e9:.2f} GB in {out['save_s']:.2f}s",
          flush=True)
    stop(procs)
    evict(ckdir)
    return before


def background_phase(job: Path, work: Path, ckdir: Path, ids: np.ndarray,
                     args: argparse.Namespace, out: dict) -> None:
    """Restore (timed), then background saves: a delta after touching a fraction of the
    rows, fulls (the trainers' stall), and pushes timed while a full save is written."""
    procs, logs, out["restore_total_s"] = start(job, work, "restore")
    out["restore_s"], out["load_s"] = restore_seconds(logs)
    out["verify_s"] = out["restore_s"] - out["load_s"]
    config = connect(job, work)
    storage = LocalStorage(ckdir)
    saver = Saver(config, storage)
    touched = touch(config, ids, args.touch)
    d1, out["delta_stall_s"], out["delta_commit_s"] = saver.save()
    m = reader.load_manifest(storage, d1)
    assert m.kind == "delta", m.kind
    out["delta_bytes"] = m.total_bytes
    print(f"delta checkpoint_{d1} of checkpoint_{m.base} ({touched:,} rows touched): "
          f"{m.total_bytes / 1e6:.1f} MB, trainers held {out['delta_stall_s']:.2f}s",
          flush=True)
    _, out["first_stall_s"], _ = saver.save()  # full
    saver.save()  # a delta
    f4, out["stall_s"], out["background_commit_s"] = saver.save()
    assert reader.load_manifest(storage, f4).kind == "full"
    print(f"background save: trainers held {out['stall_s']:.2f}s (the first one "
          f"{out['first_stall_s']:.2f}s), committed "
          f"after {out['background_commit_s']:.2f}s", flush=True)
    pusher = Pusher(config, ids)
    time.sleep(1.0)  # warm up, and one save under load (it sizes the pservers' buffers)
    saver.save()
    saver.save()
    rounds = []  # (idle, during): other load on the machine comes and goes, so the two
    for _ in range(args.rounds):  # are measured back to back, a few times
        t0 = time.perf_counter()
        time.sleep(args.window)
        idle = pusher.rate(t0, time.perf_counter())
        saver.save()  # a delta: the next save is full
        t0 = time.perf_counter()
        full, stall, commit = saver.save()
        assert reader.load_manifest(storage, full).kind == "full"
        rounds.append((idle, pusher.rate(t0 + stall, t0 + commit), commit - stall))
        print(f"pushes of {Pusher.BATCH} rows: {idle:.1f}/s with no save, "
              f"{rounds[-1][1]:.1f}/s while checkpoint_{full} was written "
              f"({commit - stall:.2f}s)", flush=True)
    pusher.close()
    saver.close()
    ratios = sorted(d / max(i, 1e-9) for i, d, _ in rounds)
    out["train_during_save_vs_idle"] = ratios[len(ratios) // 2]  # the median
    costs = sorted((1 - d / max(i, 1e-9)) * s for i, d, s in rounds)
    out["save_cost_s"] = costs[len(costs) // 2]
    out["train_during_save_rounds"] = [[round(i, 1), round(d, 1), round(s, 2)]
                                       for i, d, s in rounds]
    stop(procs)
    out["writer_cpu_s"] = writer_cpu(logs, full, args.rounds)


def writer_cpu(logs: list[Path], last: int, rounds: int) -> float:
    """The median CPU seconds of a pserver's writing thread over the timed full saves
    (checkpoints last, last - 2, ...: a delta before each), from the pservers' logs."""
    serials = {last - 2 * k for k in range(rounds)}
    found = [float(cpu) for p in logs for serial, cpu in re.findall(
        r"wrote its part of checkpoint_(\d+): .*; ([\d.]+)s of this thread's CPU\)",
        p.read_text()) if int(serial) in serials]
    assert len(found) == len(serials) * len(logs), found
    return sorted(found)[len(found) // 2]


def summary(out: dict, before: tuple[float, float], after: tuple[float, float]) -> dict:
    write_gbps, read_gbps = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    nbytes = out["bytes"]

    def r(x: float) -> float:
        return round(x, 3)

    return {
        "rows": out["rows"], "bytes": nbytes, "save_s": r(out["save_s"]),
        "restore_s": r(out["restore_s"]), "verify_s": r(out["verify_s"]),
        "load_s": r(out["load_s"]), "restore_total_s": r(out["restore_total_s"]),
        "disk_write_gbps": r(write_gbps), "disk_read_gbps": r(read_gbps),
        "disk_write_gbps_before_after": [r(before[0]), r(after[0])],
        "disk_read_gbps_before_after": [r(before[1]), r(after[1])],
        "save_vs_disk": r(nbytes / out["save_s"] / 1e9 / write_gbps),
        "blocking_save_s": r(out["save_s"]), "stall_s": r(out["stall_s"]),
        "stall_vs_blocking": r(out["stall_s"] / out["save_s"]),
        "background_commit_s": r(out["background_commit_s"]),
        "first_stall_s": r(out["first_stall_s"]),
        "restore_vs_disk": r(nbytes / out["restore_s"] / 1e9 / read_gbps),
        "delta_bytes": out["delta_bytes"],
        "incremental_bytes_vs_full": round(out["delta_bytes"] / nbytes, 4),
        "delta_stall_s": r(out["delta_stall_s"]), "delta_commit_s": r(out["delta_commit_s"]),
        "background_duty": out["background_duty"],
        "background_priority": out["background_priority"],
        "train_during_save_vs_idle": r(out["train_during_save_vs_idle"]),
        "save_cost_s": r(out["save_cost_s"]),
        "writer_cpu_s": r(out["writer_cpu_s"]),
        "pushes_per_s_idle_during_write_s_rounds": out["train_during_save_rounds"],
        "reshard_restore_s": r(out["reshard_restore_s"]),
        "plain_restore_s": r(out["plain_restore_s"]),
        "reshard_vs_plain_restore": r(out["reshard_restore_s"] / out["plain_restore_s"]),
    }


if __name__ == "__main__":
    main()

"""A blocking checkpoint of two pservers, and a restore, against the disk's own speed.

    python benchmarks/checkpoint.py [--rows N] [--dir DIR]

Two pserver processes hold one table of N rows (default 4,000,000) of dim 64
with Adagrad state. The script saves a checkpoint through the coordinator (as
the job's only trainer: barrier, its part, commit) and times it; then stops
both pservers, evicts the files from the page cache, starts them again and
times the restore (the coordinator's checksum verification plus each pserver's
load). Then, with `checkpoint.background = true`, it saves again and times how
long the trainer is held (`stall_s`: the pservers copy their shards in memory)
against the blocking save. In the same run, on the same file system, it measures the disk: a
sequential write of the same byte count with fsync, and a cold read of it,
right before the save and again after the restore (the mean of the two is the
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
import time
from pathlib import Path

import numpy as np
from _common import wait_ready_file

from ckpt import reader, writer
from ckpt.storage import LocalStorage
from pserver import config as cfg
from pserver.client import PSClient
from pserver.coordinator_rpc import CoordinatorClient
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


def start(job: Path, work: Path, tag: str) -> tuple[list[subprocess.Popen], list[Path], float]:
    """Both pservers (pserver 0 first: it hosts the coordinator); returns when both serve."""
    logs = [work / f"{tag}-pserver{i}.log" for i in range(2)]
    ready = [work / f"{tag}-pserver{i}.ready" for i in range(2)]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "pserver", "--config", str(job), "--log-level", "INFO"]
    procs = [subprocess.Popen([*base, "--id", "0", "--ready-file", str(ready[0])], env=env,
                              stdout=open(logs[0], "w"), stderr=subprocess.STDOUT)]
    first = wait_ready_file(ready[0], procs[0], 600)
    procs.append(subprocess.Popen([*base, "--id", "1", "--ready-file", str(ready[1]), "--set",
                                   f'job.pservers=["{first}","127.0.0.1:0"]'], env=env,
                                  stdout=open(logs[1], "w"), stderr=subprocess.STDOUT))
    second = wait_ready_file(ready[1], procs[1], 600)
    seconds = time.perf_counter() - t0
    (work / "addresses").write_text(f"{first}\n{second}\n")
    return procs, logs, seconds


def background_save(job: Path, work: Path, storage: LocalStorage) -> tuple[float, float]:
    """(seconds the trainer is held, seconds until committed) of one background save."""
    addrs = (work / "addresses").read_text().split()
    config = cfg.load(job, [f'job.pservers=["{addrs[0]}","{addrs[1]}"]'])
    coord = CoordinatorClient(config)
    serial = coord.join_trainer(0)
    state = reader.read_trainer(storage, serial, 0)[2]
    step = state["global_step"] + 1
    t0 = time.perf_counter()
    new = coord.barrier(0, step, 0, step, False)
    part = writer.write_trainer(storage, new, 0, 0, step, {"global_step": step})
    coord.commit(0, new, part, None)
    stall = time.perf_counter() - t0
    while reader.newest_complete(storage, deep=False).serial != new:
        time.sleep(0.02)
    coord.close()
    return stall, time.perf_counter() - t0


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
    procs, logs, _ = start(job, work, "fill")
    addrs = (work / "addresses").read_text().split()
    config = cfg.load(job, [f'job.pservers=["{addrs[0]}","{addrs[1]}"]'])
    client = PSClient(config)
    client.wait_ready()
    ids = np.arange(args.rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    t0 = time.perf_counter()
    for lo in range(0, args.rows, 262_144):
        client.pull("emb", ids[lo:lo + 262_144], unique=True)
    print(f"filled {args.rows:,} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    # this kind of machine's disk speed swings from run to run (bursts, throttling):
    # measure it right before the save and again after the restore, and use the mean
    before = disk_ceiling(work, args.rows * (DIM * 8 + 24))
    print(f"disk before: write+fsync {before[0]:.2f} GB/s, cold read {before[1]:.2f} GB/s",
          flush=True)
    coord = CoordinatorClient(config)
    storage = LocalStorage(ckdir)
    assert coord.join_trainer(0) == -1
    t0 = time.perf_counter()
    serial = coord.barrier(0, 1, 0, 0, True)
    part = writer.write_trainer(storage, serial, 0, 0, 0, {"global_step": 1})
    coord.commit(0, serial, part, None)
    save_s = time.perf_counter() - t0
    nbytes = reader.load_manifest(storage, serial).total_bytes
    print(f"saved checkpoint_{serial}: {nbytes / 1e9:.2f} GB in {save_s:.2f}s", flush=True)
    coord.close()
    client.close()
    stop(procs)
    evict(ckdir)
    job.write_text(dump_toml({**doc, "checkpoint": {**doc["checkpoint"], "background": True}}))
    procs, logs, restore_total_s = start(job, work, "restore")
    first_stall_s, _ = background_save(job, work, storage)  # maps the snapshot buffers
    stall_s, background_s = background_save(job, work, storage)
    print(f"background save: trainers held {stall_s:.2f}s (the first one {first_stall_s:.2f}s, "
          f"while the snapshot buffers are mapped), committed after {background_s:.2f}s",
          flush=True)
    stop(procs)
    text = "".join(p.read_text() for p in logs)
    loads = [float(x) for x in re.findall(r"restored checkpoint_\d+ \(step \d+\) in ([\d.]+)s",
                                          text)]
    verify_s = float(re.search(r"verified in ([\d.]+)s", text).group(1))
    restore_s = verify_s + max(loads)
    print(f"restored in {restore_s:.2f}s (verify {verify_s:.2f}s + load {max(loads):.2f}s; "
          f"process start to serving {restore_total_s:.2f}s)", flush=True)
    after = disk_ceiling(work, nbytes)
    print(f"disk after: write+fsync {after[0]:.2f} GB/s, cold read {after[1]:.2f} GB/s",
          flush=True)
    write_gbps, read_gbps = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    save_gbps, restore_gbps = nbytes / save_s / 1e9, nbytes / restore_s / 1e9
    print(json.dumps({
        "rows": args.rows, "bytes": nbytes, "save_s": round(save_s, 3),
        "restore_s": round(restore_s, 3), "verify_s": round(verify_s, 3),
        "load_s": round(max(loads), 3), "restore_total_s": round(restore_total_s, 3),
        "disk_write_gbps": round(write_gbps, 3), "disk_read_gbps": round(read_gbps, 3),
        "disk_write_gbps_before_after": [round(before[0], 3), round(after[0], 3)],
        "disk_read_gbps_before_after": [round(before[1], 3), round(after[1], 3)],
        "save_vs_disk": round(save_gbps / write_gbps, 3),
        "blocking_save_s": round(save_s, 3), "stall_s": round(stall_s, 3),
        "stall_vs_blocking": round(stall_s / save_s, 3),
        "background_commit_s": round(background_s, 3),
        "first_stall_s": round(first_stall_s, 3),
        "restore_vs_disk": round(restore_gbps / read_gbps, 3),
    }))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

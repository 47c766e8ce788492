"""Chaos: SIGKILL random processes of a sync job, N times; the job must heal by itself and
end bit-identical to a run never interrupted.

    python benchmarks/chaos.py --kills 50 --seed 1

One local launcher runs 2 pservers and 2 trainers (sync mode, a checkpoint every few
steps, saves slowed down by a slow-write fault of checkpoint.faults so that some kills
land in the middle of one). After a random pause the script kills a random process (pserver 0,
which hosts the coordinator, included); the launcher starts it again and the job rolls
back to its newest complete checkpoint without restarting the others. The next kill
comes once both trainers train again. The last line is JSON: kills, recoveries (the
generations the job rolled back to), identical (final parameters equal to the
uninterrupted run's, byte for byte), lost_steps (steps redone because of rollbacks).

With --storage-faults the job file also injects store faults (checkpoint.faults, in every
process, each counted per process): two outages of the whole checkpoint_dir (it vanishes
for OUTAGE_S seconds after a number of store calls), and a damaged read of pserver 1's
table file in its second restore. The line then also has outages (rollbacks and saves that
met a vanished store: rollbacks_in_outage + saves_failed_in_outage), damaged (restores that
found a damaged file and fell back) and lost_commits: committed checkpoints newer than what
a restore then took, other than those found damaged (deleted or skipped work: must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckpt import reader  # noqa: E402
from ckpt.local import LocalStorage  # noqa: E402
from trainer.datagen import generate  # noqa: E402
from trainer.demo import demo_job, dump_toml  # noqa: E402

MODEL = {"kind": "deepfm", "embedding_dim": 4, "slot_groups": 2, "hidden": [8],
         "use_fm": True, "use_wide": True, "use_numeric": True}
COMMITTED = re.compile(r"coordinator: committed checkpoint_(\d+)")
RESTORES = re.compile(r"coordinator: (?:generation \d+ restores|.* looks unreachable .*; "
                      r"generation \d+ restores|.* locked for job .*; restoring) "
                      r"(?:checkpoint_(\d+)|nothing)")
DAMAGED = re.compile(r"cannot restore checkpoint_(\d+): ")
UNREACHABLE = re.compile(r"coordinator: .* looks unreachable")
FAILED_AWAY = re.compile(r"coordinator: checkpoint_(\d+) failed and was not committed: .*vanished")
OUTAGE_S = 1.5
ROLLED = re.compile(r"(trainer\[\d\]) rolled back from global step (\d+) to (\d+) "
                    r"\(checkpoint_-?\d+, generation (\d+)\)")
STEP = re.compile(r"(trainer\[\d\]) epoch \d+ step \d+/")


def storage_faults() -> list[dict]:
    """The store faults of --storage-faults (see the module's doc)."""
    return [{"kind": "vanish", "after": 300, "seconds": OUTAGE_S},
            {"kind": "vanish", "after": 900, "seconds": OUTAGE_S},
            {"kind": "damage", "op": "read", "after": 1, "times": 1,
             "path": "*/__lockup_table__/table_pserver_1/emb_0.values"}]


def write_job(data: Path, work: Path, epochs: int, kills: int, save_sleep: float,
              faults: bool = False) -> Path:
    shutil.rmtree(work, ignore_errors=True)  # a fresh start, not a resume of an earlier run
    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 2, 2, epochs, MODEL)
    doc["trainer"].update(batch_size=128, progress="log", log_every=1)
    doc["checkpoint"] = {"checkpoint_dir": str(work / "ckpt"), "max_num_checkpoints": 3,
                         "epoch_interval": 1, "step_interval": 5,
                         # each pserver's save waits midway: some kills land in one
                         "faults": [{"kind": "slow", "seconds": save_sleep, "op": "write",
                                     "path": "*/__lockup_table__/*/emb_0.values"},
                                    *(storage_faults() if faults else [])]}
    doc["recovery"] = {"heartbeat_s": 0.2, "liveness_timeout_s": 2.0, "rejoin_timeout_s": 120.0,
                       "max_restarts": kills}
    work.mkdir(parents=True, exist_ok=True)
    path = work / "job.toml"
    path.write_text(dump_toml(doc))
    return path


def final_state(ckdir: Path) -> dict:
    storage = LocalStorage(ckdir)
    manifest = reader.newest_complete(storage)
    if manifest is None or not manifest.final:
        raise RuntimeError(f"no final checkpoint in {ckdir}")
    return reader.read_all(storage, manifest)


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(a[k][n].tobytes() == b[k][n].tobytes() for n in a[k])
        for k in a)


def launch(job: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "launch", "--config", str(job)],
                            cwd=job.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


class Chaos:
    """Reads the launcher's output; kills a random process whenever the job trains again."""

    def __init__(self, job: Path, kills: int, seed: int, log: Path) -> None:
        self.job, self.kills_left, self.rng = job, kills, np.random.default_rng(seed)
        self.kills: list[str] = []
        self.rolled: dict[int, int] = {}  # generation -> steps redone (largest over trainers)
        self.log = log.open("w")
        self._armed_at: float | None = None  # armed once both trainers train
        self._training: set[str] = set()
        self.committed: set[int] = set()
        self.damaged: set[int] = set()
        self.unreachable = 0  # rollbacks that met the store away
        self.failed_away: set[int] = set()  # saves that failed because it was away
        self.lost_commits: set[int] = set()  # newer than a restore, and not damaged

    def _pause(self) -> float:
        return float(self.rng.uniform(0.3, 2.5))

    def feed(self, line: str) -> None:
        self.log.write(line)
        if m := COMMITTED.search(line):
            self.committed.add(int(m.group(1)))
        if m := DAMAGED.search(line):
            self.damaged.add(int(m.group(1)))
        if UNREACHABLE.search(line):
            self.unreachable += 1
        if m := FAILED_AWAY.search(line):
            self.failed_away.add(int(m.group(1)))
        if m := RESTORES.search(line):
            restored = int(m.group(1)) if m.group(1) else -1
            self.lost_commits |= {s for s in self.committed - self.damaged if s > restored}
        if m := ROLLED.search(line):
            lost = int(m.group(2)) - int(m.group(3))
            gen = int(m.group(4))
            self.rolled[gen] = max(self.rolled.get(gen, 0), lost)
        if m := STEP.search(line):
            self._training.add(m.group(1))
            if self._armed_at is None and len(self._training) == 2 and self.kills_left:
                self._armed_at = time.monotonic() + self._pause()

    def tick(self) -> None:
        if self._armed_at is None or time.monotonic() < self._armed_at:
            return
        pids = json.loads((self.job.parent / "pids.json").read_text())
        role = str(self.rng.choice(sorted(pids)))
        try:
            os.kill(pids[role], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills.append(role)
        self.log.write(f"#### chaos: SIGKILL {role} (pid {pids[role]})\n")
        self.log.flush()
        self.kills_left -= 1
        self._armed_at, self._training = None, set()


def run_chaos(job: Path, env: dict, kills: int, seed: int, timeout: float) -> Chaos:
    chaos = Chaos(job, kills, seed, job.parent / "chaos.log")
    p = launch(job, env)
    lines: list[str] = []
    done = threading.Event()

    def pump() -> None:
        for line in p.stdout:
            lines.append(line)
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = 0
    while not done.is_set() and time.monotonic() < deadline:
        while seen < len(lines):
            chaos.feed(lines[seen])
            seen += 1
        chaos.tick()
        time.sleep(0.02)
    for line in lines[seen:]:
        chaos.feed(line)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        raise RuntimeError(f"the job did not end within {timeout:.0f}s; see {chaos.log.name}")
    chaos.log.close()
    if p.wait() != 0:
        raise RuntimeError(f"the launcher exited {p.returncode}; see {chaos.log.name}")
    return chaos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5, help="N: how many processes to kill")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pauses and the victims")
    ap.add_argument("--examples", type=int, default=4000, help="training examples")
    ap.add_argument("--epochs", type=int, default=0,
                    help="epochs (default: 2 + 1.5 N, enough for N kills)")
    ap.add_argument("--save-sleep", type=float, default=0.3,
                    help="seconds each pserver's save waits midway (a slow-write fault), so "
                    "that some kills land in one")
    ap.add_argument("--timeout", type=float, default=0, help="seconds (default: from N)")
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    ap.add_argument("--storage-faults", action="store_true",
                    help="also inject store outages and a damaged read (see above)")
    args = ap.parse_args()
    epochs = args.epochs or 2 + (3 * args.kills + 1) // 2
    timeout = args.timeout or 120 + 30 * args.kills
    with tempfile.TemporaryDirectory(prefix="psrt-chaos-") as tmp:
        work = Path(args.workdir or tmp)
        data = work / "data"
        data.mkdir(parents=True, exist_ok=True)
        generate(data / "train.txt", args.examples, seed=args.seed, holdout_fraction=0.1,
                 holdout_path=data / "train.holdout.txt")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        started = time.perf_counter()
        ref_job = write_job(data, work / "reference", epochs, 0, args.save_sleep)
        ref = launch(ref_job, env)
        out, _ = ref.communicate(timeout=timeout)
        if ref.returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed:\n{out[-3000:]}")
        reference_s = time.perf_counter() - started
        started = time.perf_counter()
        chaos = run_chaos(write_job(data, work / "chaos", epochs, args.kills, args.save_sleep,
                                    args.storage_faults),
                          env, args.kills, args.seed, timeout)
        chaos_s = time.perf_counter() - started
        same = identical(final_state(work / "chaos" / "ckpt"),
                         final_state(work / "reference" / "ckpt"))
        by_role: dict[str, int] = {}
        for role in chaos.kills:
            by_role[role] = by_role.get(role, 0) + 1
        print(f"killed {len(chaos.kills)} times ({by_role}); the job rolled back "
              f"{len(chaos.rolled)} times and redid {sum(chaos.rolled.values())} steps; "
              f"{reference_s:.0f}s uninterrupted, {chaos_s:.0f}s with kills")
        faults = {"outages": chaos.unreachable + len(chaos.failed_away),
                  "rollbacks_in_outage": chaos.unreachable,
                  "saves_failed_in_outage": len(chaos.failed_away),
                  "damaged": len(chaos.damaged),
                  "lost_commits": len(chaos.lost_commits)} if args.storage_faults else {}
        print(json.dumps({"kills": len(chaos.kills), "recoveries": len(chaos.rolled),
                          "identical": same, "lost_steps": sum(chaos.rolled.values()),
                          **faults,
                          "kills_by_role": by_role, "epochs": epochs,
                          "uninterrupted_s": round(reference_s, 1),
                          "with_kills_s": round(chaos_s, 1)}))


if __name__ == "__main__":
    main()

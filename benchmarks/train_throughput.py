"""Training throughput and quality: the demo job stand-alone and distributed, and the reference job.

    python benchmarks/train_throughput.py [--examples N] [--epochs E] [--quick] [--no-profile]

On one set of generated data (`trainer.demo`: Criteo-format examples from a
hidden logistic model, 10% held out), the demo job (`trainer.demo.MODEL`,
batch 512, sync mode) runs

- stand-alone (`python -m trainer --standalone`, in-process tables),
- 1 pserver x 1 trainer and 2 pservers x 2 trainers (`python -m pserver` and
  `python -m trainer --id J` processes started here).

Examples/s count the training phase only: each trainer's progress line at the
last step of an epoch gives that epoch's rate (timed from the epoch's first
step, so data parsing and the held-out evaluation are excluded); a trainer's
rate is its examples over the sum of its epoch times, and a distributed run's
rate is the sum over its trainers. `auc` is the held-out AUC logged by the
2x2 run after its last epoch; `oracle_auc` is the hidden model's own AUC on
the same held-out examples.

The reference job: 26 slots from a truncated Zipf(1.1) over 1,000,000 ids per
slot, hidden weights N(0, 1) (`GeneratorConfig(vocab_size=1_000_000,
zipf_a=1.1, sigma=1.0, numeric_sigma=0)`), one shared table `emb_0` of dim 16
(Adagrad), an MLP 416-64-32-1 (ReLU, Adam), batch 512, async mode, 1 pserver
and 2 trainers. (The generator also leaves some fields empty, per slot with
probability 0.6 * u**3, and such a field is an id of its own; numeric
columns are still written but the model does not read them.)

Unless --no-profile, one more 1x1 sync run of the demo job (2 epochs) is
sampled with py-spy for --profile-seconds in each epoch, after its first 100
steps (trainer and pserver at once, idle frames included): the time of a
trainer step is split into pull, forward/backward, push, ... ; the pserver's
handler time likewise. Epoch 0 creates most rows, epoch 1 is steady state. The last line is JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from _common import ROOT, wait_ready_file, workdir

from pserver.tables.sparse import SparseTable
from trainer import data as tdata
from trainer.datagen import GeneratorConfig, GroundTruth, generate
from trainer.demo import DEMO_DATA, DEMO_EXAMPLES, demo_job, dump_toml

PROGRESS_RE = re.compile(r"(?P<role>trainer(?:\[\d+\])?) epoch (?P<epoch>\d+) step "
                         r"(?P<step>\d+)/(?P<steps>\d+) loss \S+ examples/s (?P<rate>\d+)")
AUC_RE = re.compile(r"epoch (?P<epoch>\d+): held-out logloss (?P<logloss>[\d.]+), "
                    r"AUC (?P<auc>[\d.]+)")
BATCH = 512
REF_MODEL = {"kind": "deepfm", "embedding_dim": 16, "slot_groups": 1, "hidden": [64, 32],
             "use_fm": False, "use_wide": False, "use_numeric": False}
REF_DATA = GeneratorConfig(vocab_size=1_000_000, zipf_a=1.1, sigma=1.0, numeric_sigma=0.0)


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (every process, ours or not)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of every watched process at each progress line of one trainer."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.snaps: list[tuple[int, int, float, dict[str, float]]] = []  # epoch, step, t, cpu

    def __call__(self, m: re.Match) -> None:
        cpu = {p.label: cpu_seconds(p.proc.pid) for p in self.procs}
        cpu["machine"] = machine_busy_seconds()
        self.snaps.append((int(m["epoch"]), int(m["step"]), time.monotonic(), cpu))

    def per_step(self) -> dict:
        """Over the last epoch, from its first progress line to its last: wall and CPU
        milliseconds per step of every process, and how many cores were busy on average."""
        last = [s for s in self.snaps if s[0] == self.snaps[-1][0]] if self.snaps else []
        if len(last) < 2 or last[-1][1] == last[0][1]:
            return {}
        (_, s0, t0, c0), (_, s1, t1, c1) = last[0], last[-1]
        steps = s1 - s0
        used = {k: c1[k] - c0.get(k, 0.0) for k in c1}
        machine = used.pop("machine")
        return {"steps": steps, "wall_ms_per_step": round(1000 * (t1 - t0) / steps, 2),
                "cpu_ms_per_step": {k: round(1000 * v / steps, 2) for k, v in used.items()},
                "cores_busy": round(sum(used.values()) / (t1 - t0), 2),
                "machine_cores_busy": round(machine / (t1 - t0), 2)}


class Proc:
    """A child process whose merged stdout/stderr is echoed with a prefix and kept."""

    def __init__(self, label: str, args: list[str], cwd: Path, echo: bool = True,
                 on_progress: CpuMeter | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self.label, self.lines, self.cond = label, [], threading.Condition()
        self.on_progress = on_progress
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        self.pump = threading.Thread(target=self._pump, args=(echo,), daemon=True)
        self.pump.start()

    def _pump(self, echo: bool) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if self.on_progress is not None and (m := PROGRESS_RE.search(line)):
                self.on_progress(m)
            if echo and ("examples/s" in line or "AUC" in line or "ERROR" in line
                         or "Traceback" in line):
                print(f"{self.label:>14} | {line.split(': ', 1)[-1]}", flush=True)
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_line(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        """The first output line matching `pattern` (waits for it); None on exit or timeout."""
        deadline, seen = time.monotonic() + timeout, 0
        with self.cond:
            while time.monotonic() < deadline:
                for line in self.lines[seen:]:
                    if m := pattern.search(line):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self.pump.is_alive():
                    return None
                self.cond.wait(0.2)
        return None

    def finish(self, timeout: float) -> list[str]:
        code = self.proc.wait(timeout)
        self.pump.join(5)
        if code != 0:
            tail = "\n".join(self.lines[-15:])
            raise RuntimeError(f"{self.label} exited with code {code}:\n{tail}")
        return self.lines


def start_pservers(job: Path, num: int, cwd: Path) -> tuple[list[Proc], str]:
    """`python -m pserver --config job` x num on free ports; the `job.pservers` override.

    Pserver 0 starts first: it hosts the checkpoint coordinator, which the others join
    before they serve, so they are told its bound address."""
    procs: list[Proc] = []
    addrs: list[str] = []
    try:
        for i in range(num):
            ready = cwd / f"{job.stem}.pserver{i}.ready"
            ready.unlink(missing_ok=True)
            listed = addrs[:1] + ["127.0.0.1:0"] * (num - len(addrs[:1]))
            procs.append(Proc(f"pserver[{i}]", ["-m", "pserver", "--id", str(i), "--config",
                                                str(job), "--port", "0", "--ready-file",
                                                str(ready), "--log-level", "WARNING", "--set",
                                                _pservers_override(listed)], cwd))
            addrs.append(wait_ready_file(ready, procs[-1].proc))
    except BaseException:
        stop(procs)  # none is left behind
        raise
    return procs, _pservers_override(addrs)


def _pservers_override(addrs: list[str]) -> str:
    return "job.pservers=[" + ",".join(f'"{a}"' for a in addrs) + "]"


def stop(procs: list[Proc]) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.terminate()
    for p in procs:
        try:
            p.proc.wait(30)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    """What one training run logged: per trainer, (epoch, steps, examples/s) at epoch ends."""

    name: str
    epochs: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    aucs: list[tuple[int, float, float]] = field(default_factory=list)  # epoch, logloss, auc
    wall_s: float = 0.0
    cpu: dict = field(default_factory=dict)  # CpuMeter.per_step()

    def parse(self, lines: list[str]) -> Run:
        for line in lines:
            if (m := PROGRESS_RE.search(line)) and m["step"] == m["steps"]:
                self.epochs.setdefault(m["role"], []).append(
                    (int(m["epoch"]), int(m["steps"]), float(m["rate"])))
            elif m := AUC_RE.search(line):
                self.aucs.append((int(m["epoch"]), float(m["logloss"]), float(m["auc"])))
        if not self.epochs:
            raise RuntimeError(f"{self.name}: no end-of-epoch progress line in the output")
        return self

    def trainer_rate(self, role: str) -> float:
        """Examples over training seconds, all epochs of one trainer."""
        eps = self.epochs[role]
        seconds = sum(steps * BATCH / r for _, steps, r in eps)
        return sum(steps * BATCH for _, steps, _ in eps) / seconds

    @property
    def rate(self) -> float:
        return sum(self.trainer_rate(r) for r in self.epochs)

    @property
    def last_epoch_rate(self) -> float:
        return sum(eps[-1][2] for eps in self.epochs.values())

    @property
    def auc(self) -> float:
        return self.aucs[-1][2] if self.aucs else float("nan")

    def summary(self) -> str:
        per = ", ".join(f"{role} {self.trainer_rate(role):,.0f}" for role in sorted(self.epochs))
        text = (f"{self.name}: {self.rate:,.0f} examples/s over all epochs ({per}); last "
                f"epoch {self.last_epoch_rate:,.0f}; held-out AUC {self.auc:.5f}; "
                f"wall {self.wall_s:.0f}s")
        if self.cpu:
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in self.cpu["cpu_ms_per_step"].items())
            text += (f"\n  last epoch: {self.cpu['wall_ms_per_step']:.1f} ms per step; CPU ms "
                     f"per step: {cpu}; {self.cpu['cores_busy']:.2f} cores busy with it "
                     f"({self.cpu['machine_cores_busy']:.2f} with anything)")
        return text


def run_standalone(job: Path, cwd: Path) -> Run:
    started = time.perf_counter()
    meter = CpuMeter()
    p = Proc("standalone", ["-m", "trainer", "--standalone", "--config", str(job)], cwd,
             on_progress=meter)
    meter.procs.append(p)
    lines = p.finish(3600)
    run = Run("standalone", cpu=meter.per_step()).parse(lines)
    run.wall_s = time.perf_counter() - started
    return run


def run_distributed(name: str, job: Path, pservers: int, trainers: int, cwd: Path,
                    profile_s: float = 0.0, profile_epochs: tuple[int, ...] = ()
                    ) -> tuple[Run, list[dict]]:
    """P pservers and T trainers of `job`; py-spy trainer 0 and pserver 0 in `profile_epochs`."""
    started = time.perf_counter()
    ps, bound = start_pservers(job, pservers, cwd)
    profiles: list[dict] = []
    meter = CpuMeter()
    tr: list[Proc] = []
    try:
        tr += [Proc(f"{name} t{j}", ["-m", "trainer", "--id", str(j), "--config", str(job),
                                    "--set", bound], cwd, on_progress=None if j else meter)
              for j in range(trainers)]
        meter.procs += [*ps, *tr]
        for epoch in profile_epochs:
            profiles.append(profile_step(tr[0], ps[0], profile_s, cwd, epoch))
        lines = [line for t in tr for line in t.finish(3600)]
    finally:
        stop([*tr, *ps])  # trainers too, should one have failed
    run = Run(name, cpu=meter.per_step()).parse(lines)
    run.wall_s = time.perf_counter() - started
    return run, profiles


# ---------------------------------------------------------------- data and jobs


def make_data(dirname: Path, examples: int, config: GeneratorConfig | None = None) -> dict:
    """Generate train.txt / train.holdout.txt (10% held out) and parse them once (cached)."""
    dirname.mkdir(parents=True, exist_ok=True)
    train, holdout = dirname / "train.txt", dirname / "train.holdout.txt"
    t0 = time.perf_counter()
    res = generate(train, examples, seed=0, holdout_fraction=0.1, holdout_path=holdout,
                   config=config)
    t1 = time.perf_counter()
    for f in (train, holdout):  # the trainers then load the .npz cache, not the text
        tdata.read_file(f, cache=True)
    print(f"data {dirname.name}: {examples:,} examples ({res.num_holdout:,} held out) generated "
          f"in {t1 - t0:.1f}s, parsed in {time.perf_counter() - t1:.1f}s; oracle AUC "
          f"{res.oracle_auc:.5f}; positive rate {res.positive_rate:.3f}", flush=True)
    return {"train": train.name, "holdout": holdout.name, "oracle_auc": res.oracle_auc,
            "oracle_logloss": res.oracle_logloss, "positive_rate": res.positive_rate}


def write_job(dirname: Path, name: str, data: dict, pservers: int, trainers: int, epochs: int,
              model: dict | None = None, mode: str = "sync", log_every: int = 100,
              checkpoints: bool = False) -> Path:
    """The demo's job file for P x T (and `model`); without `checkpoints`, no [checkpoint]."""
    job = demo_job(data["train"], data["holdout"], pservers, trainers, epochs, model)
    job["job"].update(name=name, mode=mode)
    job["trainer"].update(progress="log", log_every=log_every)
    if checkpoints:
        job["checkpoint"]["checkpoint_dir"] = str(dirname / f"checkpoints-{name}")
    else:
        del job["checkpoint"]
    path = dirname / f"{name}.toml"
    path.write_text(dump_toml(job))
    return path


# ---------------------------------------------------------------- profile


def pyspy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(["py-spy", "record", "-o", str(out), "-f", "raw", "-p", str(pid),
                             "-d", str(max(1, round(seconds))), "-r", "200", "--nonblocking",
                             "--idle"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy raw output: (frames root first, without line numbers kept apart, count)."""
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";"), int(count)))
    return samples


def _func(frame: str) -> str:
    """'Class.method (pkg/file.py:123)' -> 'Class.method (pkg/file.py)'."""
    return re.sub(r":\d+\)$", ")", frame)


# (category, every one of these substrings must be in the stack); first match wins
TRAINER_RULES = [
    ("pull: dedup ids", ["Trainer._pull", "pserver/tables/dedup.py"]),
    ("pull: split ids by pserver", ["Trainer._pull", "PSClient._split"]),
    ("pull: encode requests", ["Trainer._pull", "encode_pull_request"]),
    ("pull: wait for answers (RPC + pserver)", ["Trainer._pull", "PSClient._result"]),
    ("pull: decode rows", ["Trainer._pull", "PSClient._rows"]),
    ("pull: decode dense", ["Trainer._pull", "decode_tensor"]),
    ("pull: put rows in request order", ["Trainer._pull", "finish (pserver/rpc/client.py"]),
    ("pull: start gRPC's channel spin thread", ["Trainer._pull", "_run_channel_spin_thread"]),
    ("pull: issue calls (gRPC future)", ["Trainer._pull", "PSClient._call"]),
    ("pull: other (slot ids, reshape)", ["Trainer._pull"]),
    ("forward/backward", ["forward_backward"]),
    ("push: sum duplicate gradients", ["push_many", "sum_duplicates"]),
    ("push: split by pserver", ["push_many", "PSClient._split"]),
    ("push: encode requests", ["push_many", "encode_"]),
    ("push: wait for answers (RPC + pserver)", ["push_many", "PSClient._result"]),
    ("push: start gRPC's channel spin thread", ["push_many", "_run_channel_spin_thread"]),
    ("push: issue calls (gRPC future)", ["push_many", "PSClient._call"]),
    ("push: other (checks)", ["push_many"]),
    ("step: scale and reshape gradients", ["Trainer.step"]),
    ("data: next batch", ["next_batch"]),
    ("loop: progress, events", ["Trainer.train"]),
]
PSERVER_RULES = [
    ("Pull: wait at the sync gate", ["Servicer.Pull", "StepGate.wait_for"]),
    ("Pull: grow table arrays", ["Servicer.Pull", "SparseTable._alloc"]),
    ("Pull: create rows (initializer)", ["Servicer.Pull", "pserver/tables/initializers.py"]),
    ("Pull: id index", ["Servicer.Pull", "pserver/tables/idindex.py"]),
    ("Pull: gather rows", ["Servicer.Pull", "SparseTable.pull"]),
    ("Pull: check owner", ["Servicer.Pull", "check_owner"]),
    ("Pull: decode/encode", ["Servicer.Pull", "pserver/wire/codec.py"]),
    ("Pull: other", ["Servicer.Pull"]),
    ("Push: wait at the sync gate", ["Servicer.Push", "StepGate.wait_for"]),
    ("Push: check finite", ["Servicer.Push", "check_finite"]),
    ("Push: check owner", ["Servicer.Push", "check_owner"]),
    ("Push: sum duplicates", ["Servicer.Push", "sum_duplicates"]),
    ("Push: optimizer", ["Servicer.Push", "pserver/tables/optimizers.py"]),
    ("Push: id index", ["Servicer.Push", "pserver/tables/idindex.py"]),
    ("Push: gather/scatter rows, concat", ["Servicer.Push", "pserver/"]),
    ("Push: other", ["Servicer.Push"]),
    ("PullDense", ["Servicer.PullDense"]),
    ("PushDense", ["Servicer.PushDense"]),
    ("other handler", ["pserver/rpc/servicer.py"]),
]


def table_lock_leaves() -> dict[str, str]:
    """py-spy leaf frames of a thread waiting for a table's lock -> category.

    Taking a lock runs no Python frame, so such a thread's innermost frame is the
    `with self.lock:` line of SparseTable.pull or .push."""
    out = {}
    for fn, what in ((SparseTable.pull, "Pull"), (SparseTable.push, "Push")):
        src, start = inspect.getsourcelines(fn)
        for i, line in enumerate(src):
            if "with self.lock" in line:
                out[f"{fn.__qualname__} (pserver/tables/sparse.py:{start + i})"] = \
                    f"{what}: wait for the table lock (another call holds it)"
    return out


def breakdown(samples: list[tuple[list[str], int]], rules: list, scope: str,
              hz: float, steps: float, leaves: dict[str, str] | None = None) -> dict:
    """Share of the samples in `scope` per category (a leaf frame in `leaves` decides
    first, then the first rule whose substrings are all in the stack), and the top leaf
    and inclusive frames."""
    leaves = leaves or {}
    cats: Counter = Counter()
    leaf: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for frames, n in samples:
        text = ";".join(frames)
        if scope not in text:
            continue
        total += n
        cat = leaves.get(frames[-1]) or next(
            (c for c, subs in rules if all(s in text for s in subs)), "other")
        cats[cat] += n
        leaf[frames[-1]] += n
        for f in {_func(f) for f in frames}:
            incl[f] += n
    if not total:
        return {"samples": 0}
    ms = 1000.0 / hz / steps if steps else float("nan")
    return {
        "samples": total,
        "ms_per_step": round(total * ms, 3),
        "categories": {c: {"pct": round(100 * n / total, 1), "ms_per_step": round(n * ms, 3)}
                       for c, n in cats.most_common()},
        "top_leaf": [(f, round(100 * n / total, 1)) for f, n in leaf.most_common(15)],
        "top_inclusive": [(f, round(100 * n / total, 1)) for f, n in incl.most_common(40)
                          if "runpy" not in f and "__main__" not in f][:25],
    }


def profile_step(trainer: Proc, pserver: Proc, seconds: float, cwd: Path, epoch: int) -> dict:
    """Sample trainer and pserver with py-spy for `seconds`, from the first progress line of
    `epoch` on (so after its first log_every steps)."""
    if shutil.which("py-spy") is None:
        return {"error": "py-spy not found"}
    pattern = re.compile(PROGRESS_RE.pattern.replace(r"(?P<epoch>\d+)", f"(?P<epoch>{epoch})"))
    first = trainer.wait_line(pattern, 600)
    if first is None:
        return {"error": f"trainer ended before its first progress line of epoch {epoch}"}
    outs = {w: cwd / f"profile-epoch{epoch}-{w}.txt" for w in ("trainer", "pserver")}
    spies = {"trainer": pyspy(trainer.proc.pid, seconds, outs["trainer"]),
             "pserver": pyspy(pserver.proc.pid, seconds, outs["pserver"])}
    for name, sp in spies.items():
        _, err = sp.communicate(timeout=seconds + 60)
        if sp.returncode != 0 or not outs[name].exists():
            return {"error": f"py-spy on the {name} failed: {err.decode()[-500:]}"}
    # the rate while sampled: the epoch's last progress line so far (rates are since its start)
    rates = [float(m["rate"]) for line in list(trainer.lines) if (m := pattern.search(line))]
    steps = seconds * rates[-1] / BATCH
    return {
        "epoch": epoch, "seconds": seconds, "trainer_examples_per_s": rates[-1],
        "steps_sampled": round(steps, 1),
        "trainer": breakdown(read_raw(outs["trainer"]), TRAINER_RULES, "Trainer.train", 200,
                             steps),
        "pserver": breakdown(read_raw(outs["pserver"]), PSERVER_RULES, "pserver/rpc/servicer.py",
                             200, steps, table_lock_leaves()),
    }


def print_profile(profile: dict) -> None:
    if "error" in profile:
        print(f"profile: {profile['error']}", flush=True)
        return
    print(f"profile of the 1x1 sync demo job, epoch {profile['epoch']}: "
          f"{profile['steps_sampled']:.0f} steps in "
          f"{profile['seconds']:.0f}s at {profile['trainer_examples_per_s']:,.0f} examples/s",
          flush=True)
    for who in ("trainer", "pserver"):
        b = profile[who]
        if not b.get("samples"):
            print(f"  {who}: no samples", flush=True)
            continue
        what = "main thread" if who == "trainer" else "handler threads (summed)"
        print(f"  {who} {what}: {b['ms_per_step']:.2f} ms per step", flush=True)
        for c, v in b["categories"].items():
            print(f"    {v['pct']:5.1f}%  {v['ms_per_step']:7.3f} ms  {c}", flush=True)
        print(f"  {who} top leaf frames:", flush=True)
        for f, pct in b["top_leaf"][:10]:
            print(f"    {pct:5.1f}%  {f}", flush=True)


def compact(profile: dict) -> dict:
    """A profile without its frame lists: percentages per category."""
    out = {k: v for k, v in profile.items() if k not in ("trainer", "pserver")}
    for w in ("trainer", "pserver"):
        if w in profile:
            cats = profile[w].get("categories", {})
            out[w] = {"ms_per_step": profile[w].get("ms_per_step"),
                      "pct": {c: v["pct"] for c, v in cats.items()}}
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=DEMO_EXAMPLES, help="demo data size")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the demo job")
    ap.add_argument("--ref-examples", type=int, default=400_000,
                    help="reference job data size (1 epoch)")
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--checkpoints", action="store_true",
                    help="keep the demo's [checkpoint] section (a save every 100 steps); "
                    "default: no checkpoints, so only training is timed")
    args = ap.parse_args()
    if args.quick:
        args.examples, args.epochs, args.ref_examples = 40_000, 1, 40_000
        args.profile_seconds = 2.0
    wd = workdir()
    log_every = 20 if args.quick else 100
    t0 = time.perf_counter()

    demo = make_data(wd / "demo", args.examples, DEMO_DATA)
    d = wd / "demo"
    jobs = {(p, t): write_job(d, f"demo-{p}x{t}", demo, p, t, args.epochs, log_every=log_every,
                              checkpoints=args.checkpoints)
            for p, t in ((1, 1), (2, 2))}
    # its own job file: with --checkpoints, its own checkpoint_dir (else 1x1 would resume it)
    standalone = run_standalone(write_job(d, "demo-standalone", demo, 1, 1, args.epochs,
                                          log_every=log_every, checkpoints=args.checkpoints), d)
    print(standalone.summary(), flush=True)
    d11, _ = run_distributed("1x1", jobs[1, 1], 1, 1, d)
    print(d11.summary(), flush=True)
    d22, _ = run_distributed("2x2", jobs[2, 2], 2, 2, d)
    print(d22.summary(), flush=True)

    ref = make_data(wd / "ref", args.ref_examples, REF_DATA)
    r = wd / "ref"
    ref_job = write_job(r, "ref-1x2-async", ref, 1, 2, 1, model=REF_MODEL, mode="async",
                        log_every=log_every)
    ref_run, _ = run_distributed("ref 2x1", ref_job, 1, 2, r)
    print(ref_run.summary(), flush=True)

    profiles: list[dict] = []
    if not args.no_profile:
        prof_job = write_job(d, "profile-1x1", demo, 1, 1, 2, log_every=log_every,
                             checkpoints=args.checkpoints)
        prof_run, profiles = run_distributed("profile", prof_job, 1, 1, d,
                                             args.profile_seconds, (0, 1))
        print(prof_run.summary() + " (sampled by py-spy)", flush=True)
        for profile in profiles:
            print_profile(profile)

    missing = GroundTruth(REF_DATA, 0).cat_missing
    result = {
        "standalone_examples_per_s": round(standalone.rate),
        "dist_1x1_examples_per_s": round(d11.rate),
        "dist_2x2_examples_per_s": round(d22.rate),
        "dist_1x1_vs_standalone": round(d11.rate / standalone.rate, 3),
        "dist_2x2_vs_1x1": round(d22.rate / d11.rate, 3),
        "auc": d22.auc,
        "oracle_auc": round(demo["oracle_auc"], 5),
        "auc_vs_oracle": round(d22.auc / demo["oracle_auc"], 4),
        "ref_2x1_async_examples_per_s": round(ref_run.rate),
        "ref_vs_paddle_27000": round(ref_run.rate / 27_000, 3),
        "cpu_last_epoch": {"standalone": standalone.cpu, "dist_1x1": d11.cpu,
                           "dist_2x2": d22.cpu, "ref_2x1_async": ref_run.cpu},
        "last_epoch_examples_per_s": {"standalone": round(standalone.last_epoch_rate),
                                      "dist_1x1": round(d11.last_epoch_rate),
                                      "dist_2x2": round(d22.last_epoch_rate)},
        "auc_standalone": standalone.auc,
        "auc_1x1": d11.auc,
        "standalone_auc_equals_1x1": standalone.aucs == d11.aucs,
        "ref_auc": ref_run.auc,
        "ref_oracle_auc": round(ref["oracle_auc"], 5),
        "ref_missing_field_rate": round(float(missing.mean()), 4),
        "checkpoints": args.checkpoints,
        "examples": args.examples,
        "epochs": args.epochs,
        "ref_examples": args.ref_examples,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "profile_1x1": [compact(p) for p in profiles],
    }
    (wd / "profile.json").write_text(json.dumps(profiles, indent=1))
    print(f"workdir {wd} (profile details in profile.json)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

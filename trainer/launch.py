"""The local launcher: P pservers and T trainers of one job on loopback, one command.

    python -m trainer launch [--config job.toml] [--workdir DIR] [--set K=V ...]

Without --config it runs the built-in demo job (generated data, see
`trainer.demo`). Every child's output is shown line by line, prefixed with its
role and id. When every trainer has finished, the pservers are stopped and the
launcher exits 0. A process that dies is started again (a pserver on the same
port), up to `recovery.max_restarts` times each, when the job has a
[checkpoint] section: the job rolls back to its newest complete checkpoint
and goes on without restarting the others. Otherwise, past that, or on
Ctrl-C, everything is stopped (SIGTERM, then SIGKILL) and the launcher exits
non-zero naming the role. Each child dies with the launcher
(PR_SET_PDEATHSIG), so none is orphaned. `WORKDIR/pids.json` names every
child's pid.

Trainers append their training curves to WORKDIR/curves (unless the job file
sets metrics.curves_dir); when the job ends the launcher plots them to
CURVES_DIR/curves.png if matplotlib is installed. With metrics on, each process
writes its metrics target to WORKDIR/targets (unless metrics.targets_dir is set).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pserver import config as pscfg
from pserver.errors import JOB_FAILED
from trainer.demo import prepare
from trainer.metrics_export import launch_overrides
from trainer.plot import after_launch

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: best effort
        pass


@dataclass
class Child:
    role: str
    proc: subprocess.Popen
    pump: threading.Thread
    args: list[str]
    env: dict[str, str]
    restarts: int = 0


def _pump(role: str, stream, out) -> None:  # noqa: ANN001
    for line in stream:
        out.write(f"{role:>11} | {line}")
        out.flush()


def _spawn(role: str, args: list[str], env: dict[str, str]) -> Child:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            preexec_fn=_die_with_parent, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(role, proc.stdout, sys.stdout), daemon=True)
    pump.start()
    return Child(role, proc, pump, args, env)


def _write_pids(children: list[Child], workdir: Path) -> None:
    tmp = workdir / "pids.json.tmp"
    tmp.write_text(json.dumps({c.role: c.proc.pid for c in children}, indent=1))
    tmp.replace(workdir / "pids.json")


def _restart(child: Child, port: str | None) -> None:
    """Start a dead child again with its arguments (a pserver on the port it had)."""
    child.pump.join(2)
    args = child.args + (["--port", port] if port is not None else [])
    new = _spawn(child.role, args, child.env)
    child.proc, child.pump, child.restarts = new.proc, new.pump, child.restarts + 1


def _stop(children: list[Child], grace: float) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in children:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
    for c in children:
        c.pump.join(2)


class ChildFailed(RuntimeError):
    """A child exited while the job was starting; `code` is its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _wait_ready(children: list[Child], files: list[Path], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    addrs: list[str | None] = [None] * len(files)
    while time.monotonic() < deadline:
        for i, f in enumerate(files):
            if addrs[i] is None and f.exists():
                addrs[i] = f.read_text().strip()
        if all(addrs):
            return [a for a in addrs if a]
        for c in children:
            if c.proc.poll() is not None:
                raise ChildFailed(f"{c.role} exited with code {c.proc.returncode} while "
                                  f"starting", c.proc.returncode)
        time.sleep(0.05)
    raise RuntimeError(f"pservers not ready within {timeout:.0f}s")


def launch(config_path: Path, overrides: list[str], workdir: Path) -> int:
    """Run the job; returns the exit code (0 when every trainer finished)."""
    overrides = [*overrides, *launch_overrides(pscfg.load(config_path, overrides), workdir)]
    job = pscfg.load(config_path, overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    # one run id for every process of this launch and their restarts (the checkpoint lock)
    run_id = job.run_id or f"r{uuid.uuid4().hex[:12]}"
    print(f"launch: job {job.name!r}, run {run_id}", file=sys.stderr)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PSRT_JOB__RUN_ID=run_id)
    base = ["--config", str(config_path), *[x for o in overrides for x in ("--set", o)]]
    children: list[Child] = []
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    signal.signal(signal.SIGTERM, lambda *_: interrupted.set())
    try:
        ready = [workdir / f"pserver{i}.ready" for i in range(job.num_pservers)]
        for f in ready:
            f.unlink(missing_ok=True)
        # pserver 0 hosts the coordinator: the others need its bound address to join
        children.append(_spawn("pserver[0]", ["-m", "pserver", "--id", "0", "--ready-file",
                                              str(ready[0]), *base], env))
        _write_pids(children, workdir)
        first = _wait_ready(children, ready[:1], job.rpc.connect_timeout_s)[0]
        known = "job.pservers=[" + ",".join(f'"{a}"' for a in (first, *job.pservers[1:])) + "]"
        for i in range(1, job.num_pservers):
            children.append(_spawn(f"pserver[{i}]", ["-m", "pserver", "--id", str(i),
                                                     "--ready-file", str(ready[i]), *base,
                                                     "--set", known], env))
        addrs = _wait_ready(children, ready, job.rpc.checkpoint_timeout_s)
        bound = "job.pservers=[" + ",".join(f'"{a}"' for a in addrs) + "]"
        trainers = [_spawn(f"trainer[{j}]", ["-m", "trainer", "--id", str(j), *base,
                                             "--set", bound], env)
                    for j in range(job.num_trainers)]
        children += trainers
        _write_pids(children, workdir)
        ports = {f"pserver[{i}]": a.rpartition(":")[2] for i, a in enumerate(addrs)}
        restarts = job.recovery.max_restarts if job.checkpoint is not None else 0
        return _supervise(children, trainers, interrupted, restarts, ports, workdir)
    finally:
        _stop(children, job.rpc.grace_s)
        print(f"launch: {after_launch(job.metrics.curves_dir)}", file=sys.stderr)


def _supervise(children: list[Child], trainers: list[Child], interrupted: threading.Event,
               max_restarts: int, ports: dict[str, str], workdir: Path) -> int:
    while True:
        if interrupted.is_set():
            print("launch: interrupted; stopping every process", file=sys.stderr)
            return 130
        for c in children:
            code = c.proc.poll()
            if code not in (None, 0) or (code == 0 and c not in trainers):
                # not restarted: 2, bad config or usage; JOB_FAILED, the job has failed
                if c.restarts < max_restarts and code not in (2, JOB_FAILED):
                    print(f"launch: {c.role} exited with code {code}; starting it again "
                          f"({c.restarts + 1} of recovery.max_restarts={max_restarts})",
                          file=sys.stderr)
                    _restart(c, ports.get(c.role))
                    _write_pids(children, workdir)
                    continue
                more = f" {c.restarts} times already" if c.restarts else ""
                print(f"launch: {c.role} exited with code {code}{more and '; restarted' + more}"
                      f"; stopping the job", file=sys.stderr)
                return code or 1
        if all(t.proc.poll() == 0 for t in trainers):
            print("launch: every trainer finished; stopping the pservers", file=sys.stderr)
            return 0
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pscfg.add_job_arguments(p, "job file (TOML); default: the built-in demo job")
    p.add_argument("--workdir", default=None,
                   help="where ready files (and the demo's data and job file) go "
                   "(default: runs/demo for the demo, else next to the job file)")
    args = p.parse_args(argv)
    try:
        if args.config is None:
            workdir = Path(args.workdir or "runs/demo")
            config_path = prepare(workdir)
        else:
            config_path = Path(args.config)
            workdir = Path(args.workdir) if args.workdir else config_path.parent
        pscfg.load(config_path, args.set)  # validate before starting anything
    except pscfg.ConfigError as e:
        print(f"launch: config error: {e}", file=sys.stderr)
        return 2
    try:
        return launch(config_path, args.set, workdir)
    except ChildFailed as e:  # 2: refused (bad config, a checkpoint_dir another run holds)
        print(f"launch: {e}", file=sys.stderr)
        return e.code if e.code in (2, JOB_FAILED) else 1
    except RuntimeError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 1

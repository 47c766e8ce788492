"""Incremental checkpoints end to end (real processes, sync mode): a job saving deltas ends
bit-identical to one saving full checkpoints, also when killed in the middle of a delta."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt import reader
from ckpt.local import LocalStorage
from tests.e2e.jobs import (
    assert_identical,
    final_state,
    full_disk,
    launch,
    pid_of,
    run_to_end,
    slow_saves,
    without_faults,
    write_job,
)
from tests.helpers import python_env


def ckpt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt", *args], env=python_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("background", [False, True])
def test_deltas_end_bit_identical_to_full_checkpoints(data_dir: Path, tmp_path: Path,
                                                      reference: dict,
                                                      background: bool) -> None:
    ckdir = tmp_path / "ckpt"
    run_to_end(write_job(data_dir, tmp_path, ckdir, full_every=3, background=background))
    assert_identical(final_state(ckdir), reference)  # reference: full_every = 1
    entries = [e for e in reader.entries(LocalStorage(ckdir)) if e.manifest]
    kinds = {e.serial: (e.manifest.kind, e.manifest.base) for e in entries}
    assert any(kind == "delta" for kind, _ in kinds.values()), kinds
    for kind, base in kinds.values():  # rotation kept every base a delta needs
        if kind == "delta":
            assert base in kinds, kinds
    ls = ckpt_cli("ls", str(ckdir))
    assert ls.returncode == 0
    delta_serial, (_, base) = next((s, kb) for s, kb in kinds.items() if kb[0] == "delta")
    assert re.search(rf"^\s*{delta_serial}\s.*complete\s+delta\s+{base}\s", ls.stdout, re.M), \
        ls.stdout
    v = ckpt_cli("verify", str(ckdir))
    assert v.returncode == 0 and "a delta restored as" in v.stdout, v.stdout
    show = ckpt_cli("show", str(ckdir), str(delta_serial))
    assert f"a delta of checkpoint_{base}" in show.stdout and "changed rows per shard" in \
        show.stdout


@pytest.mark.parametrize("heal", [True, False])
def test_sigkill_in_the_middle_of_a_delta_save_restores_bit_identical(
        data_dir: Path, tmp_path: Path, reference: dict, heal: bool) -> None:
    """heal: the launcher starts pserver 1 again and the job rolls back in place to the
    chain; else the job stops and running it again restores the chain."""
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, full_every=3,
                    recovery=None if heal else {"max_restarts": 0}, faults=slow_saves(3))
    p = launch(job)
    target = re.compile(r"writing checkpoint_(\d+) \(delta of checkpoint_(\d+)\)")
    for line in p.stdout:
        m = target.search(line)
        if m and int(m.group(1)) >= 2:  # the second delta of a chain: 0 <- 1 <- 2
            break
    else:
        pytest.fail("the job ended before the kill")
    serial = int(m.group(1))
    os.kill(pid_of(job, "pserver", 1), signal.SIGKILL)
    out, _ = p.communicate(timeout=240)
    if heal:
        assert p.returncode == 0, out
        assert "rolled back from global step" in out
    else:
        assert p.returncode != 0
        out = run_to_end(job, env=without_faults(python_env()))
    # the torn delta was skipped; every pserver loaded the chain
    assert out.count(f"restored checkpoint_{serial - 1} (chain ") >= 2, out[-3000:]
    assert_identical(final_state(ckdir), reference)


def _standalone(job: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "trainer", "--standalone", "--config", str(job)],
                       cwd=job.parent, env=env or python_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_a_delta_after_a_failed_save_holds_its_rows(data_dir: Path, tmp_path: Path) -> None:
    """Saves after steps 0, 4, 8 (serial 2, a delta of 1: fails), 12 (a delta of 1 again:
    it must hold the rows of serial 2 too), 16 and 20 (final)."""
    ref = tmp_path / "ref"
    _standalone(write_job(data_dir, ref, ref / "ckpt", 1, 1, epochs=1))
    ckdir = tmp_path / "inc" / "ckpt"
    job = write_job(data_dir, tmp_path / "inc", ckdir, 1, 1, epochs=1, full_every=3,
                    max_num_checkpoints=100, faults=full_disk(2))
    r = _standalone(job)
    assert "checkpoint_2 failed and was not committed" in r.stderr
    m3 = reader.load_manifest(LocalStorage(ckdir), 3)
    assert (m3.kind, m3.base) == ("delta", 1)
    assert_identical(final_state(ckdir), final_state(ref / "ckpt"))
    for serial in (4, 5):  # as if the job had died after serial 3: restore 0 <- 1 <- 3
        shutil.rmtree(ckdir / f"checkpoint_{serial}")
    r = _standalone(job)
    assert "restored checkpoint_3 (chain 0 -> 1 -> 3)" in r.stderr
    assert_identical(final_state(ckdir), final_state(ref / "ckpt"))


def test_a_delta_chain_restores_onto_another_number_of_pservers(data_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A job saving deltas on 2 pservers, continued on 3 and on 2 from its chain: both end
    bit-identical (each of the 3 read only its virtual shards of every link)."""
    first = tmp_path / "first"
    run_to_end(write_job(data_dir, first, first / "ckpt", num_pservers=2, epochs=1,
                         full_every=5))  # saves after steps 0, 4, 8 and 10: full, 3 deltas
    newest = reader.newest_complete(LocalStorage(first / "ckpt"))
    assert newest.kind == "delta"
    finals = {}
    for p in (2, 3):
        work = tmp_path / f"on{p}"
        shutil.copytree(first / "ckpt", work / "ckpt")
        out = run_to_end(write_job(data_dir, work, work / "ckpt", num_pservers=p, epochs=2,
                                   full_every=3))
        assert out.count(f"restored checkpoint_{newest.serial} (chain ") == p, out[-3000:]
        finals[p] = final_state(work / "ckpt")
    assert_identical(finals[2], finals[3])

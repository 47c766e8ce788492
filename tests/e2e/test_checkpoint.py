"""Checkpoints end to end: layout, trigger, restore after SIGKILL, damage, rotation, lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from ckpt import layout, reader
from ckpt.local import LocalStorage
from tests.e2e.jobs import (
    Running,
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


def test_layout_and_counters_match_the_guide(data_dir: Path, tmp_path: Path,
                                             reference: dict) -> None:
    ckdir = tmp_path / "ckpt"
    run_to_end(write_job(data_dir, tmp_path, ckdir))
    storage = LocalStorage(ckdir)
    serials = [layout.parse_serial(n) for n in os.listdir(ckdir)]
    complete = sorted(s for s in serials if s is not None)
    assert len(complete) == 3  # max_num_checkpoints
    newest = ckdir / layout.checkpoint_name(complete[-1])
    names = {p.relative_to(newest).as_posix() for p in newest.rglob("*")}
    for expected in ("__lockup_table__/table_pserver_0", "__lockup_table__/table_pserver_1",
                     "__model__/var.mlp_w0", "__model__/var.bias", "trainer_0/epoch_id",
                     "trainer_0/step_id", "trainer_0/reader_state", "trainer_1/step_id",
                     "MANIFEST.json", "_SUCCESS", "__lockup_table__/table_pserver_1/emb_0.ids",
                     "__lockup_table__/table_pserver_0/wide.accum"):
        assert expected in names, expected
    m = reader.load_manifest(storage, complete[-1])
    steps = m.trainers["0"]["step_id"]
    assert (newest / "trainer_1" / "step_id").read_text() == f"{steps}\n"
    assert (newest / "trainer_0" / "epoch_id").read_text() == "1\n"
    values = np.load(newest / "__model__" / "var.mlp_w0", allow_pickle=False)
    assert values.shape == (4 * 26 + 13, 8)
    assert_identical(final_state(ckdir), reference)  # and runs are reproducible


def test_background_saves_end_like_blocking_ones(data_dir: Path, tmp_path: Path,
                                                  reference: dict) -> None:
    ckdir = tmp_path / "ckpt"
    # writes outlast a few steps: some triggers skip
    out = run_to_end(write_job(data_dir, tmp_path, ckdir, background=True,
                               faults=slow_saves(0.3)))
    assert "copied; committing in the background" in out
    assert "still being written; skipping the save" in out
    assert_identical(final_state(ckdir), reference)
    v = subprocess.run([sys.executable, "-m", "ckpt", "verify", str(ckdir)], env=python_env(),
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stdout


def test_trigger_saves_exactly_the_guides_steps(data_dir: Path, tmp_path: Path) -> None:
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, num_pservers=1, num_trainers=1, epochs=4,
                    epoch_interval=2, step_interval=10, max_num_checkpoints=100)
    r = subprocess.run([sys.executable, "-m", "trainer", "--standalone", "--config", str(job)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    storage = LocalStorage(ckdir)
    saved = [(e.manifest.trainers["0"]["epoch_id"], e.manifest.trainers["0"]["step_id"],
              e.manifest.final) for e in reader.entries(storage) if e.manifest]
    # 2700 training examples, batch 128: 21 steps per epoch (0..20); epochs 0..3
    expected = [(e, s, False) for e in (0, 2) for s in (0, 10, 20)] + [(3, 20, True)]
    assert saved == expected


@pytest.mark.parametrize("role,ident,moment,background,heal", [
    ("pserver", 0, "step", False, True), ("pserver", 1, "step", False, True),
    ("trainer", 0, "step", False, True), ("trainer", 1, "step", False, True),
    ("pserver", 1, "save", False, True), ("trainer", 0, "save", False, True),
    ("pserver", 1, "save", True, True), ("trainer", 1, "step", True, True),
    ("pserver", 1, "step", False, False), ("trainer", 0, "save", False, False),
])
def test_sigkill_ends_bit_identical(data_dir: Path, tmp_path: Path, reference: dict, role: str,
                                    ident: int, moment: str, background: bool,
                                    heal: bool) -> None:
    """heal: the launcher starts the killed process again and the job rolls back by itself,
    the other processes untouched; else (recovery.max_restarts=0) the launcher stops the
    job and running it again resumes it."""
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, background=background,
                    recovery=None if heal else {"max_restarts": 0},
                    faults=slow_saves(3) if moment == "save" else [])
    rng = np.random.default_rng(zlib.crc32(f"{role}{ident}{moment}{background}".encode()))
    if moment == "save":
        target = re.compile(r"writing checkpoint_(\d+)")
        # the serial to die in the middle of (background: later triggers are skipped while
        # serial 0 is written, so serial 1 is the final checkpoint)
        at = 1 if background else int(rng.integers(2, 4))
    else:
        target = re.compile(r"trainer\[0\] epoch (\d+) step (\d+)/")
        at = int(rng.integers(3, 19))  # a global step to die at (of 20)
    p = launch(job)
    seen = 0
    for line in p.stdout:
        m = target.search(line)
        if m and moment == "save" and int(m.group(1)) == at:
            break
        if m and moment == "step":
            seen += 1
            if seen == at:
                break
    else:
        pytest.fail("the job ended before the kill")
    kind = "pserver" if role == "pserver" else "trainer"
    others = [(r, i) for r in ("pserver", "trainer") for i in (0, 1) if (r, i) != (kind, ident)]
    os.kill(pid_of(job, kind, ident), signal.SIGKILL)
    if heal:
        rest, _ = p.communicate(timeout=240)
        assert p.returncode == 0, rest
        assert f"launch: {kind}[{ident}] exited with code -9; starting it again" in rest
        assert "rolled back from global step" in rest
        if (kind, ident) != ("pserver", 0):  # else the coordinator restarted with the process
            assert "rolling the job back" in rest
        for r, i in others:  # nobody else was restarted
            assert f"{r}[{i}] exited" not in rest
        out = rest
    else:
        p.communicate(timeout=120)
        assert p.returncode != 0
        # restart the whole job: it resumes and runs to the end
        out = run_to_end(job, env=without_faults(python_env()))
        assert "restored checkpoint_" in out
    assert_identical(final_state(ckdir), reference)
    if moment == "save":  # the torn checkpoint was never restored
        assert f"restored checkpoint_{at}" not in out


def _corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_damaged_and_torn_checkpoints_are_skipped(data_dir: Path, tmp_path: Path) -> None:
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, num_pservers=1, num_trainers=1, epochs=1)
    run = [sys.executable, "-m", "trainer", "--standalone", "--config", str(job)]
    assert subprocess.run(run, cwd=tmp_path, env=python_env(), capture_output=True,
                          timeout=300).returncode == 0
    storage = LocalStorage(ckdir)
    good = [e.serial for e in reader.entries(storage) if e.problem is None]
    newest = good[-1]
    _corrupt(ckdir / layout.checkpoint_name(newest) / "__lockup_table__" / "table_pserver_0"
             / "emb_0.values")
    v = subprocess.run([sys.executable, "-m", "ckpt", "verify", str(ckdir), str(newest)],
                       env=python_env(), capture_output=True, text=True)
    assert v.returncode == 1 and "emb_0.values: checksum" in v.stdout
    torn = ckdir / layout.checkpoint_name(newest + 1)
    shutil.copytree(ckdir / layout.checkpoint_name(good[-2]), torn)
    (torn / "_SUCCESS").unlink()
    r = subprocess.run(run, cwd=tmp_path, env=python_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"skipping checkpoint_{newest + 1}" in r.stderr and "no _SUCCESS" in r.stderr
    assert f"skipping checkpoint_{newest}" in r.stderr and "checksum" in r.stderr
    assert f"restored checkpoint_{good[-2]}" in r.stderr


def _standalone(job: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "--standalone", "--config", str(job),
                           *extra], cwd=job.parent, env=python_env(), capture_output=True,
                          text=True, timeout=300)


def test_resume_from_serial_0_skips_exactly_what_it_saved(data_dir: Path,
                                                          tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    job = write_job(data_dir, whole, whole / "ckpt", 1, 1, epochs=1, step_interval=1000)
    assert _standalone(job).returncode == 0
    resumed = tmp_path / "resumed"
    job = write_job(data_dir, resumed, resumed / "ckpt", 1, 1, epochs=1, step_interval=1000)
    assert _standalone(job).returncode == 0
    assert sorted(os.listdir(resumed / "ckpt")) == ["_LOCK", "checkpoint_0", "checkpoint_1"]
    shutil.rmtree(resumed / "ckpt" / "checkpoint_1")  # as if it crashed after serial 0
    r = _standalone(job)
    assert r.returncode == 0 and "restored checkpoint_0: epoch 0, step 0" in r.stderr
    assert_identical(final_state(resumed / "ckpt"), final_state(whole / "ckpt"))


def test_a_second_job_is_refused_naming_the_holder(data_dir: Path, tmp_path: Path) -> None:
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path / "a", ckdir, 1, 1, epochs=1)
    assert _standalone(job).returncode == 0
    other = write_job(data_dir, tmp_path / "b", ckdir, 1, 1, epochs=1)
    r = _standalone(other, "--set", 'job.name="other"')
    assert r.returncode == 2
    assert "is used by job 'demo' (run " in r.stderr and "host" in r.stderr and "pid" in r.stderr
    assert "python -m ckpt unlock" in r.stderr
    # pservers refuse it the same way
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(other),
                        "--set", 'job.name="other"', "--port", "0"], env=python_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "checkpoint.checkpoint_dir:" in r.stderr
    assert "job 'demo'" in r.stderr
    # the same job again takes the lock back and resumes
    r = _standalone(job)
    assert r.returncode == 0 and "restored checkpoint_" in r.stderr


def test_ckpt_cli_lists_and_shows(data_dir: Path, tmp_path: Path) -> None:
    ckdir = tmp_path / "ckpt"
    assert _standalone(write_job(data_dir, tmp_path, ckdir, 1, 1, epochs=1)).returncode == 0
    (ckdir / "notes.txt").write_text("mine")

    def ckpt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ckpt", *args], env=python_env(),
                              capture_output=True, text=True, timeout=60)

    ls = ckpt("ls", str(ckdir))
    assert ls.returncode == 0 and "complete" in ls.stdout and "final" in ls.stdout
    newest = reader.newest_complete(LocalStorage(ckdir)).serial
    show = ckpt("show", str(ckdir), str(newest))
    assert show.returncode == 0
    assert "emb_0: dim 4, adagrad (state: accum), rows per shard [" in show.stdout
    assert "mlp_w0: shape [117, 8], adam" in show.stdout
    assert ckpt("verify", str(ckdir)).returncode == 0
    assert ckpt("ls", str(tmp_path / "nothing")).returncode == 2
    unlock = ckpt("unlock", str(ckdir))
    assert unlock.returncode == 0 and "removed the lock of job 'demo'" in unlock.stdout


@pytest.mark.parametrize("before,after", [(2, 3), (3, 1), (1, 4)])
def test_restore_onto_a_different_number_of_pservers(data_dir: Path, tmp_path: Path,
                                                     before: int, after: int) -> None:
    """A checkpoint of P pservers restores onto P' (each reading only its virtual shards),
    and the job continued on P' ends bit-identical to the same job continued on P."""
    first = tmp_path / "first"
    run_to_end(write_job(data_dir, first, first / "ckpt", num_pservers=before, epochs=1))
    finals = {}
    for p in (before, after):
        work = tmp_path / f"on{p}"
        shutil.copytree(first / "ckpt", work / "ckpt")
        out = run_to_end(write_job(data_dir, work, work / "ckpt", num_pservers=p, epochs=2))
        assert out.count("restored checkpoint_") >= p  # every pserver restored its part
        finals[p] = final_state(work / "ckpt")
        manifest = reader.newest_complete(LocalStorage(work / "ckpt"))
        assert manifest.num_pservers == p
    assert_identical(finals[before], finals[after])


def test_a_save_that_hits_a_full_disk_fails_cleanly_and_training_goes_on(
        data_dir: Path, tmp_path: Path) -> None:
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, 1, 1, epochs=1, max_num_checkpoints=100,
                    faults=full_disk(2))
    r = subprocess.run([sys.executable, "-m", "trainer", "--standalone", "--config", str(job)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "checkpoint_2 failed and was not committed: pserver[0]:" in r.stderr
    assert "No space left on device" in r.stderr and "training goes on" in r.stderr
    # 21 steps, saves after steps 0, 4, 8 (serial 2: failed), 12, 16 and 20 (final)
    entries = reader.entries(LocalStorage(ckdir))
    assert [e.serial for e in entries] == [0, 1, 3, 4, 5]  # the torn serial 2 was removed
    assert reader.newest_complete(LocalStorage(ckdir)).final  # the next triggers saved
    v = subprocess.run([sys.executable, "-m", "ckpt", "verify", str(ckdir)],
                       env=python_env(), capture_output=True, text=True)
    assert v.returncode == 0, v.stdout


def test_a_failed_final_checkpoint_fails_the_job(data_dir: Path, tmp_path: Path) -> None:
    """The job's result is not saved: the trainers and the launcher exit 3 naming why (the
    same 21 steps as above: serial 5 is the final checkpoint)."""
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, 1, 1, epochs=1, max_num_checkpoints=100,
                    faults=full_disk(5))
    r = _standalone(job)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "the final checkpoint: checkpoint_5 failed and was not committed: pserver[0]:" \
        in r.stderr and "No space left on device" in r.stderr
    assert "(1 in a row since checkpoint_4)" in r.stderr
    shutil.rmtree(ckdir)
    p = launch(job)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 3, out[-3000:]
    assert "trainer[0] failed: the final checkpoint: " in out
    assert "checkpoint_5 failed and was not committed: pserver[0]: [Errno 28]" in out
    assert "launch: trainer[0] exited with code 3; stopping the job" in out


def test_a_second_launch_is_refused_while_the_first_runs(data_dir: Path, tmp_path: Path) -> None:
    """Two launches of one job file are two runs: the second is refused (exit 2, naming the
    holder and its lease) and writes nothing; once the first is killed, the next resumes."""
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, epochs=1, faults=slow_saves(1.0))
    with Running(job) as first:
        first.until_committed(ckdir, 0)
        held = json.loads((ckdir / layout.LOCK).read_text())
        before = sorted(os.listdir(ckdir))
        second = subprocess.run([sys.executable, "-m", "trainer", "launch", "--config",
                                 str(job), "--workdir", str(tmp_path / "second")],
                                env=python_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        said = second.stdout + second.stderr  # the pserver's words come through stdout
        assert f"held by job 'demo' (run {held['run']}" in said
        assert "lease renewed" in said and "another run of this job" in said
        assert json.loads((ckdir / layout.LOCK).read_text())["token"] == held["token"]
        assert "trainer[" not in second.stdout  # no trainer was started
        os.kill(pid_of(job, "pserver", 0), signal.SIGKILL)  # the first run crashes
    assert set(before) <= set(os.listdir(ckdir)) | {"_LOCK"}
    out = run_to_end(job, env=without_faults(python_env()))  # a third run takes it over
    assert "restored checkpoint_" in out


def test_saves_ten_times_slower_than_the_rpc_deadline_commit(data_dir: Path,
                                                              tmp_path: Path) -> None:
    """Every step of a save waits under rpc.checkpoint_timeout_s, not rpc.deadline_s: with
    pserver 0's part taking 10x the ordinary deadline, every checkpoint commits."""
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, 1, 1, epochs=1, step_interval=1000,
                    faults=slow_saves(5.0))
    out = run_to_end(job, env={**python_env(), "PSRT_RPC__DEADLINE_S": "0.5"})
    assert "not committed" not in out and "DeadlineExceeded" not in out
    storage = LocalStorage(ckdir)
    assert [e.serial for e in reader.entries(storage) if e.complete] == [0, 1]
    assert reader.newest_complete(storage).final


def test_a_damaged_shard_found_in_a_rollback_rolls_the_whole_job_back(
        data_dir: Path, tmp_path: Path, reference: dict) -> None:
    """Checksums are checked while the shards load, at a rollback too: checkpoint_1 is
    damaged right after its commit and a trainer is killed; pserver 1 finds its file
    damaged while restoring it, and every process falls back together to checkpoint_0.
    The job then ends bit-identical to one never interrupted."""
    ckdir = tmp_path / "ckpt"
    job = write_job(data_dir, tmp_path, ckdir, faults=slow_saves(1.0))
    damaged = "checkpoint_1/__lockup_table__/table_pserver_1/emb_0.values"
    with Running(job) as run:
        run.until_committed(ckdir, 1)
        _corrupt(ckdir / damaged)
        os.kill(pid_of(job, "trainer", 1), signal.SIGKILL)  # the job rolls back
        run.proc.wait(300)
    out = run.output
    assert run.proc.returncode == 0, out[-3000:]
    assert f"pserver[1] cannot restore checkpoint_1: {damaged}: checksum xxh3" in out
    assert "skipping checkpoint_1" in out and "restored checkpoint_0" in out
    assert_identical(final_state(ckdir), reference)


def test_a_store_lost_for_longer_than_rejoin_timeout_fails_the_job_and_keeps_its_work(
        data_dir: Path, tmp_path: Path) -> None:
    """checkpoint_dir vanishes (moved away, as a lost mount) and a trainer is killed: the
    rollback restores the newest known checkpoint, never nothing; the pservers cannot load
    it and the job fails (exit 3) after recovery.rejoin_timeout_s. Nothing is written where
    the directory was; once it is back, the next run resumes from it."""
    ckdir, away = tmp_path / "ckpt", tmp_path / "away"
    job = write_job(data_dir, tmp_path, ckdir, 1, 1, faults=slow_saves(0.5),
                    recovery={"rejoin_timeout_s": 3.0})
    with Running(job) as run:
        run.until_committed(ckdir, 1)
        ckdir.rename(away)
        os.kill(pid_of(job, "trainer", 0), signal.SIGKILL)  # the job rolls back
        run.proc.wait(120)
    out = run.output
    assert run.proc.returncode == 3, out[-3000:]
    assert "looks unreachable" in out and "restores checkpoint_" in out
    assert "could not rejoin the job within 3s" in out
    assert "restores nothing" not in out
    assert not ckdir.exists()  # not made again
    newest = reader.newest_complete(LocalStorage(away)).serial
    away.rename(ckdir)
    resumed = run_to_end(job, env=without_faults(python_env()))
    assert f"restored checkpoint_{newest}" in resumed

"""Checkpoints on S3 with real processes: `python -m ckpt` on an s3:// URL, and jobs whose
checkpoints go to S3 (moto's server in this process, the `endpoint` fixture of
tests/conftest.py), killed and resumed or saving in the background."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt import layout, lock, reader
from ckpt.__main__ import main as ckpt_main
from ckpt.backends import open_storage
from ckpt.local import LocalStorage
from tests.e2e.jobs import (
    assert_identical,
    final_state,
    launch,
    pid_of,
    slow_saves,
    without_faults,
    write_job,
)
from tests.helpers import python_env
from tests.s3 import CREDS, options, save

pytest.importorskip("s3fs")  # without them the module skips
pytest.importorskip("moto.server")


# ---- the CLI and a real job on S3 -------------------------------------------------------

def s3_env(endpoint: str) -> dict[str, str]:
    """Credentials and endpoint for child processes, the way users give them."""
    return {**python_env(), **CREDS, "FSSPEC_S3_ENDPOINT_URL": endpoint}


def ckpt_cli(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt", *args], env=s3_env(endpoint),
                          capture_output=True, text=True, timeout=60)


def test_ckpt_cli_on_an_s3_url(endpoint: str, bucket: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{bucket}/ck"
    storage = open_storage(url, options(endpoint))
    save(storage, 0)
    save(storage, 1, 1)
    # a child process, credentials and endpoint from the environment
    ls = ckpt_cli(endpoint, "ls", url)
    assert ls.returncode == 0, ls.stderr
    assert re.search(r"^\s+0 .* complete", ls.stdout, re.M)
    assert re.search(r"^\s+1 .* complete", ls.stdout, re.M)
    ok = ckpt_cli(endpoint, "verify", url)
    assert ok.returncode == 0 and "checkpoint_1: ok" in ok.stdout, ok.stdout + ok.stderr
    # in this process, with -o storage options
    opts = [a for k, v in options(endpoint).items() for a in ("-o", f"{k}={v}")]
    rel = f"checkpoint_1/{layout.table_file(0, 't', 'values')}"
    raw = bytearray(storage.read_bytes(rel))
    raw[-1] ^= 0x40
    storage.replace(rel, bytes(raw))
    capsys.readouterr()
    assert ckpt_main([*opts, "verify", url]) == 1
    assert "checkpoint_1: DAMAGED" in capsys.readouterr().out
    lock.acquire(storage, "held")
    assert ckpt_main([*opts, "unlock", url]) == 0
    assert "removed the lock of job 'held'" in capsys.readouterr().out
    assert lock.holder(storage) is None
    assert ckpt_main([*opts, "ls", "s3://no-such-bucket/ck"]) == 2
    assert "s3://no-such-bucket/ck bucket 'no-such-bucket' does not exist" in \
        capsys.readouterr().err
    assert ckpt_main(["ls", "nosuch://b/ck"]) == 2
    assert "nosuch://b/ck" in capsys.readouterr().err
    assert ckpt_main(["-o", "novalue", "ls", url]) == 2
    assert "-o: expected KEY=VALUE, got 'novalue'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final parameters of the job, never interrupted, checkpointing to a local dir."""
    work = tmp_path_factory.mktemp("local")
    p = launch(write_job(data_dir, work, work / "ckpt", epochs=1))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return final_state(LocalStorage(work / "ckpt"))


@pytest.mark.parametrize("heal", [False, True])
def test_a_job_on_s3_survives_sigkill_and_ends_bit_identical(
        data_dir: Path, tmp_path: Path, endpoint: str, bucket: str, local_reference: dict,
        heal: bool) -> None:
    """2 pservers, 2 trainers, sync: pserver 1 is killed in the middle of writing a
    checkpoint to S3. heal: the launcher starts it again and it rolls back from S3; else
    the job stops and, run again, restores from S3. Either way the torn checkpoint is
    skipped and the job ends as the uninterrupted one that checkpointed locally."""
    url = f"s3://{bucket}/jobs/demo"
    job = write_job(data_dir, tmp_path / "s3", url, epochs=1,  # type: ignore[arg-type]
                    storage_options={"endpoint_url": endpoint},
                    recovery=None if heal else {"max_restarts": 0}, faults=slow_saves(2))
    p = launch(job, env={**python_env(), **CREDS})
    at = 2
    for line in p.stdout:
        m = re.search(r"writing checkpoint_(\d+)", line)
        if m and int(m.group(1)) == at:
            break
    else:
        pytest.fail("the job ended before the kill")
    os.kill(pid_of(job, "pserver", 1), signal.SIGKILL)
    storage = open_storage(url, options(endpoint))
    if heal:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
        assert "launch: pserver[1] exited with code -9; starting it again" in out
        assert "rolled back from global step" in out
    else:
        p.communicate(timeout=120)
        assert p.returncode != 0
        torn = [e for e in reader.entries(storage) if e.serial == at]
        assert torn and not torn[0].complete  # on S3, parts of it, without _SUCCESS
        p = launch(job, env=without_faults({**python_env(), **CREDS}))
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert f"restored checkpoint_{at - 1}" in out and f"restored checkpoint_{at}" not in out
    assert_identical(final_state(storage), local_reference)
    entries = reader.entries(storage)
    assert len(entries) == 3  # rotation on S3 keeps max_num_checkpoints ...
    assert all(e.problem is None for e in entries)  # ... and the torn leftover is gone
    if heal:
        return
    # a second job on the same S3 directory is refused, naming the holder
    other = write_job(data_dir, tmp_path / "other", url, epochs=1,  # type: ignore[arg-type]
                      storage_options={"endpoint_url": endpoint})
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(other),
                        "--set", 'job.name="other"', "--port", "0"], env=s3_env(endpoint),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "checkpoint.checkpoint_dir:" in r.stderr, r.stderr
    assert f"{url} is used by job 'demo' (run " in r.stderr and "host " in r.stderr


def test_background_saves_to_s3_end_like_local_ones(data_dir: Path, tmp_path: Path,
                                                     endpoint: str, bucket: str) -> None:
    """A stand-alone trainer whose background saves go to S3 from the writer thread ends
    with the same parameters as one saving blocking to a local directory."""
    def standalone(job: Path, env: dict) -> str:
        r = subprocess.run([sys.executable, "-m", "trainer", "--standalone", "--config",
                            str(job)], cwd=job.parent, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stderr

    local = tmp_path / "local" / "ckpt"
    standalone(write_job(data_dir, tmp_path / "local", local, 1, 1, epochs=1), python_env())
    url = f"s3://{bucket}/standalone"
    job = write_job(data_dir, tmp_path / "s3", url, 1, 1, epochs=1,  # type: ignore[arg-type]
                    background=True)
    out = standalone(job, s3_env(endpoint))  # endpoint from FSSPEC_S3_ENDPOINT_URL
    assert "copied; committing in the background" in out
    storage = open_storage(url, options(endpoint))
    assert_identical(final_state(storage), final_state(LocalStorage(local)))

"""The job file refuses what does not fit, naming the key: [recovery], [metrics], the [rpc]
security keys, [checkpoint] locations, and `python -m pserver health`'s config errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pserver import config as cfg
from pserver.__main__ import main
from pserver.config import build as build_job
from pserver.tables.dense import DenseVariable
from pserver.tables.sparse import SparseTable
from tests.helpers import job


@pytest.mark.parametrize("recovery,message", [
    ({"heartbeat_s": 0}, "recovery.heartbeat_s: must be > 0"),
    ({"liveness_timeout_s": 1.0}, "recovery.liveness_timeout_s: must be over twice"),
    ({"rejoin_timeout_s": -1}, "recovery.rejoin_timeout_s: must be > 0"),
    ({"max_restarts": -1}, "recovery.max_restarts: must be >= 0"),
    ({"max_restarts": "many"}, "recovery.max_restarts: expected int"),
    ({"heartbeats": 1}, "recovery.heartbeats: unknown key"),
])
def test_bad_recovery_keys_are_refused_naming_them(recovery: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        job(1, recovery=recovery)


@pytest.mark.parametrize("section,key,problem", [
    ({"port": -2}, "metrics.port", "must be >= -1, got -2"),
    ({"port": "9100"}, "metrics.port", "expected int, got str '9100'"),
    ({"port": True}, "metrics.port", "expected int, got bool True"),
    ({"port": 65530}, "metrics.port", "65530 + P + T - 1 = 65536 is over 65535"),
    ({"host": " "}, "metrics.host", "must not be empty"),
    ({"targets_dir": 3}, "metrics.targets_dir", "expected str, got int 3"),
    ({"interval": 5}, "metrics.interval", "unknown key (known: port, host, targets_dir, "
                                          "curves_dir)"),
])
def test_bad_metrics_config_is_rejected_naming_the_key(section: dict, key: str,
                                                       problem: str) -> None:
    raw = {"job": {"pservers": ["127.0.0.1:1", "127.0.0.1:2"], "num_trainers": 5},
           "metrics": section}
    with pytest.raises(cfg.ConfigError) as e:
        cfg.build(raw)
    assert e.value.key == key and str(e.value) == f"{key}: {problem}"


@pytest.mark.parametrize("keys,error", [
    ({"tls_cert": "a.pem"}, "rpc.tls_cert: is set but rpc.tls is 'off'"),
    ({"tls_server_name": "x"}, "rpc.tls_server_name: is set but rpc.tls is 'off'"),
    ({"tls": "tls", "tls_cert": "a.pem"}, "rpc.tls_key: required because rpc.tls_cert is set"),
    ({"tls": "tls", "tls_key": "a.key"}, "rpc.tls_cert: required because rpc.tls_key is set"),
    ({"tls": "mtls", "tls_cert": "a.pem", "tls_key": "a.key"}, "rpc.tls_ca: required when "
     "rpc.tls is 'mtls'"),
    ({"tls": "tls", "tls_cert": "a", "tls_key": "b", "tls_client_cert": "c"},
     "rpc.tls_client_cert: only used when rpc.tls is 'mtls', got 'tls'"),
    ({"tls": "mtls", "tls_cert": "a", "tls_key": "b", "tls_ca": "c", "tls_client_key": "d"},
     "rpc.tls_client_cert: required because rpc.tls_client_key is set"),
    ({"tls": "ssl"}, "rpc.tls: must be one of off, tls, mtls; got 'ssl'"),
    ({"token_file": 7}, "rpc.token_file: expected str, got int 7"),
])
def test_keys_that_do_not_fit_together_are_named(keys: dict, error: str) -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.build({"rpc": keys})
    assert str(e.value).startswith(error), e.value


@pytest.mark.parametrize("section,match", [
    ({"checkpoint_dir": "nosuch://b/ck"}, r"checkpoint_dir: unknown protocol 'nosuch' in "
                                          r"'nosuch://b/ck' \(fsspec knows \d+, e.g. s3, gs"),
    ({"checkpoint_dir": "s3://"}, r"checkpoint_dir: expected s3://BUCKET/PATH .*got 's3://'"),
    ({"checkpoint_dir": "file://rel"}, r"checkpoint_dir: a file:// URL needs an absolute path"),
    ({"checkpoint_dir": "ck", "storage_options": {"key": "k"}},
     r"storage_options: only for a URL checkpoint_dir, and 'ck' is a local path"),
    ({"checkpoint_dir": "s3://b/ck", "storage_options": "key=k"},
     r"storage_options: expected a table of keys \(passed to fsspec\), got str"),
])
def test_bad_locations_are_refused_naming_the_key(section: dict, match: str) -> None:
    with pytest.raises(ValueError, match="^checkpoint." + match):
        build_job({"checkpoint": section})


@pytest.mark.parametrize("args, expected", [
    (["--id", "2"], "--id: pserver id 2 is out of range 0..0"),
    (["--id", "0", "--set", "job.mode=lazy"], "job.mode"),
])
def test_health_config_errors_exit_2_naming_the_key(
        args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pserver health: config error: ") and expected in err


def test_specs_made_in_code_are_seeded_and_a_job_file_derives_the_seed() -> None:
    """A TableSpec or DenseSpec built in code has seed 0 (its rows and values are the same
    run after run); a job file without a seed derives one from job.seed and the name."""
    assert cfg.TableSpec("t", 4).seed == 0 and cfg.DenseSpec("d", (2, 2)).seed == 0
    ids = np.arange(3, dtype=np.uint64)
    assert (SparseTable(cfg.TableSpec("t", 4)).pull(ids) ==
            SparseTable(cfg.TableSpec("t", 4, seed=0)).pull(ids)).all()
    assert (DenseVariable(cfg.DenseSpec("d", (2, 2))).pull() ==
            DenseVariable(cfg.DenseSpec("d", (2, 2))).pull()).all()
    built = build_job({"job": {"seed": 3}, "tables": {"a": {"dim": 4}, "b": {"dim": 4,
                                                                          "seed": 0}}})
    assert [t.seed for t in built.tables] == [cfg.name_seed(3, "a"), 0]


@pytest.mark.parametrize("doc,message", [
    # two bad keys: the first in the section's order is named
    ({"tables": {"emb": {"dim": "x", "learning_rate": 0}}}, "tables.emb.dim: expected int"),
    ({"tables": {"emb": {"dim": 8, "init_scale": "x", "beta1": 2.0}}},
     "tables.emb.init_scale: expected float"),
    ({"checkpoint": {"background": 1, "full_every": 0}},
     "checkpoint.full_every: expected an integer >= 1, got 0"),
    # the trainer's sections are tables too
    ({"trainer": 5}, "trainer: expected a table of keys, got 5"),
    ({"model": [1]}, "model: expected a table of keys, got [1]"),
])
def test_the_first_bad_key_is_named(doc: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match="^" + re.escape(message)):
        build_job(doc)


@pytest.mark.parametrize("raw,message", [
    ({"job": {"run_id": "two words"}}, "job.run_id: expected up to 128 letters, digits or "
                                       "-_.:, got 'two words'"),
    ({"job": {"run_id": "r" * 129}}, "job.run_id: expected up to 128"),
    ({"job": {"run_id": 42}}, "job.run_id: expected str"),
    ({"checkpoint": {"lock_lease_s": 0}}, "checkpoint.lock_lease_s: expected a number of "
                                          "seconds > 0, got 0"),
    ({"checkpoint": {"lock_lease_s": "30"}}, "checkpoint.lock_lease_s: expected a number"),
])
def test_bad_lock_keys_are_refused_naming_them(raw: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.build(raw)

"""The training loop against in-process pservers: stand-alone equals one pserver and one
trainer, sync runs are bit-identical, async mode trains."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pserver import config as cfg
from tests.helpers import generated_data, small_job
from trainer.loop import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "data", 4000, seed=1)


def run_distributed(cluster_factory: Any, job: cfg.JobConfig) -> dict[str, np.ndarray]:
    cluster = cluster_factory(job)
    trainers = [Trainer(cluster.config, j) for j in range(job.num_trainers)]
    errors: list[BaseException] = []

    def work(t: Trainer) -> None:
        try:
            t.train()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    params = trainers[0].parameters()
    for t in trainers:
        t.close()
    return params


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def test_standalone_equals_one_pserver_one_trainer_sync(data_dir: Path,
                                                        cluster_factory: Any) -> None:
    job = small_job(data_dir)
    alone = Trainer(job, standalone=True)
    alone.train()
    expected = alone.parameters()
    got = run_distributed(cluster_factory, job)
    assert_identical(expected, got)


def test_two_sync_runs_with_the_same_seeds_are_bit_identical(data_dir: Path,
                                                             cluster_factory: Any) -> None:
    job = small_job(data_dir, num_pservers=2, num_trainers=2)
    first = run_distributed(cluster_factory, job)
    second = run_distributed(cluster_factory, job)
    assert_identical(first, second)
    alone = Trainer(job, standalone=True)
    alone.train()
    # a different run (one trainer) really does give different parameters
    assert alone.parameters()["dense/bias"].tobytes() != first["dense/bias"].tobytes()


def test_async_mode_trains(data_dir: Path, cluster_factory: Any) -> None:
    job = small_job(data_dir, num_pservers=2, num_trainers=2, mode="async", epochs=2)
    params = run_distributed(cluster_factory, job)
    assert all(np.isfinite(v).all() for v in params.values())

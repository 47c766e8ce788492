"""Shared by the remote-storage tests: the S3 server's credentials (the `endpoint` and
`bucket` fixtures of tests/conftest.py start it), storage options for it, and a tiny
checkpoint written to any store."""

from __future__ import annotations

from typing import Any

import numpy as np

from ckpt import writer
from ckpt.manifest import merge
from ckpt.storage import Storage

CREDS = {"AWS_ACCESS_KEY_ID": "psrt-test", "AWS_SECRET_ACCESS_KEY": "psrt-test-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}
JOB = {"name": "j", "mode": "sync", "num_pservers": 1, "num_trainers": 1,
       "virtual_shards": 4, "tables": {"t": {"dim": 2, "optimizer": "sgd", "state": []}},
       "dense": {}}


def options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": CREDS["AWS_ACCESS_KEY_ID"],
            "secret": CREDS["AWS_SECRET_ACCESS_KEY"]}


def save(storage: Storage, serial: int, step: int = 0) -> None:
    ids = np.arange(5, dtype=np.uint64)
    shard = writer.write_shard(storage, serial, 0,
                               {"t": {"ids": ids, "values": np.full((5, 2), step, np.float32)}},
                               {"t": ids.astype(np.int64) % 4}, 4, {})
    part = writer.write_trainer(storage, serial, 0, 0, step, {"global_step": step + 1})
    writer.commit(storage, merge(serial, JOB, [shard, part]))

"""Names on disk: the guide's layout, plus a manifest and a commit marker.

    checkpoint_dir/
    ├── _LOCK                              # the job that owns this directory
    ├── checkpoint_7/
    │   ├── __lockup_table__/              # spelled as in the guide
    │   │   ├── table_pserver_0/           # pserver 0's shard of every table
    │   │   │   ├── emb.ids                # .npy data: uint64 ids
    │   │   │   ├── emb.values             # float32 (rows, dim), rows as in emb.ids
    │   │   │   ├── emb.accum              # optimizer state, one file per state array
    │   │   │   ├── emb.order              # int64: the rows sorted by virtual shard
    │   │   │   └── emb.vshards            # int64 (V+1,): virtual shard v's rows are
    │   │   │                              #   order[vshards[v]:vshards[v+1]]
    │   │   └── table_pserver_1/
    │   ├── __model__/
    │   │   ├── var.w_1                    # dense variable w_1 (written by trainer 0)
    │   │   └── var.w_1.m                  # its optimizer state (written by its pserver)
    │   ├── trainer_0/
    │   │   ├── epoch_id                   # "12\\n"
    │   │   ├── step_id
    │   │   └── reader_state               # JSON: data position, global step, seeds
    │   ├── MANIFEST.json                  # every file: size, checksum; world, tables, serial
    │   └── _SUCCESS                       # written last: the commit point
    └── checkpoint_8/
"""

from __future__ import annotations

import re

TABLES_DIR = "__lockup_table__"
MODEL_DIR = "__model__"
MANIFEST = "MANIFEST.json"
SUCCESS = "_SUCCESS"
LOCK = "_LOCK"
_SERIAL = re.compile(r"checkpoint_(0|[1-9][0-9]*)")


def checkpoint_name(serial: int) -> str:
    return f"checkpoint_{serial}"


def parse_serial(name: str) -> int | None:
    """The serial of a `checkpoint_<int>` entry; None for anything else (ignored)."""
    m = _SERIAL.fullmatch(name)
    return int(m.group(1)) if m else None


def shard_dir(pserver_id: int) -> str:
    return f"{TABLES_DIR}/table_pserver_{pserver_id}"


def table_file(pserver_id: int, table: str, array: str) -> str:
    return f"{shard_dir(pserver_id)}/{table}.{array}"


def dense_file(name: str, array: str = "value") -> str:
    return f"{MODEL_DIR}/var.{name}" if array == "value" else f"{MODEL_DIR}/var.{name}.{array}"


def trainer_dir(trainer_id: int) -> str:
    return f"trainer_{trainer_id}"


def trainer_file(trainer_id: int, name: str) -> str:
    return f"{trainer_dir(trainer_id)}/{name}"

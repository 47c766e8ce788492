"""The coordinator with shards in this process: how pserver 0 saves its own shard, and the
stand-alone trainer's whole job.

The coordinator asks each pserver to write its part of a checkpoint through a
`SaveShard` function. For a shard in the same process that is `shard_saver`:
a blocking save, or a background one whose part is reported to the
coordinator when it is written. Pserver 0 uses it for its own shard (and gRPC
for the others, `pserver.rpc.server`); the stand-alone trainer (`standalone`)
for its only one, so both write the same layout through the same code.
"""

from __future__ import annotations

from collections.abc import Callable

from ckpt import CheckpointConfig, reader
from ckpt.manifest import Part
from ckpt.storage import Damaged
from pserver.coord.coordinator import Coordinator
from pserver.tables import persist
from pserver.tables.shard import Shard

# (serial, part or None, error or None): a background save's part, written (or not)
Report = Callable[[int, Part | None, str | None], None]


def shard_saver(shard: Callable[[], Shard], ckpt: CheckpointConfig,
                report: Report) -> Callable[[int, int], Part | None]:
    """(serial, base) -> the part of the shard serving now, `shard()` (a rollback replaces
    it), written into checkpoint `serial` (a delta of checkpoint `base` if base >= 0).
    A background save returns None at once and calls `report(serial, part, error)` once
    the part is written."""
    storage = ckpt.storage()

    def save(serial: int, base: int) -> Part | None:
        current, delta_of = shard(), base if base >= 0 else None
        if not ckpt.background:
            return persist.save_shard(current, storage, serial, delta_of)
        persist.save_shard_background(
            current, storage, serial, lambda part, err: report(serial, part, err), delta_of,
            ckpt.background_duty, ckpt.background_priority)
        return None

    return save


def standalone(shard: Shard, ckpt: CheckpointConfig) -> Coordinator:
    """The stand-alone trainer's coordinator: its one pserver is `shard`, in this process,
    restored from the checkpoint the coordinator picks and ready; trainer 0 joins next."""
    save = shard_saver(lambda: shard, ckpt,
                       lambda serial, part, err: coord.report_part(0, serial, part, err))
    coord = Coordinator(shard.config, ckpt, persist.job_facts(shard),
                        lambda _pserver, serial, base: save(serial, base), watch=False)
    while coord.restore_serial >= 0:
        serial = coord.restore_serial
        manifest = coord.restore_manifest or reader.load_manifest(coord.storage, serial)
        try:
            persist.load_shard(shard, coord.storage, manifest)
            break
        except Damaged as e:  # fall back to an older checkpoint (every array is reloaded)
            coord.ready(0, serial, damaged=str(e))
    coord.join_pserver(0, "in-process")
    coord.ready(0, coord.restore_serial)
    return coord

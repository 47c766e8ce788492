"""`python -m ckpt`: look into a checkpoint directory.

    python -m ckpt ls DIR               every checkpoint: serial, epoch, step, complete, full or
                                        delta of which, size, age
    python -m ckpt verify DIR [SERIAL]  sizes and checksums against the manifest, and that a
                                        delta's chain of bases is there (exit 1 on damage)
    python -m ckpt show DIR SERIAL      tables, rows per shard, dense variables and shapes
    python -m ckpt unlock DIR           break the lock of a job that is gone

DIR may be a URL (s3://bucket/path, gs://..., memory://...): credentials and
endpoints come from the environment and fsspec's configuration (for S3 e.g.
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, FSSPEC_S3_ENDPOINT_URL), or from
`-o KEY=VALUE` storage options (VALUE is read as JSON when it parses as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ckpt import layout, lock, reader
from ckpt.backends import open_storage
from ckpt.storage import Storage


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_ls(storage: Storage) -> int:
    rows = reader.entries(storage, deep=False)
    print(f"{'serial':>6}  {'epoch':>5}  {'step':>6}  {'global':>7}  {'state':<10}  "
          f"{'kind':<8}  {'base':>4}  {'size':>10}  {'age':>6}  note")
    now = time.time()
    for e in rows:
        m = e.manifest
        t0 = (m.trainers.get("0") or {}) if m else {}
        state = "complete" if e.problem is None else ("damaged" if e.complete else "incomplete")
        size = f"{m.total_bytes / 1e6:.1f} MB" if m else "-"
        age = _age(now - m.created) if m else "-"
        note = ("final" if m and m.final else "") if e.problem is None else e.problem
        if e.problem is None and m is not None and m.kind == "delta":
            try:
                reader.chain(storage, m)
            except ValueError as err:
                note = f"not restorable: {err}"
        kind = m.kind if m else "-"
        base = m.base if m and m.kind == "delta" else "-"
        print(f"{e.serial:>6}  {t0.get('epoch_id', '-'):>5}  {t0.get('step_id', '-'):>6}  "
              f"{m.global_step if m else '-':>7}  {state:<10}  {kind:<8}  {base:>4}  "
              f"{size:>10}  {age:>6}  {note}")
    if not rows:
        print(f"(no checkpoints in {storage.root})")
    return 0


def cmd_verify(storage: Storage, serial: int | None) -> int:
    serials = [serial] if serial is not None else [e.serial for e in reader.entries(storage)]
    bad = 0
    for s in serials:
        problems = reader.verify(storage, s, deep=True)
        if not problems:
            try:
                links = reader.chain(storage, reader.load_manifest(storage, s), deep=True)
            except ValueError as e:
                problems = [f"not restorable: {e}"]
        if problems:
            bad += 1
            print(f"{layout.checkpoint_name(s)}: DAMAGED")
            for p in problems:
                print(f"  {p}")
        else:
            m = reader.load_manifest(storage, s)
            chain = "" if len(links) == 1 else \
                ", a delta restored as " + " -> ".join(str(x.serial) for x in links)
            print(f"{layout.checkpoint_name(s)}: ok ({len(m.files)} files, "
                  f"{m.total_bytes / 1e6:.1f} MB{chain})")
    return 1 if bad else 0


def cmd_show(storage: Storage, serial: int) -> int:
    m = reader.load_manifest(storage, serial)
    print(f"{layout.checkpoint_name(serial)} of job {m.job!r}: {m.mode} mode, "
          f"{m.num_pservers} pservers, {m.num_trainers} trainers, {m.virtual_shards} virtual "
          f"shards, global step {m.global_step}{', final' if m.final else ''}")
    delta = m.kind == "delta"
    if delta:
        print(f"a delta of checkpoint_{m.base}: its table files hold only the rows changed "
              f"since (dense variables and counters are whole)")
    print("tables:")
    for name, spec in m.tables.items():
        rows = [m.pservers.get(str(p), {}).get("rows", {}).get(name, 0)
                for p in range(m.num_pservers)]
        print(f"  {name}: dim {spec['dim']}, {spec['optimizer']} (state: "
              f"{', '.join(spec['state']) or 'none'}), {'changed ' if delta else ''}rows per "
              f"shard {rows}, total {sum(rows)}")
    print("dense variables:")
    for name, spec in m.dense.items():
        print(f"  {name}: shape {spec['shape']}, {spec['optimizer']}, on pserver "
              f"{spec['pserver']}")
    print("trainers:")
    for tid, facts in sorted(m.trainers.items(), key=lambda kv: int(kv[0])):
        print(f"  trainer {tid}: epoch {facts.get('epoch_id')}, step {facts.get('step_id')}, "
              f"global step {facts.get('global_step')}")
    return 0


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"-o: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ckpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a storage option for a URL DIR (repeatable)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls").add_argument("dir")
    v = sub.add_parser("verify")
    v.add_argument("dir")
    v.add_argument("serial", nargs="?", type=int)
    s = sub.add_parser("show")
    s.add_argument("dir")
    s.add_argument("serial", type=int)
    sub.add_parser("unlock").add_argument("dir")
    args = p.parse_args(argv)
    try:
        storage = open_storage(args.dir, _options(args.option))
        missing = storage.missing()
        if missing:
            print(f"ckpt: {args.dir} {missing}", file=sys.stderr)
            return 2
    except (ValueError, OSError) as e:
        print(f"ckpt: {args.dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "ls":
            return cmd_ls(storage)
        if args.cmd == "verify":
            return cmd_verify(storage, args.serial)
        if args.cmd == "show":
            return cmd_show(storage, args.serial)
        held = lock.break_lock(storage)
        print(f"removed the lock of {lock.describe(held)}" if held else "there was no lock")
        return 0
    except ValueError as e:
        print(f"ckpt: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the protobuf classes in pserver/wire/ from proto/ (needs grpcio-tools).

Only the messages are generated (psrt_pb2.py and its .pyi): servers and clients
build their handlers and stubs from the method table `pserver.wire.methods`,
which reads the services from the same descriptor. Run `python
tools/gen_protos.py`; `tests/unit/test_docs.py` checks that doing so changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    proto = ROOT / "proto" / "pserver" / "wire" / "psrt.proto"
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)

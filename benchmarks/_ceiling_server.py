"""A bare gRPC unary server for the transport ceiling: raw bytes in, raw bytes out.

`python benchmarks/_ceiling_server.py READY_FILE`: method /ceiling/Echo answers
a request whose first 8 bytes give the response size with that many bytes; no
protobuf and no numpy on either side.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

MAX = 512 * 1024 * 1024


def main() -> None:
    cache: dict[int, bytes] = {}

    def echo(req: bytes, _ctx: object) -> bytes:
        size = int.from_bytes(req[:8], "little")
        if size not in cache:
            cache[size] = bytes(size)
        return cache[size]

    server = grpc.server(futures.ThreadPoolExecutor(4),
                         options=[("grpc.max_send_message_length", MAX),
                                  ("grpc.max_receive_message_length", MAX)])
    handler = grpc.method_handlers_generic_handler(
        "ceiling", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(sys.argv[1]).write_text(f"127.0.0.1:{port}\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()

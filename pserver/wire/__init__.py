"""The wire: what travels between processes, and nothing else.

- `psrt_pb2` (generated from `proto/pserver/wire/psrt.proto`): the messages.
- `methods`: the one table of services and methods, read from the proto.
- `codec`: zero-copy encoding of the bulk messages (Pull, Push, their batches).
- `tensor`: ids and float32 arrays to and from bytes, with their checks.
"""

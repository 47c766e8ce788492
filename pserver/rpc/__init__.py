"""The gRPC side: servers, servicers, clients, security, and the tools that ask a job.

- `server`: `create_server` and `run` (`python -m pserver`): a pserver's gRPC server,
  its services (and the coordinator's, on pserver 0), health and reflection.
- `servicer` (the parameter-server service) and `coord` (the coordinator's service and
  its client): thin, over `handlers` (one handler factory and error policy, stubs).
- `api`: the `Client` interface trainers use; `client` (gRPC, every pserver) and
  `local` (in-process tables, stand-alone) implement it.
- `security`: TLS, mTLS, the token, channel options. `health`, `status`: the CLIs.
- `malloc`: glibc's thresholds, for message-sized buffers.
"""

"""The job's control plane: membership, liveness, the checkpoint barrier, recovery.

- `coordinator`: the restore point, the barrier, commit and rotation (hosted by pserver 0;
  no gRPC in it: `pserver.rpc.coord` is its face on the wire).
- `membership`: who is in the job, who is alive, the generation, rollbacks.
- `member`: a pserver's side (join, restore, serve a generation, roll back);
  `heartbeat`: every member's liveness thread.
- `local`: the coordinator with shards in this process (pserver 0's own shard, the
  stand-alone trainer).
"""

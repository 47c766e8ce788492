"""Table storage: what a pserver holds and the rules of every request (numpy and ckpt only,
no gRPC).

- `shard`: one pserver's shard of every table and its dense variables; checks requests
  and applies pushes (async on arrival, sync once every trainer pushed the step).
- `sparse` (a sparse table's rows, in arrays), `dense` (a dense variable), `idindex`
  (id -> row), `dedup` (distinct ids, summed gradients), `initializers`, `optimizers`.
- `sharding`: which pserver owns an id (virtual shards).
- `persist` (a shard to and from a checkpoint) and `snapshot` (rows read out while
  pushes go on, for background saves).
"""

"""`python -m pserver --id I --config job.toml [--port N]`: serve shard I of the job.

`python -m pserver status --config job.toml`: one line per process of a running job.

`python -m pserver health --config job.toml --id I`: exit 0 when pserver I is SERVING.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pserver import config as cfg
from pserver.rpc import health, status
from pserver.rpc.server import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pserver",
        description="Serve pserver I of a psrt job: its shard of every sparse table and the "
        "dense variables placed on it, over gRPC (with health and reflection services).",
        epilog="Job file keys (override with --set SECTION.KEY=VALUE or PSRT_SECTION__KEY):\n"
        + cfg.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--id", type=int, required=True, help="pserver id, 0..P-1")
    cfg.add_job_arguments(p)
    p.add_argument("--port", type=int, help="listen on this port instead of the job file's "
                   "(0: any free port, reported in the log and --ready-file)")
    p.add_argument("--bind", help="listen on this host instead of the address's host "
                   "(e.g. 0.0.0.0 in a container)")
    p.add_argument("--ready-file", help="write HOST:PORT here once serving")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "status":
        return status.main(argv[1:])
    if argv and argv[0] == "health":
        return health.main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = cfg.load(args.config, args.set)
        return run(config, args.id, args.port, args.bind, args.ready_file)
    except cfg.ConfigError as e:
        print(f"pserver: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

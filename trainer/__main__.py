"""`python -m trainer`: run one trainer, train stand-alone, or launch a whole local job.

    python -m trainer --id J --config job.toml        trainer J of a distributed job
    python -m trainer --standalone --config job.toml  one process, in-process tables
    python -m trainer launch [--config job.toml]      P pservers + T trainers on loopback
                                                      (default: the built-in demo job)
    python -m trainer datagen OUT --examples N        synthetic Criteo-format data
    python -m trainer plot RUN_DIR                    training curves as a PNG
"""

from __future__ import annotations

import os

# One BLAS thread per trainer: processes share the machine's cores, and a fixed
# thread count keeps matrix products bit-identical from run to run.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from ckpt.lock import LockedError  # noqa: E402
from pserver import config as pscfg  # noqa: E402
from pserver.errors import JOB_FAILED, CheckpointFailed, JobFailed, PsrtError  # noqa: E402
from trainer import config as tcfg  # noqa: E402
from trainer import datagen, launch, plot  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__,
        epilog="Job file keys (override with --set SECTION.KEY=VALUE or PSRT_SECTION__KEY):\n"
        + tcfg.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--id", type=int, help="trainer id, 0..T-1 (distributed)")
    p.add_argument("--standalone", action="store_true",
                   help="train in this process with in-process tables")
    pscfg.add_job_arguments(p, "job file (TOML)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.standalone == (args.id is not None):
        p.error("give exactly one of --id J or --standalone")
    return args


def run(args: argparse.Namespace) -> int:
    role = "trainer" if args.standalone else f"trainer[{args.id}]"
    try:
        trainer = Trainer(args.config, args.id or 0, standalone=args.standalone,
                          overrides=tuple(args.set))
    except (pscfg.ConfigError, ValueError) as e:
        print(f"{role}: config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except pscfg.ConfigError as e:  # e.g. a TLS file, the token, or metrics.port in use
        print(f"{role}: config error: {e}", file=sys.stderr)
        return 2
    except LockedError as e:
        print(f"{role}: {e}", file=sys.stderr)
        return 2
    except PsrtError as e:
        logging.getLogger("trainer").error("%s failed: %s", role, e)
        # not restarted: the job failed, or its final checkpoint did (the result is not saved)
        return JOB_FAILED if isinstance(e, JobFailed | CheckpointFailed) else 1
    finally:
        trainer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "launch":
        return launch.main(argv[1:])
    if argv and argv[0] == "datagen":
        return datagen.main(argv[1:]) or 0
    if argv and argv[0] == "plot":
        return plot.main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The demo job under docker-compose: from `up` to the first checkpoint, and to the end.

    python benchmarks/compose_up.py [--image psrt:local] [--runs N]

Runs deploy/docker-compose.yml (the demo job: 600,000 generated examples, 2
pservers, 2 trainers) as its own compose project N times (default 1), each from
nothing (`down -v` afterwards): the seconds from `docker-compose up -d` to pserver
0's `committed checkpoint_0` log line, and to both trainers' exit (`docker wait`).
The image must exist (deploy/build-image.sh). Also the image's size. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "docker-compose.yml"


def one_run(image: str, project: str) -> dict[str, float]:
    cmd = ["docker-compose", "-p", project, "-f", str(COMPOSE)]
    env = dict(os.environ, PSRT_IMAGE=image)

    def compose(*args: str) -> str:
        return subprocess.run([*cmd, *args], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    started = time.monotonic()
    try:
        compose("up", "-d", "--no-build")
        logs = subprocess.Popen(["docker", "logs", "--follow", compose("ps", "-q", "pserver-0")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in logs.stdout:  # type: ignore[union-attr]
            if "committed checkpoint_0" in line:
                first = time.monotonic() - started
                break
        else:
            raise RuntimeError("pserver-0 stopped before committing checkpoint_0")
        logs.kill()
        logs.wait()
        for t in ("trainer-0", "trainer-1"):
            code = subprocess.run(["docker", "wait", compose("ps", "-q", t)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            if code != "0":
                raise RuntimeError(f"{t} exited with code {code}")
        return {"first_checkpoint_s": round(first, 2),
                "trainers_done_s": round(time.monotonic() - started, 2)}
    finally:
        compose("down", "-v", "-t", "2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="psrt:local")
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", args.image],
                              check=True, capture_output=True, text=True).stdout)
    runs = [one_run(args.image, f"psrt-bench-{os.getpid()}-{i}") for i in range(args.runs)]
    for r in runs:
        print(f"up -> checkpoint_0 {r['first_checkpoint_s']:.1f}s, "
              f"-> trainers done {r['trainers_done_s']:.1f}s")
    print(json.dumps({"image": args.image, "image_mb": round(size / 1e6), "runs": runs}))


if __name__ == "__main__":
    main()

"""A deploy/docker-compose.yml stack under test: one compose project, real containers.

Used by tests/e2e/test_deploy.py. `docker_missing()` says why Docker cannot be used here (or
None); `build_image()` runs deploy/build-image.sh (cached by Docker's layer cache); `Stack`
brings the compose file up under a unique project name with job-file overrides in every
container's environment, and `down -v` removes its containers, network and volumes.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
SERVICES = ("data", "pserver-0", "pserver-1", "trainer-0", "trainer-1")
_ids = itertools.count()


def docker_missing() -> str | None:
    """Why the docker tests cannot run on this machine, or None if they can."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"no Docker engine: `{tool}` is not installed"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no Docker engine running: `docker info` did not answer within 30s"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine running: `docker info` failed: {last}"
    return None


def build_image(tag: str, base: str) -> None:
    """Build `tag` from deploy/Dockerfile on `base` (psrt-base:local: built first)."""
    r = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), tag], cwd=ROOT,
                       env=dict(os.environ, BASE=base), capture_output=True, text=True,
                       timeout=1200)
    if r.returncode != 0:
        raise AssertionError(f"deploy/build-image.sh failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")


class Stack:
    """deploy/docker-compose.yml as project `psrt-test-PID-N`, with `env` (PSRT_* job-file
    overrides) in every container and `variables` for the compose file itself."""

    def __init__(self, workdir: Path, image: str, env: dict[str, str],
                 variables: dict[str, str], overrides: tuple[Path, ...] = (),
                 volumes: dict[str, list[str]] | None = None) -> None:
        """`overrides`: more compose files after deploy/docker-compose.yml; `volumes`: mounts
        per service, over theirs (same container path)."""
        self.project = f"psrt-test-{os.getpid()}-{next(_ids)}"
        override = workdir / "compose.override.json"  # JSON is YAML
        services: dict[str, dict] = {s: {"environment": env} for s in SERVICES}
        for s in ("pserver-0", "pserver-1"):
            services[s]["healthcheck"] = {"interval": "1s"}
        for s, mounts in (volumes or {}).items():
            services[s]["volumes"] = mounts
        override.write_text(json.dumps({"services": services}))
        self.cmd = ["docker-compose", "-p", self.project, "-f", str(COMPOSE)]
        for f in (*overrides, override):
            self.cmd += ["-f", str(f)]
        self.env = dict(os.environ, PSRT_IMAGE=image, **variables)
        self.network = f"{self.project}_default"
        self._containers: dict[str, str] = {}

    def compose(self, *args: str, timeout: float = 180) -> str:
        r = subprocess.run([*self.cmd, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r.stdout

    def up(self) -> None:
        self.compose("up", "-d", "--no-build")

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "2")

    def container(self, service: str) -> str:
        """The service's container id (the same across restarts)."""
        if service not in self._containers:
            cid = self.compose("ps", "-q", service).strip()
            assert cid, f"no container for service {service} in project {self.project}"
            self._containers[service] = cid
        return self._containers[service]

    def logs(self, service: str) -> str:
        r = subprocess.run(["docker", "logs", self.container(service)], capture_output=True,
                           text=True, timeout=60)
        return r.stdout + r.stderr

    def state(self, service: str) -> dict:
        out = subprocess.run(["docker", "inspect", "-f", "{{json .}}", self.container(service)],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        info = json.loads(out)
        return {**info["State"], "RestartCount": info["RestartCount"]}

    def exec(self, service: str, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", self.container(service), *cmd],
                              capture_output=True, text=True, timeout=120)

    def wait_log(self, service: str, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in a line of the service's log (what it logged so
        far, then as it comes: `docker logs --follow`), within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self._follow(service, re.compile(pattern), deadline)
            if found:
                return found
            time.sleep(0.2)  # the container stopped; its log goes on if it is restarted
        raise AssertionError(f"{service}: no log line matching {pattern!r} within "
                             f"{timeout:.0f}s; its log:\n{self.logs(service)[-4000:]}")

    def _follow(self, service: str, pattern: re.Pattern, deadline: float) -> re.Match | None:
        proc = subprocess.Popen(["docker", "logs", "--follow", self.container(service)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    line = lines.get(timeout=left)
                except queue.Empty:
                    return None
                if line is None:
                    return None
                found = pattern.search(line)
                if found:
                    return found
            return None
        finally:
            proc.kill()
            proc.wait()

    def wait_done(self, service: str, timeout: float) -> dict:
        """Wait until the service's container exited with code 0 (restarts in between are
        allowed: an exit with 0 is final under `restart: on-failure`); returns its state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(service)
            if state["Status"] == "exited" and state["ExitCode"] == 0:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} not finished within {timeout:.0f}s "
                                     f"(state {state['Status']}, exit {state['ExitCode']}, "
                                     f"restarts {state['RestartCount']}); its log:\n"
                                     f"{self.logs(service)[-4000:]}")
            time.sleep(0.3)

    def crash(self, service: str) -> None:
        """SIGKILL the container's init process from the host, as a crash or the OOM killer
        would: the restart policy applies (after `docker kill` Docker never restarts a
        container: it counts as stopped by hand)."""
        pid = self.state(service)["Pid"]
        assert pid > 0, f"{service} is not running"
        os.kill(pid, 9)

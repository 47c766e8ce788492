"""Reading a job file: the TOML, its overrides, and the command-line arguments for them.

Overrides, applied in this order over the file: `PSRT_<SECTION>__<KEY>`
environment variables (`PSRT_JOB__MODE=async`, `PSRT_TABLES__EMB__DIM=32`),
then `--set section.key=value` flags. Values are read as TOML values, falling
back to a plain string. The document is then checked and built by
`pserver.config.job.build`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ckpt.config import ConfigError
from pserver.config.job import JobConfig, build

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(dotted, "an override names SECTION.KEY or SECTION.NAME.KEY")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{p!r} is not a section")
    node[parts[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    out = []
    for name, text in sorted(environ.items()):
        if name.startswith("PSRT_") and "__" in name:
            dotted = ".".join(p.lower() for p in name[len("PSRT_"):].split("__"))
            out.append((dotted, _parse_value(text)))
    return out


def load(path: str | Path | None, overrides: Iterable[str] = (),
         environ: Mapping[str, str] | None = None) -> JobConfig:
    """Read a job file (or none: defaults), apply env and `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    for dotted, value in env_overrides(os.environ if environ is None else environ):
        apply_override(raw, dotted, value)
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(item, "--set takes SECTION.KEY=VALUE")
        apply_override(raw, dotted.strip(), _parse_value(text.strip()))
    return build(raw, source)




def add_job_arguments(parser: argparse.ArgumentParser,
                      config_help: str = "job file (TOML); default: built-in defaults") -> None:
    """--config and --set, as every command that reads a job file takes them (`load`)."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one job-file key (repeatable; after PSRT_SECTION__KEY "
                        "environment variables)")

"""The job file's schema: every key is a dataclass field that carries its meaning and check.

A section of the job file is a frozen dataclass; each of its keys is a field
made with `setting(default, doc, check)`: the default, what the key means, and
an optional check (value -> the problem, or None). Nothing else describes a
key: `parse` reads a section with it, `validate` (each class's `__post_init__`)
checks every value, and `keys` lists them for `describe` (`--help`) and for the
README's tables (`tools/readme_keys.py`).

The key's type is the field's annotation: `int`, `float` (an int is taken as
a float), `str`, `bool`, `dict`, `tuple[X, ...]` (a TOML list of X, kept as a
tuple; a bare `tuple` leaves the whole value to the check), `X | None`. Other
packages' classes (`ckpt.CheckpointConfig`) follow the same convention with
plain field metadata (`doc`, `check`) and check themselves.

Field metadata (all optional but `doc`): `key`, the name in the file when it
is not the field's; `flatten`, for a field holding another such dataclass
whose keys sit in the same section (a table's optimizer keys); `only_for`,
(field, value): the key is accepted only when that field has that value;
`shown`, how the default is written in the docs ("derived").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckpt.config import ConfigError

Check = Callable[[Any], "str | None"]


def setting(default: Any = dataclasses.MISSING, doc: str = "", check: Check | None = None,
            *, default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A key of a section: its default (none: the key is required), meaning and check."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"doc": doc, "check": check, **meta})


# ---- checks ---------------------------------------------------------------------------------

def positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def fraction(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v!r}"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


# ---- keys -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """One key of a section, as the docs show it."""

    name: str  # in the job file
    field: str  # of the dataclass (of `owner`, for a flattened key)
    type: str  # int, float, str, bool, list, dict
    default: Any
    doc: str
    required: bool
    shown: str | None  # the default as the docs write it, when not its repr
    owner: str | None  # the flattened field this key belongs to
    only_for: tuple[str, Any] | None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        return "list"
    if origin in (typing.Union, types.UnionType):
        return _type_name(next(a for a in typing.get_args(hint) if a is not type(None)))
    return getattr(origin, "__name__", str(origin))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def keys(cls: type) -> Iterator[Key]:
    """The keys of a section class, in order (a flattened field's keys in its place)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata and not f.metadata.get("flatten"):
            continue  # not a key: set by the code (a table's name, the job's sections)
        if f.metadata.get("flatten"):
            inner = _default(f)
            for k in keys(type(inner)):
                yield dataclasses.replace(k, default=getattr(inner, k.field), owner=f.name,
                                          required=False)
            continue
        default = _default(f)
        yield Key(f.metadata.get("key", f.name), f.name, _type_name(hints[f.name]), default,
                  f.metadata["doc"], default is dataclasses.MISSING, f.metadata.get("shown"),
                  None, f.metadata.get("only_for"))


def describe_sections(sections: list[tuple[str, type]]) -> str:
    """Every key of these sections, with type, default and meaning (for --help)."""
    lines = []
    for title, cls in sections:
        lines.append(f"[{title}]")
        for k in keys(cls):
            default = "required" if k.required else k.shown or repr(_listed(k.default))
            lines.append(f"  {k.name} ({k.type}, default {default}): {k.doc}")
    return "\n".join(lines)


def _listed(value: Any) -> Any:
    """A default as the job file writes it (tuples are TOML lists)."""
    return list(value) if isinstance(value, tuple) else value


def shown_default(k: Key) -> Any:
    return k.shown if k.shown is not None else _listed(k.default)


# ---- validation -----------------------------------------------------------------------------

def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _typed(hint: Any, value: Any) -> tuple[Any, str | None]:
    """(the value as the field keeps it, or the problem with its type)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return value, None
        return _typed(next(a for a in args if a is not type(None)), value)
    if hint is tuple:  # the check judges the value: its type too
        return (tuple(value) if isinstance(value, list | tuple) else value), None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return value, f"expected list, got {_got(value)}"
        item = args[0] if args else None
        if item is not None and not all(isinstance(v, item) and not isinstance(v, bool)
                                        for v in value):
            return value, f"expected a list of {item.__name__}, got {list(value)!r}"
        return tuple(value), None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if hint is bool:
        return value, None if isinstance(value, bool) else f"expected bool, got {_got(value)}"
    base = origin or hint
    if isinstance(value, bool) or not isinstance(value, base):
        return value, f"expected {base.__name__}, got {_got(value)}"
    return value, None


def _checked(hint: Any, f: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """(the value as the field keeps it, or the problem with it: its type, then its check)."""
    value, problem = _typed(hint, value)
    check = f.metadata.get("check")
    if problem is None and check is not None and value is not None:
        problem = check(value)
    return value, problem


def validate(obj: Any, section: str = "") -> None:
    """Check (and normalise: ints to floats, lists to tuples) every key field of a config
    dataclass; ConfigError names `section.key` (the bare key without a section)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if "doc" not in f.metadata:
            continue
        name = f.metadata.get("key", f.name)
        key = f"{section}.{name}" if section else name
        value, problem = _checked(hints[f.name], f, getattr(obj, f.name))
        if problem is not None:
            raise ConfigError(key, problem)
        if value is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, value)


# ---- parsing --------------------------------------------------------------------------------

def parse(prefix: str, cls: type, raw: Any, **fixed: Any) -> Any:
    """One section of the job file as an instance of `cls`: unknown and missing keys,
    then every value (the class checks itself); ConfigError names `prefix.key`. `fixed`
    sets fields that are not keys (a table's name)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, f"expected a table of keys, got {raw!r}")
    known = list(keys(cls))
    names = [k.name for k in known]
    for name in raw:
        if name not in names:
            raise ConfigError(f"{prefix}.{name}", f"unknown key (known: {', '.join(names)})")
    if any(k.owner for k in known):
        _check_in_order(prefix, cls, known, raw)
    values: dict[str, Any] = dict(fixed)
    nested: dict[str, dict[str, Any]] = {}
    for k in known:
        if k.name in raw:
            (nested.setdefault(k.owner, {}) if k.owner else values)[k.field] = raw[k.name]
        elif k.required:
            raise ConfigError(f"{prefix}.{k.name}", "required key is missing")
    try:
        for owner, given in nested.items():
            inner = _default(next(f for f in dataclasses.fields(cls) if f.name == owner))
            values[owner] = dataclasses.replace(inner, **given)
        obj = cls(**values)
    except ConfigError as e:
        if e.key == prefix or e.key.startswith(prefix + "."):
            raise
        raise ConfigError(f"{prefix}.{e.key}", e.problem) from None
    _only_for(prefix, known, raw, obj)
    return obj


def _check_in_order(prefix: str, cls: type, known: list[Key], raw: Mapping[str, Any]) -> None:
    """The given keys of a section with flattened ones, checked in the section's order (its
    nested dataclass is built first, and would otherwise speak first)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in known:
        if k.name not in raw:
            continue
        owner = type(_default(fields[k.owner])) if k.owner else cls
        f = next(f for f in dataclasses.fields(owner) if f.name == k.field)
        problem = _checked(_hints(owner)[k.field], f, raw[k.name])[1]
        if problem is not None:
            raise ConfigError(f"{prefix}.{k.name}", problem)


def _only_for(prefix: str, known: list[Key], raw: Mapping[str, Any], obj: Any) -> None:
    """Keys given that only apply to another value of a field (adam's beta1 on adagrad)."""
    by_field = {(k.owner, k.field): k.name for k in known}
    for k in known:
        if k.only_for is None or k.name not in raw:
            continue
        field_name, wanted = k.only_for
        holder = getattr(obj, k.owner) if k.owner else obj
        actual = getattr(holder, field_name)
        if actual != wanted:
            raise ConfigError(f"{prefix}.{k.name}", f"only for {by_field[(k.owner, field_name)]} "
                              f"{wanted!r}, this one uses {actual!r}")

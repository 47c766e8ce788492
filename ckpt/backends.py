"""Which `Storage` backend serves a `checkpoint_dir`: `open_storage`."""

from __future__ import annotations

import os
from typing import Any

from ckpt.local import LocalStorage
from ckpt.remote import FsspecStorage
from ckpt.storage import Storage, protocol_of, shown


def open_storage(location: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage of a `checkpoint_dir`: a plain path or `file://` URL is a LocalStorage
    (fsync, memory-mapped reads); any other URL goes through fsspec with
    `storage_options` (credentials and endpoints, else fsspec's own configuration and
    the environment). ValueError names the location when it cannot be used."""
    text = os.fspath(location)
    protocol = protocol_of(text)
    if protocol is None:
        return LocalStorage(text)
    if protocol == "file":
        path = text[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"{shown(text)}: a file:// URL needs an absolute path "
                             f"(file:///dir)")
        return LocalStorage(path)
    return FsspecStorage(text, storage_options or {})

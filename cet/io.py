"""Atomic writes: a reader sees either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

__all__ = ["save_atomic", "write_json_atomic"]


def _write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    # os.replace would fail only after the whole temporary file was written, naming that file.
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path.resolve()}: it is a directory; name a file inside it")
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        # mkstemp creates the file readable by its owner only; give it the permissions of a plain open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: object, path: str | os.PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    return _write_atomic(path, lambda stream: torch.save(obj, stream))


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON; non-finite floats are rejected, since JSON has no NaN."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    return _write_atomic(path, lambda stream: stream.write(text.encode()))

"""Atomic file writes: an interrupted write never leaves a file that looks valid.

Every file segcompile writes goes through ``atomic_path``: the content is written (and, for an
exported program, checked) under a temporary name beside the target, flushed to disk, given the
mode ``open()`` would give it, and renamed over the target only then.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data) -> Path:
    """Write ``data`` (bytes, or any buffer such as a serialized TensorRT engine) like ``atomic_write_text``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(data))
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write, by any means (``onnx.save``, say),
    and check; renamed over ``path`` when the block ends, removed when it raises.

    The temporary file exists, empty, when the block starts. Its data reach the disk before the
    rename, so that a crash leaves the old file or the new one, never a truncated new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (a rename is durable only after its file's data is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

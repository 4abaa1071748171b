"""Atomic file writes: an interrupted write never leaves a file that looks valid.

Every file segcompile writes goes through ``atomic_path``: the content is written (and, for an
exported program, checked) under a temporary name beside the target, flushed to disk, given the
mode ``open()`` would give it, and renamed over the target only then. A folder of files written
together (the pass dumps and pages) goes through ``atomic_dir`` the same way: filled under a
temporary name beside the target, renamed into place when complete, removed when not.

Where the target is known before the expensive work (an export, the pages), ``check_writable``
finds out up front that it can be written: a file is created and removed in the folder that
will hold it, so that a read-only place fails in a second, not after the work.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SegcompileError


class OutputPathError(SegcompileError, OSError):
    """An output location that cannot be written (read-only, under a file, or holding other files)."""


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
    rename, so that a crash leaves the old file or the new one, never a truncated new one. A
    folder that cannot be written raises ``OutputPathError`` before the block runs.
    """
    path = Path(path)
    with _writing_in(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, replaceable: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """A temporary folder beside ``path`` for the block to fill; renamed into place when the block
    ends, removed (with all it holds) when it raises, so that a refused or interrupted run leaves
    no folder that looks complete.

    ``path`` may be missing, an empty folder, or a folder of an earlier run (every entry a name
    ``replaceable`` accepts), which is then replaced as a whole; any other folder is refused
    (``check_replaceable_dir``) before the block runs, as is a place that cannot be written.
    """
    path = Path(path).absolute()
    check_replaceable_dir(path, replaceable)
    with _writing_in(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the mode mkdir would
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: str | os.PathLike, what: str = "the output") -> None:
    """Raise ``OutputPathError`` unless files can be created in ``folder``, or, where it does not
    exist yet, in the nearest folder above it (where it would be created): a file is created
    there and removed. ``what`` names the output in the message (``"--out model.onnx"``)."""
    folder = Path(folder).absolute()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputPathError(f"{what}: cannot create {folder}: {existing} is a file, not a folder; "
                              "choose a location under a folder")
    with _writing_in(existing, what):
        fd, name = tempfile.mkstemp(dir=existing, prefix=".segcompile-write-check.", suffix=".tmp")
    os.close(fd)
    os.unlink(name)


def check_replaceable_dir(path: str | os.PathLike, replaceable: Callable[[str], bool],
                          what: str | None = None) -> None:
    """Raise ``OutputPathError`` unless ``atomic_dir`` may put a folder at ``path``: missing, or a
    folder that is empty or holds only names ``replaceable`` accepts, not the current folder nor
    one holding it, in a place that can be written."""
    path = Path(path).absolute()
    what = what or str(path)
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{what} is a file, not a folder; name a folder (it is created if missing)")
        cwd = Path.cwd().resolve()
        if path.resolve() == cwd or path.resolve() in cwd.parents:
            raise OutputPathError(f"{what} is the current folder or holds it; the output replaces its folder "
                                  "as a whole: name a folder of its own")
        foreign = sorted(name for name in os.listdir(path) if not replaceable(name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputPathError(f"{what} holds files that an earlier run did not write ({shown}); the output "
                                  "replaces its folder as a whole: name a new or empty folder")
    check_writable(path.parent, what)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (a rename is durable only after its file's data is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _writing_in(folder: Path, what: str | None = None) -> Iterator[None]:
    """Turn an ``OSError`` of creating something in ``folder`` into an ``OutputPathError`` naming it."""
    try:
        yield
    except OSError as e:
        if isinstance(e, SegcompileError):
            raise
        reason = e.strerror or type(e).__name__
        where = f"{what}: " if what else ""
        raise OutputPathError(f"{where}cannot write in {folder} ({reason}); choose a location you can write "
                              "to") from e


def _replace_dir(new: Path, path: Path) -> None:
    """Rename the folder ``new`` to ``path``; an existing ``path`` (checked replaceable) is moved
    aside first and removed after."""
    try:
        os.replace(new, path)  # path missing or an empty folder: one rename
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.replace(path, old)  # onto the empty folder mkdtemp made
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

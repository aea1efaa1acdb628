"""Atomic writes: a reader (or a resumed run) sees the old content or the new, never a part.

Every writer in mica (the ``mica advantages`` output, streamed Parquet, trainer configs,
metrics, checkpoints, scenario files, study results) goes through this module:

- the content is written to a hidden temporary sibling (``.NAME.HOST-PID.XXXX.tmp``, same
  folder, so the final move stays on one file system), flushed to disk, then moved into
  place;
- a temporary sibling left by a writer that was killed (SIGKILL, a power cut) is removed by
  the next write of the same path: one whose name carries this host's tag and the id of a
  process that no longer exists. A live writer's files (this or another process, another
  host sharing the folder) and files of any other name are never touched;
- ``overwrite=True`` publishes with ``os.replace`` (atomic on POSIX);
- ``overwrite=False`` publishes with ``os.link``, which fails when the target exists, so two
  writers racing for the same path cannot both succeed: exactly one wins, the other gets
  :class:`FileExistsError` and the winner's file stays whole. File systems without hard
  links fall back to check-then-rename (documented race);
- the file gets the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask),
  not ``mkstemp``'s private ``0o600``;
- on any exception, ``KeyboardInterrupt`` and ``SystemExit`` included, the temporary file is
  removed. SIGTERM reaches this cleanup when the program turns it into an exception (the
  ``mica`` command does: see :func:`mica_core.cli.main`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "default_file_mode",
]


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a new file gets from ``open(path, "w")``: ``0o666`` less the umask."""
    return 0o666 & ~_current_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _hold_signals():
    """Block SIGINT and SIGTERM in this thread; returns what to restore (``None`` where
    signal masks do not exist, or off the main thread, where Python runs no handlers)."""
    if not hasattr(signal, "pthread_sigmask") or \
            threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)


def _release_signals(held) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _host_tag() -> str:
    """8 hex digits naming this host (a process id means something on its own host only)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _temp_prefix(path: Path) -> str:
    """The start of this process's temporary names for ``path``: ``.NAME.HOST-PID.``."""
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a pid this OS cannot ask about): keep
    return True


def _remove_stale(path: Path, suffix: str, remove) -> None:
    """Remove the temporary siblings of ``path`` that a killed writer left: names of this
    writer's pattern (``.NAME.HOST-PID.<mkstemp letters>SUFFIX``) with this host's tag and the
    id of a process that no longer exists. Anything else is left alone."""
    pattern = re.compile(re.escape(f".{path.name}.{_host_tag()}-") + r"(\d+)\.[a-z0-9_]+"
                         + re.escape(suffix) + r"\Z")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() \
                and not _process_exists(int(match.group(1))):
            with contextlib.suppress(OSError):
                remove(path.parent / name)


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} exists; it was not replaced")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and exclusive: fails if path exists, even if just created
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.lexists(path):
            raise _exists_error(path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True,
                suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it becomes ``path``.

    Write the content to the yielded path (any writer that takes a path: pyarrow, torch,
    matplotlib). On leaving the block without an exception the file is flushed, given the
    default mode and moved to ``path``; on an exception it is removed.

    Args:
      path: the destination. Its folder is created if missing.
      overwrite: replace an existing ``path``; ``False`` raises :class:`FileExistsError`
        instead, also when another writer created ``path`` while this one was writing.
      suffix: of the temporary name (``.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, suffix, os.unlink)
    # A signal handler that raises (SIGINT, the CLI's SIGTERM) must not run between creating
    # the temporary file and entering the ``try`` that removes it: hold those signals back
    # until then; one that arrived meanwhile is raised inside the ``try``.
    held = _hold_signals()
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=path.parent)
    except OSError as exc:
        _release_signals(held)
        # The folder exists (created above) but takes no new file (/proc, a read-only mount):
        # say so, not the bare errno text, which names the temporary file or reads as if the
        # folder were missing.
        raise type(exc)(exc.errno, f"cannot create a file in this folder ({exc.strerror})",
                        str(path.parent)) from None
    except BaseException:
        _release_signals(held)
        raise
    tmp = Path(name)
    try:
        os.close(fd)
        _release_signals(held)
        yield tmp
        os.chmod(tmp, default_file_mode())
        _fsync_file(tmp)
        _publish(tmp, path, overwrite)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """Write ``obj`` as indented, key-sorted JSON (plus a newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n",
                      overwrite=overwrite)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is first renamed aside and removed only after the new directory is
    in place, so an interruption leaves the old or the new directory (plus, at worst, a
    hidden leftover that the next call for the same ``path`` removes once its writer is
    gone). Files get the default
    file mode and folders ``0o777`` less the umask, as ``mkdir`` would give them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, ".tmp", partial(shutil.rmtree, ignore_errors=True))
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        file_mode = default_file_mode()
        dir_mode = 0o777 & ~_current_umask()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, file_mode)
                _fsync_file(f)
            elif f.is_dir():
                os.chmod(f, dir_mode)
        os.chmod(tmp, dir_mode)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp",
                                        dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Folders written whole or not at all, and files checked against a hash: the latent cache (``ncp.cache``) and
the merged export (``ncp.export --merge``) are written into a temporary sibling folder and put in place at
the end, so a killed writer leaves the old folder (or none), never half of one. A leaf module."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

logger = logging.getLogger(__name__)

_CHUNK = 1 << 23  # 8 MiB reads: xxh3 runs at memory speed, the read is the cost


def file_digest(path: str | Path, fsync: bool = False) -> str:
    """The xxh3-64 of a file's bytes, 16 hex digits (read in chunks; ``fsync``: also flush it to disk)."""
    h = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def temp_sibling(final: Path) -> Path:
    """``.NAME.tmp-PID`` beside ``final``: where a writer builds the folder that becomes ``final``."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(final: Path) -> None:
    """Remove the ``.NAME.tmp-PID`` folders of writers of ``final`` that were killed (their pid is gone)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if tmp.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            logger.info("removing %s, left by a killed writer (pid %s)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, final: Path) -> None:
    """Put the folder ``new`` at ``final``: renamed there if ``final`` is missing or empty; an existing
    ``final`` is swapped with it in one step and then deleted (where the file system cannot swap: ``final`` is
    first renamed to ``.NAME.old-PID``, which holds the old folder until the new one is in place)."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)  # the old folder, now at new's path
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old)


@contextmanager
def written_whole(final: Path) -> Iterator[Path]:
    """A new temporary folder beside ``final`` (``.NAME.tmp-PID``) to write into: put at ``final``
    (:func:`replace_folder`) when the block ends, removed when it raises. Killed writers' folders are removed
    first (:func:`remove_stale_temps`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

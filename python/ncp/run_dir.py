"""A run folder (``train.output_dir``) belongs to one run.

:func:`claim` holds the folder for the length of a run:

- an exclusive ``fcntl.flock`` on ``<output_dir>/run.lock``, which holds the holder's pid, host and start time.
  The OS drops the lock when the process ends, however it ends (kill -9 included): a lock file left behind
  locks nothing. A second run into a held folder is refused with :class:`RunFolderError` naming the holder;
- a folder that holds a started or finished run (a ``step-*`` checkpoint, ``lora/``, a non-empty
  ``metrics.jsonl``) is refused unless the run resumes it (``--resume``) or ``--overwrite`` clears it (the
  files of :data:`RUN_FILES` only; anything else in the folder stays);
- ``.tmp-*`` folders that a killed checkpoint or LoRA write left behind are removed.

Only the main process touches the folder; with several processes every rank learns whether it was refused.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from ncp.preempt import max_over_ranks

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# what ncp writes into a run folder (ncp.train, its report, ncp.export's default output): --overwrite removes these
RUN_FILES = ("step-*", ".tmp-*", "lora", "metrics.jsonl", "tensorboard", "validation", "report.json", "grid.png",
             "curves.png", "lora_kohya.safetensors")


class RunFolderError(OSError):
    """A run folder this run may not use; the message names the folder and why."""


class RunLock:
    """The exclusive lock on ``<folder>/run.lock``: :meth:`acquire` takes it or raises naming the holder."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise RunFolderError(f"{self.path.parent} is in use by another run ({describe_holder(holder)}; "
                                 f"{self.path}): wait for it to end or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:  # the file stays: removing it would let a third run lock a new file beside a second
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def started_run(folder: Path) -> list[str]:
    """What in ``folder`` shows a started or finished run: checkpoints, ``lora/``, logged steps."""
    found = sorted(p.name for p in folder.glob("step-*") if p.is_dir())
    if (folder / "lora").exists():
        found.append("lora/")
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def prepare(folder: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse or clear a folder that holds a run; remove leftover ``.tmp-*`` folders. Call with the lock held."""
    found = started_run(folder)
    if found and overwrite:
        cleared = sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)})
        for path in cleared:
            _remove(path)
        logger.warning("--overwrite: cleared the run in %s (%s)", folder, ", ".join(p.name for p in cleared))
    elif found and not resume:
        shown = found[:3] + ([f"{len(found) - 3} more"] if len(found) > 3 else [])
        raise RunFolderError(f"{folder} holds a run ({', '.join(shown)}): continue it with --resume auto, "
                             f"start it afresh with --overwrite, or choose another train.output_dir")
    for tmp in folder.glob(".tmp-*"):
        logger.info("removing %s, left by a write that did not finish", tmp)
        _remove(tmp)


@contextlib.contextmanager
def claim(folder: Path, resume: str | None, overwrite: bool, accelerator: Any) -> Iterator[None]:
    """Hold ``folder`` for one run (see the module doc). The main process takes the lock; a refusal is raised
    on every rank (the others name the main process's error), so no rank waits for one that has quit."""
    if overwrite and resume:
        raise RunFolderError(f"--overwrite clears the run that train.resume={resume} would continue: give one of them")
    lock, error = None, None
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(folder).acquire()
            prepare(folder, resume, overwrite)
        except BaseException as err:  # the lock goes with any failure (an in-process caller may run again)
            if lock is not None:
                lock.release()
                lock = None
            if not isinstance(err, RunFolderError):
                raise
            error = err
    if max_over_ranks(accelerator, error is not None):
        raise error or RunFolderError(f"{folder}: refused by the main process (its error says why)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()

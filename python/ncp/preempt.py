"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop a run after the current optimizer step, with a checkpoint.

The first signal only sets a flag (:class:`SignalStop`); the training loop asks :meth:`SignalStop.requested`
before each optimizer step, writes a checkpoint of the step it reached and raises :class:`Preempted`, whose
exit status is the convention of the signal: 143 for SIGTERM (what Slurm and Kubernetes send before they
kill), 130 for SIGINT (Ctrl-C), 0 for SIGUSR1 (for requeue setups, where the job script requeues and the
step should not count as failed). A second signal exits at once (status 128 + the signal's number): a
checkpoint being written then is left in a ``.tmp-*`` folder, which the next start removes.

With several processes the stop flag is all-reduced before each step, so every rank stops after the same
step, whichever ranks received the signal.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 0}


def max_over_ranks(accelerator: Any, value: int) -> int:
    """The largest ``value`` of all processes (each process's own value without a process group)."""
    if accelerator.num_processes == 1:
        return int(value)
    return int(accelerator.gather(torch.tensor([int(value)], device=accelerator.device)).max())


class Preempted(Exception):
    """The run stopped on a signal after ``step``, its state in ``checkpoint``; ``code`` is the exit status."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, output_dir: Path):
        name = signal.Signals(signum).name
        self.code = EXIT_CODES[signum]
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no step taken, nothing to save"
        super().__init__(f"stopped by {name} after step {step}: {saved}. Resume with the same command and "
                         f"--resume auto (train.output_dir={output_dir})")


class SignalStop:
    """Handlers for the signals of :data:`EXIT_CODES` while the block runs (the previous ones come back after)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "SignalStop":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked loader worker (Ctrl-C reaches the whole group): its parent stops it
            return
        name = signal.Signals(signum).name
        if self.signum:
            os.write(2, f"ncp.train: {name} again: exiting at once, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"ncp.train: {name}: stopping after this optimizer step with a checkpoint "
                    f"(send it again to exit at once)\n".encode())

    def requested(self, accelerator: Any) -> int:
        """The signal any process received (0: none), the same on every process."""
        return max_over_ranks(accelerator, self.signum)

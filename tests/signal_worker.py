"""``python -m ncp.train`` (its ``main``) in a process that sends itself a signal at a chosen moment, for the
preemption tests (a real process: real handlers, real exit status):

    python signal_worker.py SIGNAL WHEN STEP COUNT RANK [section.key=value ...]

WHEN is ``step`` (during optimizer step STEP, after its forward pass; one forward pass per step, so
grad_accum=1 and no error_scale=log_t) or ``write`` (while the main process writes the checkpoint of step
STEP, before its manifest). The signal is sent COUNT times in a row, by the process of rank RANK only."""
import os
import signal
import sys

import ncp.checkpoint
import ncp.train
import ncp.trainer


def main(signame: str, when: str, step: str, count: str, rank: str, *overrides: str) -> int:
    sig, step, count = signal.Signals[signame], int(step), int(count)
    mine = int(os.environ.get("RANK", "0")) == int(rank)

    def send():
        for _ in range(count):
            os.kill(os.getpid(), sig)

    if when == "step":
        real_step, calls = ncp.trainer.preference_step, [0]

        def preference_step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            calls[0] += 1
            if mine and calls[0] == step:
                send()
            return out

        ncp.trainer.preference_step = preference_step
    else:
        real_manifest = ncp.checkpoint.write_manifest

        def write_manifest(folder):
            if mine and folder.name.startswith(f".tmp-step-{step:06d}-"):
                send()
            real_manifest(folder)

        ncp.checkpoint.write_manifest = write_manifest
    return ncp.train.main(list(overrides))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

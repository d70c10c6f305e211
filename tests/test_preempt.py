"""Preemption (ncp.preempt) through real processes of the CLI: SIGTERM, SIGINT and SIGUSR1 stop the run after the
current optimizer step with a checkpoint and the conventional exit status, also during a checkpoint write; a
second signal exits at once; the resumed run has the losses of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncp import checkpoint as ckpt
from ncp.train import main

from fixtures import cli_args

WORKER = Path(__file__).parent / "signal_worker.py"
REFERENCE_STEPS = 12


def _args(model, parquet, out, *extra):
    return cli_args(model, parquet, out, "objective.name=dpo", "objective.beta=5000", "optim.lr=1e-3",
                    "train.checkpoint_every=2", "data.empty_prompt_prob=0.5", *extra)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))  # each step once
    return [m["loss"] for m in lines]


@pytest.fixture(scope="module")
def reference(tiny_sd15, tiny_parquet, tmp_path_factory):
    """The losses of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, f"train.max_steps={REFERENCE_STEPS}")) == 0
    return _losses(out)


def _resume_matches(model, parquet, out, reference, steps):
    assert main(_args(model, parquet, out, f"train.max_steps={steps}", "--resume", "auto")) == 0
    assert _losses(out) == pytest.approx(reference[:steps], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 0)])
def test_a_signal_stops_after_the_step_with_a_checkpoint(sig, code, reference, tiny_sd15, tiny_parquet, tmp_path):
    """A signal from outside while training: the step finishes, its checkpoint is written, the exit status is
    the signal's convention and the last line says how to resume."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ncp.train", *_args(tiny_sd15, tiny_parquet, out,
                                                                       "train.max_steps=100000")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    step = len(_losses(out))
    assert step + 2 <= REFERENCE_STEPS, f"the run took {step} steps before it stopped"
    assert f"stopped by {sig.name} after step {step}: checkpoint {out / f'step-{step:06d}'}" in err
    assert "--resume auto" in err.strip().splitlines()[-1] and "Traceback" not in err
    ckpt.verify_checkpoint(out / f"step-{step:06d}")
    assert not (out / "lora").exists()  # not finished: no final LoRA
    _resume_matches(tiny_sd15, tiny_parquet, out, reference, step + 2)


def _worker(model, parquet, out, signame, when, step, count, *extra):
    return subprocess.run([sys.executable, str(WORKER), signame, when, str(step), str(count), "0",
                           *_args(model, parquet, out, "train.max_steps=100000", *extra)],
                          capture_output=True, text=True, env=_env(), timeout=300)


def test_a_signal_during_a_checkpoint_write(reference, tiny_sd15, tiny_parquet, tmp_path):
    """SIGTERM while step 2's checkpoint is written: the write completes (atomic, verified), the run stops
    there without a second write, and resumes to the uninterrupted losses."""
    out = tmp_path / "run"
    r = _worker(tiny_sd15, tiny_parquet, out, "SIGTERM", "write", 2, 1)
    assert r.returncode == 143, r.stderr[-2000:]
    assert f"stopped by SIGTERM after step 2: checkpoint {out / 'step-000002'}" in r.stderr
    ckpt.verify_checkpoint(out / "step-000002")
    assert [p.name for p in out.glob("step-*")] == ["step-000002"] and not list(out.glob(".tmp-*"))
    _resume_matches(tiny_sd15, tiny_parquet, out, reference, 4)


def test_a_signal_during_training_mid_step(reference, tiny_sd15, tiny_parquet, tmp_path):
    """SIGINT inside step 3 (after its forward pass): step 3 is completed and checkpointed, no traceback."""
    out = tmp_path / "run"
    r = _worker(tiny_sd15, tiny_parquet, out, "SIGINT", "step", 3, 1)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "stopped by SIGINT after step 3" in r.stderr and "KeyboardInterrupt" not in r.stderr
    assert len(_losses(out)) == 3
    ckpt.verify_checkpoint(out / "step-000003")
    _resume_matches(tiny_sd15, tiny_parquet, out, reference, 5)


def test_a_second_signal_exits_at_once(reference, tiny_sd15, tiny_parquet, tmp_path):
    """Two SIGINTs while step 4's checkpoint is written: the process exits at once, leaving the half-written
    checkpoint in a .tmp-* folder; the next start removes it and resumes from step 2."""
    out = tmp_path / "run"
    r = _worker(tiny_sd15, tiny_parquet, out, "SIGINT", "write", 4, 2)
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-2000:]
    assert "SIGINT again: exiting at once" in r.stderr
    assert [p.name for p in out.glob("step-*")] == ["step-000002"]
    assert list(out.glob(".tmp-step-000004-*"))
    _resume_matches(tiny_sd15, tiny_parquet, out, reference, 5)
    assert not list(out.glob(".tmp-*"))


def test_sigterm_to_the_process_group_with_loader_workers(reference, tiny_sd15, tiny_parquet, tmp_path):
    """Slurm at its time limit (and scancel) signals the whole process group: the torch backend's loader
    workers must leave SIGTERM to the training process, which checkpoints and stops them (before, the workers
    died first and the run ended in PyTorch's "DataLoader worker is killed" error without a checkpoint)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ncp.train", *_args(tiny_sd15, tiny_parquet, out,
                                                                       "train.max_steps=100000",
                                                                       "data.num_workers=2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the training process and its loader workers
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    step = len(_losses(out))
    assert f"stopped by SIGTERM after step {step}" in err and "Traceback" not in err
    ckpt.verify_checkpoint(out / f"step-{step:06d}")


ABANDONED = """
import sys
from ncp.data.options import LoaderOptions
from ncp.data.sources import build_source

source = build_source(LoaderOptions(sources=(sys.argv[1],), resolution=16, batch_size=2, backend="torch",
                                    num_workers=2, absolute_winners=False))
kept = iter(source)  # a generator dropped mid-epoch and still referenced at exit (a stored traceback, a cycle)
next(kept)
print("one batch", flush=True)
"""


def test_a_process_with_an_unclosed_torch_loader_exits(tiny_parquet, tmp_path):
    """The loader workers ignore SIGTERM (above); multiprocessing's exit hook stops daemonic children with
    SIGTERM and joins them, so an iterator nobody closed held the process at exit forever (a pytest run hung
    after its summary). ncp stops its live workers first."""
    script = tmp_path / "abandon.py"
    script.write_text(ABANDONED)
    proc = subprocess.run([sys.executable, str(script), str(tiny_parquet)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0 and "one batch" in proc.stdout, proc.stderr[-2000:]

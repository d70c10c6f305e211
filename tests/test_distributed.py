"""Two CPU processes (gloo): disjoint data per rank, identical LoRA after steps, one checkpoint, resume."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
ARGS = ["--config=default", "data.backend=torch", "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "lora.rank=4",
        "objective.name=dpo", "objective.beta=5000", "data.absolute_winners=false",
        "optim.lr=1e-3", "logging.progress=false", "logging.tensorboard=false", "train.report=false"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_ranks_see_disjoint_pairs_and_stay_in_sync(tiny_sd15, tiny_parquet, tmp_path):
    worker = Path(__file__).parent / "dist_worker.py"
    subprocess.run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(worker),
                    str(tmp_path), f"model.path={tiny_sd15}",
                    f"data.sources=[{tiny_parquet}]", f"train.output_dir={tmp_path}/o", *ARGS],
                   check=True, env=_env(), capture_output=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["indices"]) == len(r1["indices"]) == 4  # 2 steps x 2 pairs
    assert not set(r0["indices"]) & set(r1["indices"])
    assert r0["lora"].keys() == r1["lora"].keys() and r0["lora"]
    for name in r0["lora"]:
        assert torch.equal(r0["lora"][name], r1["lora"][name]), name
    assert any(t.abs().sum() > 0 for n, t in r0["lora"].items() if "lora_B" in n)  # it did train


def _free_port() -> int:
    """A free rendezvous port: the default 29500 may still be held by the launch before (seen once in CI)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(model, parquet, out, *extra, program=("-m", "ncp.train"), check=True):
    # --multi_gpu is accelerate's torch.distributed launcher; without GPUs the ranks run on the CPU over gloo
    # (its --cpu flag would start a single process).
    cmd = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", *program, f"model.path={model}",
           f"data.sources=[{parquet}]", f"train.output_dir={out}", "objective.name=dpo", "train.checkpoint_every=2",
           "optim.warmup_steps=10",
           *ARGS, *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=check)


def test_accelerate_launch_checkpoints_once_and_resumes(tiny_sd15, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    _launch(tiny_sd15, tiny_parquet, out, "train.max_steps=2")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # only rank 0 logs
    assert all(m["train/world_size"] == 2 for m in lines)
    # warmup counts optimizer steps, not processes: lr(step s) = s x 1e-3 / 10 (warmup_steps=10)
    assert [m["train/lr"] for m in lines] == pytest.approx([1e-4, 2e-4])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", ".tmp"))) == ["step-000002"]
    state = json.loads((out / "step-000002" / "state.json").read_text())
    # 11 untied pairs, 5 per rank, batches of 2: two batches end each rank's epoch, and the source that owns the
    # epoch counter moves to the next epoch's start as it hands out an epoch's last batch
    assert state["data"]["world_size"] == 2
    assert (state["data"]["epoch"], state["data"]["sample_in_epoch"]) == (1, 0)
    _launch(tiny_sd15, tiny_parquet, out, "train.max_steps=4", "train.resume=latest")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert (out / "step-000004" / "state.json").is_file()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_sd15, tiny_parquet, tmp_path):
    """SIGTERM to rank 1 alone, inside its step 3 (tests/signal_worker.py): the ranks agree (an all-reduced stop
    flag), both finish step 3, its checkpoint is written once, both exit 143 saying how to resume; the resumed
    run has the losses of an uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    _launch(tiny_sd15, tiny_parquet, full, "train.max_steps=4")
    worker = Path(__file__).parent / "signal_worker.py"
    r = _launch(tiny_sd15, tiny_parquet, part, "train.max_steps=50",
                program=(str(worker), "SIGTERM", "step", "3", "1", "1"), check=False)
    assert r.returncode != 0
    said = f"stopped by SIGTERM after step 3: checkpoint {part / 'step-000003'}"
    assert sum(line.startswith(said) for line in r.stderr.splitlines()) == 2, r.stderr[-3000:]  # each rank
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    from ncp.checkpoint import verify_checkpoint

    verify_checkpoint(part / "step-000003")
    _launch(tiny_sd15, tiny_parquet, part, "train.max_steps=4", "train.resume=auto")
    losses = [[json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()] for out in (full, part)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-9)

"""Checkpoints load without running code; `--resume auto`; an unknown tap is a clean error."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from ncp import checkpoint as ckpt
from ncp.train import main

from fixtures import cli_args


class _Exploit:
    """What a hostile trainer_state.pt holds: unpickling it would run a command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def test_a_planted_pickle_is_refused_by_name_and_not_run(tmp_path):
    opt, sched = _optimizer()
    folder = ckpt.save_checkpoint(tmp_path, 3, lambda d: None, opt, sched, {"epoch": 0}, {}, keep=2)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Exploit(str(marker))}, folder / "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt: refused: it holds Python objects"):
        ckpt.load_trainer_state(folder, opt, sched)
    assert not marker.exists()


def test_trainer_state_round_trips_as_tensors_and_plain_data(tmp_path):
    opt, sched = _optimizer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    folder = ckpt.save_checkpoint(tmp_path, 5, lambda d: None, opt, sched, {"epoch": 1, "sample_in_epoch": 4},
                                  {"a": 1}, keep=2)
    want = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    opt2, sched2 = _optimizer()
    state = ckpt.load_trainer_state(folder, opt2, sched2)
    assert state == {"step": 5, "data": {"epoch": 1, "sample_in_epoch": 4}}
    assert (random.random(), np.random.random(), torch.rand(1).item()) == want
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    torch.load(folder / "trainer_state.pt", weights_only=True)  # no code objects in it


def test_find_checkpoint_auto(tmp_path):
    assert ckpt.find_checkpoint(tmp_path, "auto") is None
    with pytest.raises(FileNotFoundError, match="latest"):
        ckpt.find_checkpoint(tmp_path, "latest")
    opt, sched = _optimizer()
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, lambda d: None, opt, sched, {}, {}, keep=3)
    assert ckpt.find_checkpoint(tmp_path, "auto") == ckpt.find_checkpoint(tmp_path, "latest") == tmp_path / "step-000004"


def _args(model, parquet, out, *extra):
    return cli_args(model, parquet, out, "objective.name=dpo", "objective.beta=5000", "train.checkpoint_every=1",
                    *extra)


def test_resume_auto_starts_then_continues(tiny_sd15, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1", "--resume", "auto")) == 0
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=2", "--resume", "auto")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 and sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002"]


def test_unknown_tap_is_a_clean_error(tiny_sd15, tiny_parquet, tmp_path, capsys):
    assert main(_args(tiny_sd15, tiny_parquet, tmp_path / "t", "objective.name=ncp-dpo",
                      "objective.taps=[middle]", "train.max_steps=1")) == 2
    assert "objective.taps: 'middle'" in capsys.readouterr().err

"""The shipped recipes (configs/*.yaml) load through the real config code and keep the paper's values.

A typo in a key, a wrong type or a drifted hyperparameter fails here, not on a GPU
an hour into a run. Paper values: shared/design/METHOD.md, "Paper hyperparameters".
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ncp.config import load_config
from ncp.objectives import OBJECTIVES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"sd15": dict(resolution=512, warmup=500, taps=["mid"]),
          "sdxl": dict(resolution=1024, warmup=200, taps=["paper"])}
RECIPES = [(model, objective) for model in MODELS for objective in OBJECTIVES]
EFFECTIVE_BATCH = 512  # pairs per optimizer step


def _path(model: str, objective: str) -> Path:
    return CONFIGS / f"{model}_{objective}.yaml"


def test_every_recipe_is_shipped_and_nothing_else():
    expected = {_path(m, o).name for m, o in RECIPES}
    shipped = {p.name for p in CONFIGS.glob("sd*_*.yaml")}
    assert shipped == expected


@pytest.mark.parametrize("model,objective", RECIPES)
def test_recipe_has_the_paper_values(model, objective):
    path = _path(model, objective)
    cfg = load_config(path)  # unknown keys and wrong types raise ConfigError naming the key
    paper = MODELS[model]
    assert cfg.model.kind == model
    assert cfg.objective.name == objective
    assert cfg.lora.rank == 64 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.optim.use_8bit == "on"
    assert cfg.model.weight_dtype in ("bf16", "fp16")  # frozen weights in half precision
    assert cfg.data.resolution == paper["resolution"]
    assert cfg.optim.warmup_steps == paper["warmup"]
    assert cfg.train.max_steps == 2000
    if objective.endswith("dpo"):
        assert cfg.objective.beta == 5000.0
    if objective.startswith("ncp-"):
        assert cfg.objective.taps == paper["taps"]

    # The effective batch documented in the header comment must be what the values give.
    text = path.read_text()
    found = re.search(r"batch_size (\d+) x grad_accum (\d+) x (\d+) GPUs? = (\d+) pairs", text)
    assert found, f"{path.name}: no 'batch_size B x grad_accum A x G GPU = N pairs' comment"
    bs, accum, gpus, total = map(int, found.groups())
    assert (bs, accum) == (cfg.data.batch_size, cfg.train.grad_accum)
    assert bs * accum * gpus == total == EFFECTIVE_BATCH
    assert cfg.optim.lr == pytest.approx(1e-8 * EFFECTIVE_BATCH)  # Diffusion-DPO's scaled learning rate


@pytest.mark.parametrize("model,objective", RECIPES)
def test_recipe_opens_with_the_command_that_runs_it(model, objective):
    path = _path(model, objective)
    head = path.read_text().split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in head.splitlines())
    assert f"-m ncp.train --config configs/{path.name}" in head

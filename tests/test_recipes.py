"""The shipped recipes (configs/<model>.yaml, the objective as an override) load through the real config
code and keep the paper's values.

A typo in a key, a wrong type or a drifted hyperparameter fails here, not on a GPU
an hour into a run. Paper values: docs/method.md, "The paper's hyperparameters".
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ncp.config import load_config
from ncp.objectives import OBJECTIVES

CONFIGS = Path(__file__).resolve().parents[1] / "python" / "ncp" / "configs"
MODELS = {"sd15": dict(resolution=512, warmup=500, taps=["mid"]),
          "sdxl": dict(resolution=1024, warmup=200, taps=["paper"])}
RECIPES = [(model, objective) for model in MODELS for objective in OBJECTIVES]
EFFECTIVE_BATCH = 512  # pairs per optimizer step


def _path(model: str) -> Path:
    return CONFIGS / f"{model}.yaml"


def test_one_recipe_per_model_and_nothing_else():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {_path(m).name for m in MODELS} | {"default.yaml", "sd3.yaml", "flux.yaml"}


FLOW_SIGMAS = {"sd3": "logit_normal", "flux": "uniform"}  # each as diffusers' LoRA script of the family draws them


@pytest.mark.parametrize("model,objective", [(m, o) for m in FLOW_SIGMAS for o in OBJECTIVES])
def test_the_flow_recipes_load_for_every_objective(model, objective):
    """SD3.5's and Flux.1's recipes (not the paper's: it has no runs of them): the family, its sigma density,
    LoRA on both streams' attention projections, the transformer's own taps, and the documented effective batch."""
    path = _path(model)
    cfg = load_config(path, [f"objective.name={objective}"])
    assert cfg.model.kind == model and cfg.model.sigma_sampling == FLOW_SIGMAS[model]
    assert set(cfg.lora.target_modules) == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out"}
    assert cfg.data.resolution == 1024
    if objective.startswith("ncp-"):
        assert cfg.objective.taps == ["auto"]
    text = path.read_text()
    bs, accum, gpus, total = map(int, re.search(r"batch_size (\d+) x grad_accum (\d+) x (\d+) GPUs? = (\d+) pairs",
                                                text).groups())
    assert (bs, accum) == (cfg.data.batch_size, cfg.train.grad_accum) and bs * accum * gpus == total
    assert bs * accum * gpus == EFFECTIVE_BATCH and cfg.optim.lr == pytest.approx(1e-8 * EFFECTIVE_BATCH)
    assert f"-m ncp.train --config {model} objective.name=" in text.split("\n\n", 1)[0]


@pytest.mark.parametrize("model,objective", RECIPES)
def test_recipe_has_the_paper_values(model, objective):
    path = _path(model)
    cfg = load_config(path, [f"objective.name={objective}"])  # unknown keys and wrong types raise ConfigError
    paper = MODELS[model]
    assert cfg.model.kind == model
    assert cfg.objective.name == objective
    assert cfg.lora.rank == 64 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.optim.use_8bit == "on"
    # frozen weights in half precision on the GPU, except where the perceptual path runs fp32 (issue 26)
    from ncp.trainer import frozen_weight_dtype

    half = not objective.startswith("ncp-") or cfg.model.perceptual_precision not in ("auto", "fp32")
    assert frozen_weight_dtype(cfg, on_gpu=True) == (torch.bfloat16 if half else torch.float32)
    assert cfg.data.resolution == paper["resolution"]
    assert cfg.optim.warmup_steps == paper["warmup"]
    assert cfg.train.max_steps == 2000
    if objective.endswith("dpo"):
        assert cfg.objective.beta == 5000.0
    if objective.endswith("cpo"):
        assert cfg.objective.beta_cpo == 5000.0 and cfg.objective.cpo_lambda == 1.0
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


@pytest.mark.parametrize("model", MODELS)
def test_recipe_opens_with_the_commands_that_run_it(model):
    path = _path(model)
    head = path.read_text().split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in head.splitlines())
    assert f"-m ncp.train --config {model} objective.name=" in head
    assert load_config(path).objective.name == "ncp-dpo"  # the paper's method without an override
    listed = re.search(r"# Objectives: (.*) \(", head).group(1).split(", ")
    assert listed == list(OBJECTIVES)  # every objective is named in the header

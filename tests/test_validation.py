"""Validation images while training: grids under the run folder and in TensorBoard, resume-safe, and a run
trains the same with or without them."""
import json

import numpy as np
import pytest

from ncp.config import ConfigError, load_config
from ncp.train import main
from ncp.validation import read_grid

from fixtures import cli_args


def _args(model, parquet, out, *extra):
    return cli_args(model, parquet, out, "optim.lr=1e-2", "objective.name=dpo", "objective.beta=5000",
                    "train.cpu_threads=1", *extra)


def _validation(prompts):
    return [f"logging.validation_prompts={prompts}", "logging.validation_every=2", "logging.validation_seeds=2",
            "logging.validation_steps=2", "logging.validation_guidance=2.0"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\n\ntwo blue balls\n")
    return path


def test_validation_grids_resume_and_training(tiny_sd15, tiny_parquet, prompts, tmp_path):
    """Grids at steps 2, 4 and the last step 5; the losses equal a run without validation (its sampling
    leaves the RNG alone); a run stopped at step 2 and resumed draws the same step-4 grid; the LoRA
    column moves away from the base column as training goes on."""
    plain, full, part = tmp_path / "plain", tmp_path / "full", tmp_path / "part"
    common = ["train.checkpoint_every=2"]
    assert main(_args(tiny_sd15, tiny_parquet, plain, *common, "train.max_steps=5")) == 0
    assert main(_args(tiny_sd15, tiny_parquet, full, *common, "train.max_steps=5", "logging.tensorboard=true",
                      *_validation(prompts))) == 0
    assert sorted(p.name for p in (full / "validation").iterdir()) == [
        "step-000002.png", "step-000004.png", "step-000005.png"]
    assert _losses(full) == _losses(plain)

    assert main(_args(tiny_sd15, tiny_parquet, part, *common, "train.max_steps=2", *_validation(prompts))) == 0
    assert main(_args(tiny_sd15, tiny_parquet, part, *common, "train.max_steps=4", *_validation(prompts))
                + ["--resume", "latest"]) == 0
    for step in (2, 4):
        name = f"step-{step:06d}.png"
        np.testing.assert_array_equal(read_grid(part / "validation" / name), read_grid(full / "validation" / name))
    assert not np.array_equal(read_grid(full / "validation" / "step-000002.png"),
                              read_grid(full / "validation" / "step-000005.png"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("validation")] == [2, 4, 5]


def test_validation_config_errors(prompts):
    with pytest.raises(ConfigError, match="logging.validation_prompts"):
        load_config(None, ["logging.validation_every=10"])
    with pytest.raises(ConfigError, match="logging.validation_seeds"):
        load_config(None, [f"logging.validation_prompts={prompts}", "logging.validation_seeds=0"])


def test_missing_prompt_file_is_a_named_error(tiny_sd15, tiny_parquet, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1", "logging.validation_every=1",
                      f"logging.validation_prompts={tmp_path}/no-prompts.txt")) == 2
    assert "no-prompts.txt" in capsys.readouterr().err

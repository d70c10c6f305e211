"""A training run prints no third-party notice a user cannot act on (issue 16, part 6)."""
import subprocess
import sys

from fixtures import cli_args

NOTICES = ("requires torchvision", "should be kept in float32", "No LoRA keys associated",
           "Loading weights", "Loading pipeline components")  # the loaders' bars (issue 24)


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def _notices(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(n in line for n in NOTICES)]


def test_training_with_validation_is_quiet(tiny_sd15, tiny_parquet, tmp_path):
    """Model loading, the step, the LoRA writer and the validation pipeline (a pipeline module import)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    out = _run("-m", "ncp.train", *cli_args(tiny_sd15, tiny_parquet, tmp_path / "run", "train.max_steps=1",
                                            "logging.tensorboard=true"),
               f"logging.validation_prompts={prompts}", "logging.validation_every=1", "logging.validation_steps=2",
               "logging.validation_seeds=1")
    assert _notices(out) == []


def test_sampling_with_a_lora_is_quiet(tiny_sd15, tiny_parquet, tmp_path):
    """The report's sampler (ncp.sampling.load_pipeline) with the run's LoRA, as after the default run."""
    _run("-m", "ncp.train", *cli_args(tiny_sd15, tiny_parquet, tmp_path / "run", "train.max_steps=1",
                                      "logging.tensorboard=true"))
    out = _run("-c", "from ncp.sampling import generate, load_pipeline; "
                     f"pipe = load_pipeline({str(tiny_sd15)!r}, {str(tmp_path / 'run' / 'lora')!r}); "
                     "generate(pipe, ['a red cube'], [0], steps=2)")
    assert _notices(out) == []

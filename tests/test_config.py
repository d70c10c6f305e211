"""Config: YAML + dotted overrides, errors that name the key, --help."""
import subprocess
import sys

import pytest

from ncp.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 2.0e-5\nobjective:\n  name: dpo\n")
    cfg = load_config(f, ["lora.rank=4", "objective.taps=[0,mid]", "data.sources=[a.parquet]", "optim.lr=3e-5",
                          "train.output_dir=123"])
    assert cfg.optim.lr == 3e-5 and cfg.objective.name == "dpo" and cfg.lora.rank == 4
    assert cfg.objective.taps == ["0", "mid"] and cfg.data.sources == ["a.parquet"]
    assert cfg.train.output_dir == "123"  # numeric-looking strings stay strings
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("override,message", [
    ("optim.learning_rate=1", "unknown config key optim.learning_rate"),
    ("optimizer.lr=1", "unknown config section 'optimizer'"),
    ("lora.rank=four", "lora.rank must be an integer"),
    ("lora.rank=2.5", "lora.rank must be an integer"),
    ("objective.name=ipo", "objective.name must be one of"),
    ("data.random_flip=maybe", "data.random_flip must be true or false"),
    ("data.resolution=30", "data.resolution must be a positive multiple of 8"),
    ("lr=1", "must be section.key"),
    ("model.compile_unet=true", "model.compile_unet must be one of False, regional, full; got True"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_unquoted_on_off_no_are_the_options_they_spell(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans: an option spelled that way is the option, in an override or a
    file; a real boolean option keeps its boolean."""
    cfg = load_config(None, ["optim.use_8bit=off", "train.mixed_precision=no", "model.compile_unet=false"])
    assert cfg.optim.use_8bit == "off" and cfg.train.mixed_precision == "no" and cfg.model.compile_unet is False
    assert load_config(None, ["optim.use_8bit=on"]).optim.use_8bit == "on"
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  use_8bit: off\ntrain:\n  mixed_precision: no\n")
    assert load_config(f).optim.use_8bit == "off" and load_config(f).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of auto, no, bf16, fp16; got True"):
        load_config(None, ["train.mixed_precision=yes"])  # no option spelled yes or on


def test_bad_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="unknown config key train.max_step"):
        load_config(f)


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "ncp.train", "--help"], capture_output=True, text=True, check=True)
    for key in ("model.path", "lora.rank", "data.backend", "objective.taps", "optim.use_8bit", "train.resume",
                "logging.tensorboard"):
        assert key in out.stdout


def test_help_shows_what_each_recipe_sets():
    """--help shows the values a run gets: each shipped recipe's where one differs from the code's."""
    out = subprocess.run([sys.executable, "-m", "ncp.train", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())  # argparse wraps nothing in the epilog (raw), but be safe
    assert "lora.rank = 8 (default) | 64 (sd15) | 64 (sdxl) | 64 (sd3) | 64 (flux) [int]; a --config file without it: 64" in text
    assert "model.vae_path = None [str | None]" in text  # no recipe sets it: the code's default alone


def test_config_reference_is_current():
    """docs/config.md is generated from the dataclasses: regenerate it with `python -m ncp.config`."""
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "ncp.config"], capture_output=True, text=True, check=True).stdout
    assert (Path(__file__).parents[1] / "docs" / "config.md").read_text() == out

"""CPU integration: the real CLI on tiny SD1.5 / SDXL models and a tiny parquet file."""
import json
import subprocess
import sys

import pytest
import torch

from ncp.config import load_config
from ncp.data.contract import endless
from ncp.train import main
from ncp.trainer import optimizer_step, setup

from fixtures import cli_args, lora_moves_unet, overrides_of

OBJECTIVES = ["sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo"]


def _args(model, parquet, out, *extra):
    return cli_args(model, parquet, out, "train.max_steps=3", "optim.lr=1e-3", "objective.beta=5000", *extra)


@pytest.mark.parametrize("overrides, named", [
    (["objective.name=kto", "objective.beta=5"], "objective.beta (read by dpo, ncp-dpo)"),
    (["objective.name=dpo", "objective.taps=[mid]"], "objective.taps (read by the ncp-* objectives"),
    (["objective.name=ncp-sft", "objective.cpo_lambda=0"], "objective.cpo_lambda (read by cpo, ncp-cpo)"),
])
def test_an_override_the_objective_does_not_read_is_a_named_error(overrides, named, capsys):
    """objective.name=kto objective.beta=5 used to run, ignoring beta."""
    assert main(overrides + ["--print-config"]) == 2  # the bundled model: the default recipe
    err = capsys.readouterr().err
    assert named in err and "objective.name=" + overrides[0].split("=")[1] in err


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cli_trains_each_objective_and_lora_loads(objective, tiny_sd15, tiny_parquet, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, f"objective.name={objective}",
                      "objective.taps=[multiscale]")) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert ("rewards/accuracy" in lines[0]) == (not objective.endswith("sft"))
    assert ("err/reference_winner" in lines[0]) == objective.endswith("dpo")
    assert (out / "step-000003" / "state.json").is_file()

    assert lora_moves_unet(tiny_sd15, out / "lora") > 1e-6


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cli_trains_sdxl(objective, tiny_sdxl, tiny_parquet, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "xl"
    assert main(_args(tiny_sdxl, tiny_parquet, out, f"objective.name={objective}")) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.load_lora_weights(str(out / "lora"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_one_step_changes_only_lora(tiny_sd15, tiny_parquet, tmp_path):
    """Step 1 moves every lora_B (the B = 0 init gives lora_A no gradient yet); step 2 moves every
    lora_A too. Weight decay is off so only gradients move weights. No base weight changes."""
    cfg = load_config(None, overrides_of(_args(tiny_sd15, tiny_parquet, tmp_path, "optim.weight_decay=0",
                                                "objective.name=ncp-dpo")))
    tr = setup(cfg)
    named = dict(tr.base.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    data = endless(tr.source)
    for step in (1, 2):
        assert optimizer_step(tr, data) is not None
        tr.step += 1
        moved = {n for n, p in named.items() if not torch.equal(p, start[n])}
        lora = {n for n in named if "lora_" in n}
        expect = {n for n in lora if "lora_B" in n} if step == 1 else lora
        assert moved == expect, sorted(moved ^ expect)[:5]
    assert all(p.requires_grad == ("lora_" in n) for n, p in named.items())


def test_resume_reproduces_losses(tiny_sd15, tiny_parquet, tmp_path):
    """Stopped after step 2 and resumed: steps 3-4 have the losses of an uninterrupted run."""
    common = ["objective.name=ncp-dpo", "train.checkpoint_every=2", "data.empty_prompt_prob=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(tiny_sd15, tiny_parquet, full, *common, "train.max_steps=4")) == 0
    assert main(_args(tiny_sd15, tiny_parquet, part, *common, "train.max_steps=2")) == 0
    assert main(_args(tiny_sd15, tiny_parquet, part, *common, "train.max_steps=4") + ["--resume", "latest"]) == 0
    assert _losses(part) == pytest.approx(_losses(full), rel=1e-6, abs=1e-9)
    assert sorted(p.name for p in part.glob("step-*")) == ["step-000002", "step-000004"]


def test_keep_last_checkpoints(tiny_sd15, tiny_parquet, tmp_path):
    out = tmp_path / "k"
    assert main(_args(tiny_sd15, tiny_parquet, out, "objective.name=sft", "train.max_steps=4",
                      "train.checkpoint_every=1", "train.keep_checkpoints=2")) == 0
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000003", "step-000004"]
    assert not list(out.glob(".tmp-*"))


def test_compiled_unet_trains_like_the_eager_one(tiny_sd15, tiny_parquet, tmp_path):
    """model.compile_unet=full: torch.compile (inductor, CPU) on the policy U-Net gives the eager losses."""
    common = ["objective.name=ncp-dpo", "train.max_steps=2"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(_args(tiny_sd15, tiny_parquet, eager, *common)) == 0
    assert main(_args(tiny_sd15, tiny_parquet, compiled, *common, "model.compile_unet=full")) == 0
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4, abs=1e-6)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ncp.train", "--config=default", *args], capture_output=True, text=True)


def test_cli_errors_name_the_problem(tiny_sd15, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    r = _cli("optim.learnig_rate=1")
    assert r.returncode == 2 and "unknown config key optim.learnig_rate" in r.stderr
    r = _cli(f"model.path={tmp_path}/no-such-model", "data.backend=torch")
    assert r.returncode == 2 and "no-such-model does not exist" in r.stderr
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["x"], "label_0": [1.0]}), bad)
    r = _cli(f"model.path={tiny_sd15}", f"data.sources=[{bad}]", "data.backend=torch", "data.resolution=32",
             f"train.output_dir={tmp_path}/o")
    assert r.returncode == 2 and "bad.parquet lacks column(s) ['jpg_0', 'jpg_1', 'label_1']" in r.stderr
    r = _cli(f"model.path={tiny_sd15}", f"data.sources=[{bad}]", "data.backend=rust", "data.resolution=32",
             f"train.output_dir={tmp_path}/o")
    assert r.returncode == 2 and "bad.parquet" in r.stderr and "column" in r.stderr and "Traceback" not in r.stderr
    r = _cli(f"model.path={tiny_sd15}", "data.backend=torch", f"train.output_dir={tmp_path}/none", "--resume", "latest",
             f"data.sources=[{bad}]")
    assert r.returncode == 2


def test_nonfinite_losses_stop_the_run(tiny_sd15, tiny_parquet, tmp_path, monkeypatch, capsys):
    import ncp.trainer as train_mod

    real = train_mod.preference_step

    def poisoned(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_mod, "preference_step", poisoned)
    assert main(_args(tiny_sd15, tiny_parquet, tmp_path, "train.max_nonfinite=2")) == 2
    assert "2 non-finite losses in a row" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").read_text()  # no step was taken, none logged


def test_v_prediction_model_with_accumulation_and_checkpointing(tiny_parquet, tmp_path):
    """A v-prediction model trains (v converted to eps before the reverse step), with gradient
    accumulation (2 micro-batches per step) and gradient checkpointing on."""
    from fixtures import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "vpred", prediction_type="v_prediction")
    out = tmp_path / "run"
    assert main(_args(model, tiny_parquet, out, "objective.name=ncp-dpo", "train.grad_accum=2",
                      "model.gradient_checkpointing=true", "train.max_steps=2")) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(m["train/grad_norm"] > 0 for m in lines)
    state = json.loads((out / "step-000002" / "state.json").read_text())
    assert state["data"]["sample_in_epoch"] == 8  # 2 steps x 2 micro-batches x 2 pairs


def test_report_runs_on_torchs_default_threads(tiny_sd15, tiny_parquet, tmp_path, monkeypatch):
    """train.cpu_threads pins the training loop only: the report after it (the loader done) gets every thread
    torch had before the run."""
    import ncp.train

    seen, before = [], torch.get_num_threads()
    monkeypatch.setattr(ncp.train, "world_report", lambda *a: seen.append(torch.get_num_threads()) or {})
    torch.set_num_threads(3)  # a default the run's cpu_threads=1 differs from, on any machine
    try:
        assert main(_args(tiny_sd15, tiny_parquet, tmp_path / "run", "train.max_steps=1", "train.report=true",
                          "train.cpu_threads=1")) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [3]


def test_default_command_trains_on_the_bundle(tmp_path):
    """`python -m ncp.train` with only size overrides: the bundled world, the default config (KTO, Rust
    loader) — a few steps, then the LoRA loads into the bundled pipeline."""
    from diffusers import StableDiffusionPipeline

    from ncp.paths import bundle_path

    out = tmp_path / "default"
    r = subprocess.run([sys.executable, "-m", "ncp.train", "train.max_steps=2", "data.batch_size=2",
                        "train.report=false", "train.checkpoint_every=0", "logging.tensorboard=false",
                        f"train.output_dir={out}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and "err/reference_winner" in lines[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(bundle_path("model")), safety_checker=None)
    pipe.load_lora_weights(str(out / "lora"))


@pytest.mark.parametrize("extra, recipe", [
    ([], "default.yaml"),  # the bundled model
    (["model.path=/models/stable-diffusion-v1-5"], "sd15.yaml"),
    (["model.path=stabilityai/stable-diffusion-xl-base-1.0"], "sdxl.yaml"),
    (["model.path=/models/custom", "model.kind=sdxl"], "sdxl.yaml"),
    (["--config", "sd15", "model.path=bundle"], "sd15.yaml"),
])
def test_a_run_naming_a_model_gets_its_family_recipe(extra, recipe):
    """`python -m ncp.train model.path=/models/sd15` used to train the bundled world's recipe (KTO, 32 px,
    rank 8, absolute winners) on an SD1.5 model."""
    from ncp.train import recipe as recipe_of

    config = extra[extra.index("--config") + 1] if "--config" in extra else None
    overrides = [e for e in extra if "=" in e]
    path, why = recipe_of(config, overrides)
    assert path.name == recipe and path.is_file(), why


def test_a_named_model_does_not_inherit_the_bundled_world(tiny_sd15, capsys):
    out = subprocess.run([sys.executable, "-m", "ncp.train", f"model.path={tiny_sd15}", "--print-config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(out.stdout)
    assert cfg["data"]["resolution"] == 512 and cfg["lora"]["rank"] == 64  # sd15.yaml, not default.yaml's 32 / 8
    assert cfg["objective"]["name"] == "ncp-dpo" and "recipe: " in out.stderr and "sd15.yaml" in out.stderr


def test_a_world_built_by_ncp_world_gets_the_worlds_recipe(tmp_path):
    """`python -m ncp.world build --out DIR` then `ncp.train model.path=DIR/model` used to get the sd15 GPU recipe
    (512 px, 8-bit AdamW, which stops a CPU run); an SD1.5 world trains on the bundled world's default.yaml, a
    flow world on its family's recipe, and a world.json that is not JSON is named in the error."""
    from ncp.config import ConfigError
    from ncp.train import recipe as recipe_of

    for name, family in (("w15", "sd15"), ("w3", "sd3")):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "world.json").write_text(json.dumps({"seed": 1, "family": family}))
    path, why = recipe_of(None, [f"model.path={tmp_path / 'w15' / 'model'}"])
    assert path.name == "default.yaml" and "world.json" in why
    path, _ = recipe_of(None, [f"model.path={tmp_path / 'w3' / 'model'}", "model.kind=sd3"])
    assert path.name == "sd3.yaml"
    (tmp_path / "w15" / "world.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"w15/world\.json"):
        recipe_of(None, [f"model.path={tmp_path / 'w15' / 'model'}"])
    assert recipe_of("sd15", [f"model.path={tmp_path / 'w15' / 'model'}"])[0].name == "sd15.yaml"  # --config wins

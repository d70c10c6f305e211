"""A run folder belongs to one run (ncp.run_dir), checkpoints are verified and fall back (ncp.checkpoint), a resume
checks the config (ncp.config.RESUME_MAY_CHANGE), the logs survive resumes, and bad settings are named errors."""
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from ncp import checkpoint as ckpt
from ncp.config import RESUME_MAY_CHANGE, ConfigError, load_config, resume_differences, to_dict
from ncp.metrics import truncate_metrics
from ncp.run_dir import RunLock
from ncp.train import main

from fixtures import cli_args, random_pairs, write_pickapic_parquet


def _args(model, parquet, out, *extra):
    return cli_args(model, parquet, out, "objective.name=dpo", "objective.beta=5000", "optim.lr=1e-3",
                    "train.checkpoint_every=1", "data.empty_prompt_prob=0.5", *extra)


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")][0]


@pytest.fixture(scope="module")
def reference(tiny_sd15, tiny_parquet, tmp_path_factory):
    """The losses of an uninterrupted 5-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=5")) == 0
    return _losses(out)


# ---------------------------------------------------------------- one run per folder


def test_a_folder_in_use_is_refused_naming_the_holder(tiny_sd15, tiny_parquet, tmp_path, capsys):
    """Another process holds run.lock (as a running run does): the second run is refused, naming its pid."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; from ncp.run_dir import RunLock; RunLock(__import__('pathlib')"
                               f".Path({str(out)!r})).acquire(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1")) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"{out} is in use by another run (pid {holder.pid} on host" in err
    assert not (out / "metrics.jsonl").exists()
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1")) == 0  # the lock went with its process


def test_the_lock_is_exclusive_and_released(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(OSError, match=r"in use by another run \(pid \d+ on host"):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tiny_sd15, tiny_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=3", "train.keep_checkpoints=5")) == 0
    lora = (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a run (step-000001, step-000002, step-000003, 2 more)" in err and "--overwrite" in err
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora and _steps(out) == [1, 2, 3]
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1", "--resume", "auto", "--overwrite")) == 2
    assert "--overwrite clears the run that train.resume=auto would continue" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1", "--overwrite")) == 0
    assert _steps(out) == [1] and sorted(p.name for p in out.glob("step-*")) == ["step-000001"]
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is cleared


# ---------------------------------------------------------------- checkpoint integrity


def _optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _save(folder, step):
    opt, sched = _optimizer()
    return ckpt.save_checkpoint(folder, step, lambda d: (d / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 64),
                                opt, sched, {"epoch": 0}, {}, keep=5)


def test_the_manifest_names_a_truncated_or_altered_file(tmp_path):
    folder = _save(tmp_path, 1)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "pytorch_lora_weights.safetensors", "state.json", "trainer_state.pt"]
    ckpt.verify_checkpoint(folder)
    lora = folder / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"x" * 63 + b"y")  # one byte flipped, same size
    with pytest.raises(ckpt.CheckpointError, match=r"pytorch_lora_weights\.safetensors does not match its xxh3"):
        ckpt.verify_checkpoint(folder)
    lora.write_bytes(b"x" * 10)
    with pytest.raises(ckpt.CheckpointError, match=r"safetensors is truncated: 10 bytes, manifest.json says 64"):
        ckpt.verify_checkpoint(folder)
    (folder / "state.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"state\.json is missing"):
        ckpt.verify_checkpoint(folder)


def test_find_checkpoint_falls_back_and_says_why(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    for step in (2, 3):
        path = tmp_path / f"step-{step:06d}" / "trainer_state.pt"
        path.write_bytes(path.read_bytes()[:100])
    assert ckpt.find_checkpoint(tmp_path, "latest") == tmp_path / "step-000001"
    assert "skipping step-000003" in caplog.text and "trainer_state.pt is truncated" in caplog.text
    assert "resuming from step-000001, the newest intact checkpoint (skipped step-000003, step-000002)" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt is truncated"):
        ckpt.find_checkpoint(tmp_path, str(tmp_path / "step-000003"))  # an explicit folder: no fallback
    (tmp_path / "step-000001" / "state.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        ckpt.find_checkpoint(tmp_path, "auto")


@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "trainer_state.pt", "state.json"])
def test_a_truncated_newest_checkpoint_falls_back_and_the_logs_follow(name, reference, tiny_sd15, tiny_parquet,
                                                                     tmp_path, caplog):
    """The newest checkpoint's file cut short: --resume auto takes the one before, says so, and the run goes
    on to the uninterrupted losses, each step logged once (metrics.jsonl truncated to the resumed step)."""
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=4")) == 0
    bad = out / "step-000004" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (out / ".tmp-step-000005-deadbeef").mkdir()  # left by a kill during a write
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=5", "--resume", "auto")) == 0
    assert f"skipping step-000004: {bad} is truncated" in caplog.text
    assert "resuming from step-000003, the newest intact checkpoint (skipped step-000004)" in caplog.text
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert _losses(out) == pytest.approx(reference, rel=1e-6, abs=1e-9)
    assert not list(out.glob(".tmp-*"))
    ckpt.verify_checkpoint(out / "step-000004")  # written again, intact


def test_an_explicit_corrupt_checkpoint_is_a_named_error(tiny_sd15, tiny_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1")) == 0
    state = out / "step-000001" / "state.json"
    state.write_text(state.read_text()[:-5])
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=2", "--resume", str(out / "step-000001"))) == 2
    err = capsys.readouterr().err
    assert f"{state} is truncated" in err and "Traceback" not in err


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    truncate_metrics(path, 0)
    assert path.read_text() == ""


# ---------------------------------------------------------------- resume checks the config


def test_every_field_that_may_change_exists():
    fields = {f"{s}.{k}" for s, values in to_dict(load_config(None, [])).items() for k in values}
    sections = {k.split(".")[0] for k in fields}
    assert {k for k in RESUME_MAY_CHANGE if not k.endswith(".*")} <= fields
    assert {k[:-2] for k in RESUME_MAY_CHANGE if k.endswith(".*")} <= sections


def test_resume_differences_lists_every_field_and_ignores_what_may_change():
    saved = to_dict(load_config(None, ["lora.rank=4", "train.max_steps=10", "logging.log_every=5"]))
    now = load_config(None, ["lora.rank=8", "objective.name=sft", "train.max_steps=20", "data.num_workers=0"])
    assert resume_differences(saved, now) == ["lora.rank: 4 -> 8", "objective.name: 'ncp-dpo' -> 'sft'"]
    del saved["objective"]["name"]  # a key older checkpoints lack is not compared
    assert resume_differences(saved, now) == ["lora.rank: 4 -> 8"]


@pytest.fixture(scope="module")
def checkpointed(tiny_sd15, tiny_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=1")) == 0
    return out


@pytest.mark.parametrize("change, shown", [
    ("objective.name=sft", "objective.name: 'dpo' -> 'sft'"),
    ("data.sources=[OTHER]", "data.sources: ["),
    ("lora.alpha=16", "lora.alpha: 8.0 -> 16.0"),
    ("lora.rank=8", "lora.rank: 4 -> 8"),
    ("data.batch_size=1", "data.batch_size: 2 -> 1"),
    ("train.seed=3", "train.seed: 0 -> 3"),
])
def test_resume_refuses_a_changed_field(change, shown, checkpointed, tiny_sd15, tiny_parquet, tmp_path, capsys):
    other = write_pickapic_parquet(tmp_path / "other.parquet", random_pairs(6, seed=1))
    change = change.replace("OTHER", str(other))
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=2", change, "--resume", "latest")) == 2
    err = _one_line_error(capsys)
    assert "cannot resume from" in err and "1 setting(s)" in err and shown in err
    assert _steps(out) == [1]  # nothing trained, nothing logged


def test_resume_lists_every_changed_field_in_one_error(checkpointed, tiny_sd15, tiny_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=2", "objective.name=sft", "lora.rank=8",
                      "lora.alpha=16", "data.num_workers=1", "logging.log_every=2", "--resume", "latest")) == 2
    err = _one_line_error(capsys)
    assert "3 setting(s)" in err and "lora.rank: 4 -> 8; lora.alpha: 8.0 -> 16.0" in err
    assert "objective.name: 'dpo' -> 'sft'" in err and "num_workers" not in err and "log_every" not in err


# ---------------------------------------------------------------- a diverged run writes nothing


def test_a_run_that_diverges_on_its_last_step_writes_no_lora(tiny_sd15, tiny_parquet, tmp_path, monkeypatch,
                                                             capsys):
    import ncp.train as train_mod

    real = train_mod.optimizer_step

    def diverging(tr, data):
        metrics = real(tr, data)
        if tr.step == 2:  # step 3, the last one: a finite loss, then weights that overflowed
            with torch.no_grad():
                tr.params[0].fill_(float("inf"))
        return metrics

    monkeypatch.setattr(train_mod, "optimizer_step", diverging)
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, tiny_parquet, out, "train.max_steps=3")) == 2
    err = capsys.readouterr().err
    assert "the LoRA weights are not finite after step 3 (the run diverged)" in err
    assert f"Last checkpoint: {out / 'step-000002'}" in err
    assert not (out / "lora").exists() and not (out / "step-000003").exists()


# ---------------------------------------------------------------- named errors


@pytest.mark.parametrize("override, message", [
    ("data.num_workers=-1", "data.num_workers must be 0 or positive"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be 0 (only at the end) or positive"),
    ("train.device=potato", "train.device must be one of auto, cpu, cuda; got 'potato'"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_cli_names_bad_settings(tiny_sd15, tiny_parquet, tmp_path, capsys):
    for override, message in [("data.num_workers=-1", "data.num_workers must be 0 or positive"),
                              ("train.device=potato", "train.device must be one of auto, cpu, cuda")]:
        assert main(_args(tiny_sd15, tiny_parquet, tmp_path / "o", override)) == 2
        assert message in _one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_named(tiny_sd15, tiny_parquet, tmp_path, capsys):
    assert main(_args(tiny_sd15, tiny_parquet, tmp_path / "o", "train.device=cuda")) == 2
    assert "train.device=cuda, but torch sees no CUDA device" in _one_line_error(capsys)


def test_target_modules_matching_nothing_is_named(tiny_sd15, tiny_parquet, tmp_path, capsys):
    assert main(_args(tiny_sd15, tiny_parquet, tmp_path / "o", "lora.target_modules=[nope]")) == 2
    line = _one_line_error(capsys)
    assert "lora.target_modules ['nope'] matched no module of the U-Net" in line and "to_out.0" in line


def test_a_hub_id_without_network_is_named_at_once(tmp_path, monkeypatch):
    """No network (HF_HUB_OFFLINE, or a hub that does not answer) and nothing in the hub cache: an error at
    once; with a local copy in the cache, that copy."""
    from huggingface_hub import constants

    from ncp.models import ModelLoadError, hub_reachable, resolve_model_path

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"no network and no local copy of org/model \(HF_HUB_OFFLINE is set"):
        resolve_model_path("org/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"no network and no local copy of org/model \(http://127.0.0.1:9 does"):
        resolve_model_path("org/model")
    assert time.perf_counter() - start < 5
    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / ("a" * 40)
    (snapshot / "unet").mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    assert resolve_model_path("org/model") == str(snapshot)
    hub_reachable.cache_clear()


def test_tensorboard_drops_the_steps_after_the_resumed_one(tmp_path):
    """A run resumed at step 2 over a run that logged steps 1-4: TensorBoard shows 1, 2 of the first and 3-5 of
    the second (purge_step), as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ncp.metrics import MetricsLogger

    for start, stop, offset in ((0, 4, 0.0), (2, 5, 10.0)):
        log = MetricsLogger(tmp_path, stop, start, enabled=True, progress=False, tensorboard=True)
        for step in range(start + 1, stop + 1):
            log.log(step, {"loss": offset + step})
        log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1), (2, 2), (3, 13), (4, 14), (5, 15)]
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 13, 14, 15]

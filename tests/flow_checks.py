"""Checks the flow-matching families' tests (test_sd3.py, test_flux.py) share: the CLI arguments of a tiny run,
resume, training from the cache against the pixels, the LoRA in the pipeline against the training module, and a GPU
step against the CPU's."""
from __future__ import annotations

import json

import pytest
import torch

from fixtures import cli_args

CAPTIONS = ["a red cube on a blue floor", "two green balls"]


def flow_args(model, data, out, *extra):
    """A tiny ``ncp.train`` run of a flow pipeline: 64 px (8 x 8 latents), 2 steps, one thread."""
    return cli_args(model, data, out, "data.resolution=64", "train.max_steps=2", "optim.lr=1e-3",
                    "train.cpu_threads=1", *extra)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


FLOW_TARGETS = "lora.target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out]"


def check_objective_trains(objective: str, model, parquet, tmp_path, text_len: int) -> dict:
    """``python -m ncp.train`` with ``objective`` on a flow folder: two steps with finite losses and perf/tflops
    (``check_tflops_logged``), a LoRA on the attention projections of both streams. Returns the LoRA's tensors."""
    from safetensors.torch import load_file

    from ncp.train import main

    out = tmp_path / "run"
    assert main(flow_args(model, parquet, out, f"objective.name={objective}", FLOW_TARGETS)) == 0
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    check_tflops_logged(lines, model, objective, FLOW_TARGETS, text_len)
    keys = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") for k in keys)
    assert any(".add_q_proj.lora_A" in k for k in keys) and any(".to_q.lora_B" in k for k in keys)
    return keys


def check_tflops_logged(lines, model, objective: str, targets: str, text_len: int) -> None:
    """Every step logs perf/tflops: the transformer's own step counted on meta by ``ncp.flops.dit_step_budget``
    (64 px, 8 x 8 latents, rank 4, the run's targets and text length) times the step's pairs/s."""
    from ncp.flops import dit_step_budget

    config = json.loads((model / "transformer" / "config.json").read_text())
    per_pair = dit_step_budget(config, 64, objective, (), 4, targets.split("=[")[1].rstrip("]").split(","),
                               text_len=text_len, latent_side=8)["flops_per_pair"]
    assert per_pair > 0
    for m in lines:
        assert m["perf/tflops"] == pytest.approx(per_pair * m["perf/pairs_per_s"] / 1e12, rel=1e-6)


def check_resume_is_bit_identical(model, parquet, tmp_path) -> None:
    """3 steps in one go, and 1 step then a resume to 3 (NCP-KTO, a checkpoint every step): the same LoRA bit
    for bit and the same losses."""
    from safetensors.torch import load_file

    from ncp.train import main

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ("objective.name=ncp-kto", "train.checkpoint_every=1")
    assert main(flow_args(model, parquet, whole, *args, "train.max_steps=3")) == 0
    assert main(flow_args(model, parquet, cut, *args, "train.max_steps=1")) == 0
    assert main(flow_args(model, parquet, cut, *args, "train.max_steps=3", "--resume", "auto")) == 0
    a, b = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["loss"] for m in metrics(whole)] == [m["loss"] for m in metrics(cut)]


def check_lora_in_pipeline(pipe, mine, kind: str, lora_dir, call: dict) -> None:
    """``pipe.load_lora_weights(lora_dir)`` gives ``pipe``'s transformer the outputs of ``mine.unet`` (the
    training module with the LoRA loaded by ncp) on ``call``, and the family's training pipeline around
    ``mine`` (what validation draws with) draws the pipeline's images."""
    from ncp.families import family

    with torch.no_grad():
        before = pipe.transformer(**call).sample
        pipe.load_lora_weights(str(lora_dir))
        after = pipe.transformer(**call).sample
        trained = mine.unet(**call).sample
    assert float((after - before).abs().max()) > 1e-6  # the LoRA does something
    torch.testing.assert_close(after, trained, rtol=1e-5, atol=1e-6)
    training = family(kind).training_pipeline(mine.vae, mine.text_encoders, mine.tokenizers, mine.unet,
                                              mine.scheduler)
    draw = lambda p: p(prompt=CAPTIONS[0], num_inference_steps=2, height=64, width=64, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(1)).images
    a, b = draw(pipe), draw(training)
    assert a.shape == (1, 64, 64, 3)
    assert abs(a - b).max() < 1e-5


def check_cache_gives_pixel_losses(model, parquet, tmp_path, kind: str) -> None:
    """``ncp.train`` on the latent and text cache gives the losses of training on the pixels (Rust loader)."""
    pytest.importorskip("ncp_dataloader", reason="the Rust loader wheel is not installed")
    from ncp.data.cache.key import read_index
    from ncp.data.cache.write import build_cache
    from ncp.train import main

    cache_dir = build_cache(str(model), [str(parquet)], tmp_path / "cache", 64, flip=True, batch_size=4)
    assert read_index(cache_dir)["key"]["model_kind"] == kind
    losses = {}
    for name, extra in (("pixels", "data.backend=rust"), ("cache", f"data.cache_dir={cache_dir}")):
        out = tmp_path / name
        assert main(flow_args(model, parquet, out, "objective.name=ncp-dpo", "objective.beta=5000",
                              "data.num_workers=1", "data.empty_prompt_prob=0.5", extra)) == 0
        losses[name] = [m["loss"] for m in metrics(out)]
    assert len(losses["pixels"]) == 2
    torch.testing.assert_close(torch.tensor(losses["cache"]), torch.tensor(losses["pixels"]), rtol=1e-4, atol=1e-6)


def check_gpu_step(objective: str, model, parquet, tmp_path) -> None:
    """One step on the GPU under bf16 autocast (the perceptual path in fp32: model.perceptual_precision=auto)
    measures the first step's errors as the CPU's fp32 run does, within bf16's rounding; the loss is finite."""
    from ncp.train import main

    runs = {}
    for device, extra in (("cpu", ()), ("cuda", ("train.device=cuda", "train.mixed_precision=bf16"))):
        out = tmp_path / device
        assert main(flow_args(model, parquet, out, f"objective.name={objective}", "train.max_steps=1", *extra)) == 0
        runs[device] = metrics(out)[0]
    for key in ("err/policy_winner", "err/policy_loser", "err/reference_winner"):
        assert runs["cuda"][key] == pytest.approx(runs["cpu"][key], rel=0.05), key
    assert torch.isfinite(torch.tensor(runs["cuda"]["loss"]))

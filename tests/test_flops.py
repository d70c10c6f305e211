"""FLOP accounting (ncp.flops): hand-computed counts, the step's structure, peaks and MFU."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import cli_args

from ncp.flops import (Throughput, count_flops, full_finetune_dpo_flops, meta_conditioning, meta_unet, peak_flops,
                       peak_flops_of, step_flops)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_linear_forward_and_backward_hand_computed():
    """Linear(3 -> 5) on 7 rows: a matmul of 2*7*3*5 = 210 FLOPs; backward runs one such matmul per
    gradient autograd needs (input, weight), none for a frozen weight."""
    lin = torch.nn.Linear(3, 5)
    x = torch.randn(7, 3)
    x_grad = x.clone().requires_grad_(True)
    assert count_flops(lambda: lin(x)) == 210
    lin.requires_grad_(False)  # frozen weight, input needs grad: grad_input only
    assert count_flops(lambda: lin(x_grad).sum().backward()) == 2 * 210
    lin.requires_grad_(True)  # trained weight, input without grad: grad_weight only
    assert count_flops(lambda: lin(x).sum().backward()) == 2 * 210
    assert count_flops(lambda: lin(x_grad).sum().backward()) == 3 * 210


def test_conv_forward_and_frozen_backward_hand_computed():
    """Conv2d(2 -> 4, 3x3, pad 1) on 1x2x5x5: 2 * (1*4*5*5 outputs) * (2*3*3 taps) = 3600 FLOPs."""
    conv = torch.nn.Conv2d(2, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert count_flops(lambda: conv(x)) == 3600
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * 3600


def test_attention_backward_counts_both_operands():
    """Attention has no weights: its backward differentiates both products (Q K^T and P V), 2x the forward
    (4 * L * S * d per head for the two forward products)."""
    q = torch.randn(1, 2, 4, 8, device="meta", requires_grad=True)
    k = torch.randn(1, 2, 6, 8, device="meta", requires_grad=True)
    v = torch.randn(1, 2, 6, 8, device="meta", requires_grad=True)
    fwd = 2 * 4 * 4 * 6 * 8  # 2 heads x 2 products x 2*L*S*d
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == fwd
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 3 * fwd


def _tiny_config(folder) -> dict:
    return json.loads((Path(folder) / "unet" / "config.json").read_text())


def _forward_flops(config, images: int, text_len: int) -> int:
    unet = meta_unet(config)
    cond = meta_conditioning(config, images, text_len)
    x = torch.empty(images, 4, 4, 4, device="meta")
    t = torch.ones(images, dtype=torch.long, device="meta")
    return count_flops(lambda: unet(x, t, encoder_hidden_states=cond.hidden_states,
                                    added_cond_kwargs=cond.added_cond_kwargs()))


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_step_flops_structure(fixture, request):
    """The objectives' FLOPs relate as their passes do: CPO = policy on winners and losers = 2 x SFT; DPO adds
    the reference forward on both (adapters off: no LoRA matmuls); NCP adds the encoder passes. FLOPs are
    linear in the batch (counted once per pair)."""
    config = _tiny_config(request.getfixturevalue(fixture))
    kind = "sdxl" if fixture == "tiny_sdxl" else "sd15"
    f = {name: step_flops(config, kind, 32, name, ["mid"], text_len=16, lora_rank=4)
         for name in ("sft", "cpo", "dpo", "ncp-dpo")}
    assert f["cpo"] == 2 * f["sft"]
    assert f["dpo"] - f["cpo"] == _forward_flops(config, 2, 16)
    assert f["ncp-dpo"] > f["dpo"]
    assert _forward_flops(config, 2, 16) == 2 * _forward_flops(config, 1, 16)
    assert step_flops(config, kind, 32, "dpo", ["mid"], text_len=16, lora_rank=4, batch=3) == 3 * f["dpo"]


def test_sd15_forward_at_512px_is_0_80_tflop():
    """The published SD1.5 U-Net at 512 px (the figure issue 13 starts from): 0.803 TFLOP per image forward;
    the full fine-tune DPO step (2 images trained + 2 reference forwards) 6.42 TFLOP per pair."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from step import SD15_UNET
    finally:
        sys.path.remove(str(BENCHMARKS))
    unet = meta_unet(SD15_UNET)
    x = torch.empty(1, 4, 64, 64, device="meta")
    h = torch.empty(1, 77, 768, device="meta")
    fwd = count_flops(lambda: unet(x, torch.ones(1, dtype=torch.long, device="meta"), h))
    assert fwd == pytest.approx(0.803e12, rel=1e-3)
    assert full_finetune_dpo_flops(SD15_UNET, 512) == pytest.approx(6.42e12, rel=1e-3)


def test_peak_table_and_override():
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops_of("NVIDIA H100 PCIe", "fp16") == 756.0e12
    assert peak_flops_of("NVIDIA H200", "bf16") == 989.4e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "fp32") is None
    assert peak_flops_of("Some Future GPU", "bf16") is None
    assert peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops("cpu", "bf16", override_tflops=100.0) == 100e12


def test_throughput_metrics():
    """2 TFLOP per pair at 10 pairs/s over 2 devices: 10 TFLOP/s per device, 10 % of a 100 TFLOP/s peak."""
    m = Throughput(2e12, 100e12, world_size=2).metrics(10.0)
    assert m["perf/tflops"] == pytest.approx(10.0)
    assert m["perf/mfu"] == pytest.approx(0.1)
    assert "perf/mfu" not in Throughput(2e12, None).metrics(10.0)
    assert Throughput(None, None).metrics(10.0) == {}


def test_training_logs_tflops_and_mfu(tiny_sd15, tiny_parquet, tmp_path):
    """The CLI logs perf/tflops; perf/mfu only with a known peak (on the CPU: logging.peak_tflops)."""
    from ncp.train import main

    out = tmp_path / "run"
    assert main(cli_args(tiny_sd15, tiny_parquet, out, "train.max_steps=2", "logging.peak_tflops=0.001")) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = _tiny_config(tiny_sd15)
    per_pair = step_flops(config, "sd15", 32, "ncp-dpo", ["auto"], text_len=16, lora_rank=4)
    for m in lines:
        assert m["perf/tflops"] == pytest.approx(per_pair * m["perf/pairs_per_s"] / 1e12, rel=1e-6)
        assert m["perf/mfu"] == pytest.approx(m["perf/tflops"] / 0.001, rel=1e-6)


# ---------------------------------------------------------------- flow transformers


def test_published_dit_configs_have_the_stated_sizes():
    """SD3.5-large is an 8.1 B transformer and Flux.1-dev a 12 B one: the configs in DIT_CONFIGS are theirs."""
    from ncp.flops import meta_dit

    sizes = {name: sum(p.numel() for p in meta_dit(name).parameters()) for name in ("sd3.5-large", "flux.1-dev")}
    assert sizes["sd3.5-large"] == pytest.approx(8.06e9, rel=0.01)
    assert sizes["flux.1-dev"] == pytest.approx(11.9e9, rel=0.01)


@pytest.fixture
def tiny_dits(monkeypatch):
    from ncp import flops

    monkeypatch.setitem(flops.DIT_CONFIGS, "tiny-sd3", {
        "_class": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 4,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16,
        "pooled_projection_dim": 12, "out_channels": 4, "pos_embed_max_size": 16})
    monkeypatch.setitem(flops.DIT_CONFIGS, "tiny-flux", {
        "_class": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 2,
        "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
        "pooled_projection_dim": 12, "guidance_embeds": True, "axes_dims_rope": [2, 2, 4]})
    return flops


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_dit_budget_counts_each_pass(tiny_dits, name):
    """DPO runs the policy forward and backward on both images and the reference forward: 3 to 4 forwards of
    two images (a frozen weight's backward computes the input gradient only: 1x; attention's and the LoRA's
    both operands': 2x; on these tiny widths those weigh more than on a real model);
    NCP-DPO adds the encoder passes; checkpointing keeps far less than the whole graph."""
    from ncp.models import add_lora

    flops = tiny_dits
    model = flops.meta_dit(name)
    add_lora(model, 4, 4.0, ["to_q", "to_k", "to_v"], 0.0)  # the forward counted with the step's adapters
    x, velocity, _ = flops._dit_call(model, 64, 2)
    forward = flops.count_flops(lambda: velocity(x, torch.empty(2, device="meta")))
    dpo = flops.dit_step_budget(name, 64, "dpo", lora_rank=4, lora_targets=("to_q", "to_k", "to_v"))
    ncp = flops.dit_step_budget(name, 64, "ncp-dpo", lora_rank=4, lora_targets=("to_q", "to_k", "to_v"))
    assert 2.8 * forward < dpo["flops_per_pair"] < 4.0 * forward
    assert ncp["flops_per_pair"] > dpo["flops_per_pair"] and ncp["taps"] == [0, 1]
    assert 0 < dpo["saved_bytes_checkpointed"] < dpo["saved_bytes"]
    assert dpo["params_lora"] > 0 and dpo["peak_bytes_checkpointed"] > dpo["weight_bytes"] > 2 * dpo["params_frozen"]

"""Precision of the perceptual path (issue 26): model.perceptual_precision and the branch difference it keeps."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ncp.models import Conditioning, resolve_taps
from ncp.step import StepNoise, branch_errors, perceptual_dtype

from fixtures import criterion_of

CPU = torch.device("cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("setting, policy, weights, expected", [
    ("auto", BF16, F32, F32),   # a bf16 policy: the perceptual path moves to fp32
    ("auto", F32, F32, None),   # fp32 (the CPU default): nothing to change
    ("auto", F16, F16, None),   # an fp16 policy already keeps the difference
    ("same", BF16, F32, None),
    ("fp16", F32, F32, F16),
    ("fp32", BF16, F32, F32),
    ("tf32", BF16, F32, F32),   # fp32 tensors; train.setup allows TF32
])
def test_perceptual_dtype(setting, policy, weights, expected):
    assert perceptual_dtype(setting, policy, weights, CPU) == expected


def test_perceptual_dtype_refusals():
    with pytest.raises(ValueError, match="needs model.weight_dtype=fp32.*bfloat16"):
        perceptual_dtype("fp32", BF16, BF16, CPU)
    with pytest.raises(ValueError, match="CPU autocast"):
        perceptual_dtype("fp16", BF16, BF16, CPU)
    with pytest.raises(ValueError, match="CPU autocast"):
        perceptual_dtype("auto", BF16, BF16, CPU)
    cuda = torch.device("cuda")  # CUDA autocast can run fp16 over bf16 weights (its GroupNorm runs in fp32)
    assert perceptual_dtype("fp16", BF16, BF16, cuda) == F16
    assert perceptual_dtype("auto", BF16, BF16, cuda) == F16  # half-precision weights: no fp32 encoder


def _branch_difference(models, schedule, x0, cond, noise, taps, weight_dtype, autocast, encoder_dtype):
    """(PL_theta - PL_ref) per image, and the LoRA gradient of its sum, in one precision mode."""
    import copy

    m = copy.deepcopy(models.unet).to(weight_dtype)
    for name, p in m.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float64 if weight_dtype == torch.float64 else F32)
    nd = torch.float64 if weight_dtype == torch.float64 else F32
    n = StepNoise(noise.t, noise.eps.to(nd), noise.z.to(nd))
    c = Conditioning(cond.hidden_states.to(weight_dtype))
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        criterion = criterion_of("ncp-dpo", schedule, taps, encoder_dtype=encoder_dtype)
        err, ref = branch_errors(criterion, m, m, x0.to(weight_dtype), c, n)
    diff = err - ref
    diff.sum().backward()
    grad = torch.cat([p.grad.double().flatten() for k, p in m.named_parameters() if "lora_" in k])
    return diff.detach().double().numpy(), grad.numpy()


def test_default_perceptual_path_keeps_the_branch_difference_that_bf16_rounds_away(tiny_sd15):
    """At low timesteps, where c_e(t) (e - eps) is smallest, a bf16 reverse step and encoder round the
    policy-minus-reference difference away (relative error against float64 of order 1 or more) and turn the
    LoRA gradient; the default under a bf16 policy (model.perceptual_precision=auto: the reverse step and the
    encoder in fp32) keeps both. Fails if the perceptual path falls back to the policy's bf16."""
    from fixtures import step_inputs_with_lora

    models, schedule, x0, cond = step_inputs_with_lora(tiny_sd15)
    with torch.no_grad():  # a LoRA of a trained step's size: policy != reference
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.01)
    b = x0.shape[0] // 2
    gen = torch.Generator().manual_seed(0)
    noise = StepNoise(torch.tensor([5, 20][:b]), torch.randn((b, *x0.shape[1:]), generator=gen),
                      torch.randn((b, *x0.shape[1:]), generator=gen))
    taps = resolve_taps(["mid"], "sd15", len(models.unet.down_blocks))
    args = (models, schedule, x0, cond, noise, taps)
    d64, g64 = _branch_difference(*args, torch.float64, None, None)
    rel = lambda d: float(np.linalg.norm(d - d64) / np.linalg.norm(d64))  # noqa: E731
    cos = lambda g: float(g @ g64 / (np.linalg.norm(g) * np.linalg.norm(g64)))  # noqa: E731
    enc = perceptual_dtype("auto", BF16, F32, CPU)
    assert enc == F32
    d_bf16, g_bf16 = _branch_difference(*args, F32, BF16, None)
    d_auto, g_auto = _branch_difference(*args, F32, BF16, enc)
    seen = (f"rel err of PL - PL_ref: bf16 {rel(d_bf16):.3g}, auto {rel(d_auto):.3g}; "
            f"grad cosine: bf16 {cos(g_bf16):.5f}, auto {cos(g_auto):.5f}")
    assert rel(d_bf16) > 0.5, seen  # the premise: bf16 loses the difference
    assert rel(d_auto) < 0.1 * rel(d_bf16), seen
    assert cos(g_auto) > 0.99 and cos(g_auto) > cos(g_bf16), seen


def test_perceptual_precision_fp32_over_bf16_weights_is_a_named_error(tmp_path, tiny_sd15, tiny_parquet):
    from fixtures import cli_args

    out = subprocess.run([sys.executable, "-m", "ncp.train", *cli_args(tiny_sd15, tiny_parquet, tmp_path / "run"),
                          "model.weight_dtype=bf16", "model.perceptual_precision=fp32", "train.max_steps=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.perceptual_precision=fp32" in out.stderr and "Traceback" not in out.stderr

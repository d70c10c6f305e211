"""The speed levers (model.compile_unet, attention_backend, channels_last, weight dtype) give the eager
step's losses and gradients, on the tiny SD1.5 U-Net (CPU)."""
import inspect

import pytest
import torch

from ncp.models import attention_backend, add_lora, compile_counters, compile_unet, encode_prompts, load_models
from ncp.objectives import OBJECTIVES
from ncp.schedule import NoiseSchedule
from ncp.step import preference_step, sample_noise

from fixtures import criterion_of

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_models(folder, dtype=torch.float32):
    models = load_models(str(folder), "sd15", torch.device("cpu"), dtype)
    add_lora(models.unet, 4, 4.0, TARGETS, 0.0)
    for name, p in models.unet.named_parameters():
        if "lora_B" in name:  # a trained adapter: the policy differs from the reference
            p.data.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    models.unet.train()
    return models


def _step(models, unet, objective, seed=1, autocast=None, context=None):
    """One step's loss and LoRA gradients (the policy runs through ``unet``, the reference and encoder through
    the unwrapped ``models.unet``)."""
    schedule = NoiseSchedule.from_scheduler(models.scheduler, torch.device("cpu"))
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(models.weight_dtype)
    cond = encode_prompts(models, ["a red cube", "two blue balls"])
    noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(seed), torch.device("cpu"))
    models.unet.zero_grad(set_to_none=True)
    kwargs = {"beta": 50.0} if "beta" in inspect.signature(OBJECTIVES[objective].loss).parameters else {}
    criterion = criterion_of(objective, schedule, [0, "mid"], [0.5, 0.5], **kwargs)
    with (torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)), \
            (context or attention_backend("auto")):
        out = preference_step(criterion, unet, models.unet, x0, cond, noise)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in models.unet.named_parameters() if p.requires_grad}
    return out.loss.detach().float(), grads


def _assert_same(a, b, rtol=1e-4, atol=1e-7):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_regional_compile_gives_eager_losses_and_gradients_without_recompiling(checkpointing, tiny_sd15,
                                                                               fresh_dynamo):
    """compile_unet=regional: the policy (adapters on), reference and encoder passes (adapters off, with and
    without grad, checkpointed or not) run compiled blocks; after the first step no step compiles a graph.
    (aot_eager: dynamo and AOTAutograd as inductor sees them, without inductor's C++ compile time on a CPU.)"""
    models = _lora_models(tiny_sd15)
    if checkpointing:
        models.unet.enable_gradient_checkpointing()
    eager = [_step(models, models.unet, "ncp-dpo", seed) for seed in (1, 2)]
    unet = compile_unet(models.unet, "regional", backend="aot_eager")
    assert unet is models.unet  # compiled in place: the unwrapped module is the compiled one
    first = _step(models, unet, "ncp-dpo", 1)
    graphs = compile_counters()["compile/graphs"]
    assert graphs > 0 and compile_counters()["compile/frames_failed"] == 0
    second = _step(models, unet, "ncp-dpo", 2)
    dpo = _step(models, unet, "dpo", 3)  # another objective's passes: same variants, nothing new to compile
    assert compile_counters()["compile/graphs"] == graphs
    assert torch.isfinite(dpo[0])
    _assert_same(first, eager[0])
    _assert_same(second, eager[1])


def test_attention_backend_math_equals_auto(tiny_sd15):
    models = _lora_models(tiny_sd15)
    _assert_same(_step(models, models.unet, "ncp-dpo", context=attention_backend("math")),
                 _step(models, models.unet, "ncp-dpo"), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="attention_backend"):
        attention_backend("xformers")


def test_channels_last_equals_contiguous(tiny_sd15):
    models = _lora_models(tiny_sd15)
    eager = _step(models, models.unet, "ncp-dpo")
    models.unet.to(memory_format=torch.channels_last)
    _assert_same(_step(models, models.unet, "ncp-dpo"), eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(dtype, tiny_sd15):
    """bf16 / fp16 frozen weights under autocast (the GPU configs' lever): the fp32 loss within half precision's
    error, gradients of the same size. (Not their direction: in the 8-channel tiny U-Net, GroupNorm over 2
    channels amplifies rounding so much that even fp32 weights under bf16 autocast give per-parameter gradient
    cosines of -0.7 to 1 against fp32; a comparison of directions needs a real-size model, i.e. the GPU run.)"""
    models32 = _lora_models(tiny_sd15)
    reference = _step(models32, models32.unet, "sft")
    models = _lora_models(tiny_sd15, dtype)
    half = _step(models, models.unet, "sft", autocast=dtype)
    torch.testing.assert_close(half[0], reference[0], rtol=2e-2, atol=1e-4)
    norm = lambda grads: torch.cat([g.flatten() for g in grads.values()]).norm()  # noqa: E731
    assert 0.5 < norm(half[1]) / norm(reference[1]) < 2.0
    assert all(torch.isfinite(g).all() for g in half[1].values())


def test_compile_unet_rejects_unknown_mode(tiny_sd15):
    models = _lora_models(tiny_sd15)
    assert compile_unet(models.unet, False) is models.unet
    # full: the policy's forward wrapped whole (nothing compiles until it runs)
    assert compile_unet(models.unet, "full", backend="aot_eager")._orig_mod is models.unet
    for how in ("everything", True):  # true once meant full: now a named error, not a guess
        with pytest.raises(ValueError, match="compile_unet"):
            compile_unet(models.unet, how)

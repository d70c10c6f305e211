"""Models: the encoder taps, the reference pass, LoRA training touches only LoRA weights."""
import pytest
import torch

from ncp.models import (Conditioning, adapters_disabled, add_lora, encode_prompts, encoder_features, load_models,
                        resolve_taps)
from ncp.families import family


def _models(folder):
    return load_models(str(folder), "auto", torch.device("cpu"), torch.float32)


def _inputs(models, n=2, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.tensor([10, 700][:n])
    cond = encode_prompts(models, ["a red cube", "two blue balls"][:n])
    if models.kind == "sdxl":
        cond.time_ids = family("sdxl").time_ids(torch.tensor([[40, 48]] * n), torch.tensor([[0, 4]] * n), 32)
    return x, t, cond


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_encoder_taps_equal_forward_hooks(fixture, request):
    """E's taps equal the activations that forward hooks capture in a full U-Net forward."""
    models = _models(request.getfixturevalue(fixture))
    unet = models.unet
    x, t, cond = _inputs(models)
    captured = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, b in [*enumerate(unet.down_blocks), ("mid", unet.mid_block)]]
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=cond.added_cond_kwargs())
        taps = resolve_taps(["multiscale"], models.kind, len(unet.down_blocks))
        feats = encoder_features(unet, x, t, cond, taps)
    for h in hooks:
        h.remove()
    assert taps == [0, 1, "mid"]
    for tap, f in zip(taps, feats):
        assert torch.equal(f, captured[tap]), tap


def test_tap_presets():
    assert resolve_taps(["auto"], "sd15", 4) == ["mid"]
    assert resolve_taps(["auto"], "sdxl", 3) == [2]
    assert resolve_taps(["paper"], "sd15", 4) == [3]
    assert resolve_taps(["multiscale"], "sd15", 4) == [0, 1, 2, 3, "mid"]
    assert resolve_taps(["mid", "1"], "sd15", 4) == [1, "mid"]
    with pytest.raises(ValueError, match="down block index in 0..3"):
        resolve_taps(["7"], "sd15", 4)


def test_reference_pass_equals_base_model(tiny_sd15):
    """With adapters disabled the LoRA U-Net gives exactly the base model's output, even after training."""
    models = _models(tiny_sd15)
    x, t, cond = _inputs(models)
    kwargs = dict(encoder_hidden_states=cond.hidden_states)
    with torch.no_grad():
        before = models.unet(x, t, **kwargs).sample
    add_lora(models.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)
    for name, p in models.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # a trained adapter
    with torch.no_grad():
        policy = models.unet(x, t, **kwargs).sample
        with adapters_disabled(models.unet):
            reference = models.unet(x, t, **kwargs).sample
        again = models.unet(x, t, **kwargs).sample
    assert torch.equal(reference, before)
    assert not torch.allclose(policy, before)
    assert torch.equal(again, policy)  # adapters came back on


def test_sdxl_conditioning_shapes(tiny_sdxl):
    models = _models(tiny_sdxl)
    cond = encode_prompts(models, ["a red cube"])
    assert models.kind == "sdxl"
    assert cond.hidden_states.shape == (1, 16, 32)  # both encoders' penultimate states, concatenated
    assert cond.pooled.shape == (1, 16)
    ids = family("sdxl").time_ids(torch.tensor([[40, 48]]), torch.tensor([[0, 4]]), 32)
    assert ids.tolist() == [[40.0, 48.0, 0.0, 4.0, 32.0, 32.0]]
    assert Conditioning(cond.hidden_states, cond.pooled, ids).repeat(2).time_ids.shape == (2, 6)


@pytest.mark.parametrize("objective", ["ncp-dpo", "dpo"])
def test_gradient_checkpointing_gives_the_same_gradients(objective, tiny_sd15, monkeypatch):
    """Checkpointing recomputes the policy in backward; the perceptual encoder (adapters off) must not be
    recomputed with the adapters back on. Same inputs, same LoRA: identical gradients with and without it."""
    from fixtures import criterion_of, step_inputs_with_lora
    from ncp.step import preference_step, sample_noise

    models, schedule, x0, cond = step_inputs_with_lora(tiny_sd15)
    import ncp.models

    calls = []  # the frozen encoder's checkpoints (NCP objectives), counted

    def counted(module, *args):
        calls.append(type(module).__name__)
        return adapters_off_checkpoint(module, *args)

    adapters_off_checkpoint = ncp.models._adapters_off_checkpoint
    monkeypatch.setattr(ncp.models, "_adapters_off_checkpoint", counted)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            models.unet.enable_gradient_checkpointing()
        noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
        models.unet.zero_grad()
        out = preference_step(criterion_of(objective, schedule, [0, "mid"], [0.5, 0.5], beta=50.0), models.unet,
                              models.unet, x0, cond, noise)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in models.unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-8, msg=name)
    # NCP: the encoder pass is checkpointed per resnet and transformer block, like the policy's
    assert ({"ResnetBlock2D", "BasicTransformerBlock"} <= set(calls)) == objective.startswith("ncp-")

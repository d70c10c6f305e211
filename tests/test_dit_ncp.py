"""NCP in a flow transformer's own space (ncp.families.dit) on a tiny random SD3 transformer, against a
hand-written float64 reference that reads the features by hooks on a full forward."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ncp.families.dit import flux_block_features, perceptual_errors, sd3_block_features  # noqa: E402
from ncp.schedule import FlowSchedule  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16).eval().requires_grad_(False)


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(2, 4, 8, 8), r(2, 4, 8, 8), r(2, 5, 16), r(2, 12)  # x0, eps, text, pooled


def hooked_features(model, x, t, text, pooled, taps):
    """The image tokens after each tapped block, read by forward hooks on the model's own full forward."""
    got, hooks = {}, []
    for k in taps:
        hooks.append(model.transformer_blocks[k].register_forward_hook(
            lambda mod, args, out, k=k: got.__setitem__(k, out[1])))
    try:
        model(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled)
    finally:
        for h in hooks:
            h.remove()
    return [got[k] for k in taps]


def test_block_features_are_the_full_forwards_hidden_states(tiny_sd3):
    x0, _, text, pooled = inputs()
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        mine = sd3_block_features(tiny_sd3, x0, t, text, pooled, [0, 2])
        ref = hooked_features(tiny_sd3, x0, t, text, pooled, [0, 2])
    for a, b in zip(mine, ref):
        assert a.shape == (2, 16, 16)  # 4x4 patches of 2x2, inner dim 2 heads x 8
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"blocks 0..2"):
        sd3_block_features(tiny_sd3, x0, t, text, pooled, [3])


def test_errors_match_a_float64_reference_and_train_only_the_policy(tiny_sd3):
    sched = FlowSchedule(torch.linspace(1.0, 0.001, 1000))
    x0, eps, text, pooled = inputs()
    idx = torch.tensor([100, 900])
    x = sched.add_noise(x0, eps, idx)
    v_true = sched.target(x0, eps, idx)
    g = torch.Generator().manual_seed(2)
    v_pol = (v_true + 0.3 * torch.randn(v_true.shape, generator=g)).requires_grad_(True)
    v_ref = v_true + 0.2 * torch.randn(v_true.shape, generator=g)
    taps, weights = [0, 1], [0.25, 1.0]
    feats = lambda z, sig: sd3_block_features(tiny_sd3, z, sig * 1000, text, pooled, taps)  # noqa: E731
    s, s_next = sched.sigmas[idx], sched.next_sigma(idx)
    err_pol, err_ref = perceptual_errors(feats, s, s_next, x, [v_pol, v_ref], v_true, weights)
    err_coef, = perceptual_errors(feats, s, s_next, x, [v_pol], v_true, weights, coef=True)

    model64 = tiny_sd3.to(torch.float64)
    try:
        def ref_error(v):
            out = []
            for b in range(2):  # one image at a time, by the definition
                step = float(s_next[b] - s[b])
                t = (s_next[b:b + 1] * 1000).double()
                fv = hooked_features(model64, (x[b:b + 1] + step * v[b:b + 1]).double(), t, text[b:b + 1].double(),
                                     pooled[b:b + 1].double(), taps)
                ft = hooked_features(model64, (x[b:b + 1] + step * v_true[b:b + 1]).double(), t,
                                     text[b:b + 1].double(), pooled[b:b + 1].double(), taps)
                out.append(sum(w * ((a - c) ** 2).mean() for w, a, c in zip(weights, fv, ft)))
            return torch.stack(out)

        with torch.no_grad():
            want_pol, want_ref = ref_error(v_pol.detach()), ref_error(v_ref)
    finally:
        tiny_sd3.to(torch.float32)
    torch.testing.assert_close(err_pol.double(), want_pol, rtol=2e-4, atol=1e-9)
    torch.testing.assert_close(err_ref.double(), want_ref, rtol=2e-4, atol=1e-9)
    torch.testing.assert_close(err_coef, err_pol / (s - s_next) ** 2)  # coef: / (sigma_i - sigma_{i+1})^2
    assert (err_pol > 0).all() and err_pol.requires_grad and not err_ref.requires_grad  # frozen encoder
    err_pol.sum().backward()
    assert v_pol.grad is not None and v_pol.grad.abs().sum() > 0
    # the true velocity's own error is exactly zero (its Euler step is the target point)
    zero, = perceptual_errors(feats, s, s_next, x, [v_true], v_true, weights)
    assert torch.equal(zero, torch.zeros(2))


def test_flux_block_features_are_the_full_forwards_hidden_states():
    """Double-stream then single-stream taps on a tiny random Flux transformer (guidance embedding on, as
    Flux.1-dev), against hooks on its own full forward."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 16, generator=g)  # 4x4 packed tokens of 16 channels
    text, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 12, generator=g)
    txt_ids = torch.zeros(5, 3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    sigma, guidance = torch.tensor([0.7, 0.2]), torch.tensor([3.5, 3.5])
    taps = [0, 3]  # the first double-stream block and the last single-stream one
    got, hooks = {}, []
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    for k in taps:
        hooks.append(blocks[k].register_forward_hook(lambda mod, args, out, k=k: got.__setitem__(k, out[1])))
    with torch.no_grad():
        model(hidden_states=x, timestep=sigma, guidance=guidance, encoder_hidden_states=text,
              pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids)
        mine = flux_block_features(model, x, sigma, text, pooled, txt_ids, img_ids, guidance, taps)
    for h in hooks:
        h.remove()
    for k, a in zip(taps, mine):
        assert a.shape == (2, 16, 16)
        torch.testing.assert_close(a, got[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"2 double-stream, then 2 single-stream"):
        flux_block_features(model, x, sigma, text, pooled, txt_ids, img_ids, guidance, [4])

"""NCP for flow-matching transformers (ncp's answer to the paper's open question; docs/method.md, "NCP for
flow-matching transformers"): the frozen transformer's first blocks are the encoder.

For a noised latent ``x`` at training index ``i`` (sigma_i) and a velocity estimate ``v``, the Euler step
``x'(v) = x + (sigma_{i+1} - sigma_i) v`` lands at the next lower sigma; the features of ``v`` are the
image-token hidden states of the frozen transformer (adapters off) after the tapped joint blocks, run on
``x'(v)`` at timestep ``1000 sigma_{i+1}`` with the same text condition. The perceptual error of ``v`` is the
weighted MSE of its features against those of the true velocity ``eps - x0`` (whose Euler step is exactly
the latent at ``sigma_{i+1}``: the paths are straight), per image. ``error_scale=coef`` divides it by
``(sigma_i - sigma_{i+1})^2``, the Euler step's coefficient squared (as the U-Net's ``c_e(t)^2``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Features = Callable[[Tensor, Tensor], list[Tensor]]  # (latents, sigmas) -> one (B, N, D) map per tap


def default_taps(n_blocks: int) -> list[int]:
    """``objective.taps=auto`` for a transformer: the blocks at a quarter and at half its depth (0-based), the
    early blocks whose image tokens are still spatial features and not yet the velocity."""
    return sorted({max(n_blocks // 4 - 1, 0), max(n_blocks // 2 - 1, 0)})


def resolve_block_taps(spec: Sequence[str], n_blocks: int) -> list[int]:
    """``objective.taps`` for a transformer: ``auto`` or 0-based block indices, in forward order."""
    if list(spec) == ["auto"]:
        return default_taps(n_blocks)
    taps = []
    for item in spec:
        if not str(item).isdigit() or not 0 <= int(item) < n_blocks:
            raise ValueError(f"objective.taps: {item!r} is not 'auto' nor a block index in 0..{n_blocks - 1} "
                             f"(a transformer's taps are its blocks; the U-Net presets do not apply)")
        taps.append(int(item))
    if len(set(taps)) != len(taps):
        raise ValueError(f"objective.taps lists a block twice: {list(spec)}")
    return sorted(taps)


def sd3_block_features(transformer, x: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                       pooled: Tensor, taps: Sequence[int]) -> list[Tensor]:
    """Image-token hidden states (B, N, D) of an ``SD3Transformer2DModel`` after each joint block in ``taps``
    (0-based: after block k), in the order of ``taps``; the blocks after the last tap do not run."""
    if not taps:
        raise ValueError("no tapped block")
    n_blocks = len(transformer.transformer_blocks)
    bad = [k for k in taps if not 0 <= k < n_blocks]
    if bad:
        raise ValueError(f"taps {bad}: the transformer has blocks 0..{n_blocks - 1}")
    hidden = transformer.pos_embed(x).contiguous()
    temb = transformer.time_text_embed(timestep, pooled)
    context = transformer.context_embedder(encoder_hidden_states)
    out: dict[int, Tensor] = {}
    for k, block in enumerate(transformer.transformer_blocks[: max(taps) + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        if k in taps:
            out[k] = hidden
    return [out[k] for k in taps]


def flux_block_features(transformer, x: Tensor, sigma: Tensor, encoder_hidden_states: Tensor, pooled: Tensor,
                        txt_ids: Tensor, img_ids: Tensor, guidance: Tensor | None, taps: Sequence[int]) -> list[Tensor]:
    """Image-token hidden states (B, N, D) of a ``FluxTransformer2DModel`` on packed latents ``x`` (B, N, C)
    after each tapped block: indices ``0 .. n_double - 1`` are the double-stream blocks, then the
    single-stream ones; the blocks after the last tap do not run. ``sigma`` is the timestep input as the
    pipeline passes it (Flux scales it by 1000 inside); ``guidance`` the dev model's guidance (None: schnell)."""
    doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    blocks = doubles + singles
    if not taps:
        raise ValueError("no tapped block")
    bad = [k for k in taps if not 0 <= k < len(blocks)]
    if bad:
        raise ValueError(f"taps {bad}: the transformer has blocks 0..{len(blocks) - 1} "
                         f"({len(doubles)} double-stream, then {len(singles)} single-stream)")
    hidden = transformer.x_embedder(x)
    t = sigma.to(hidden.dtype) * 1000
    temb = (transformer.time_text_embed(t, pooled) if guidance is None
            else transformer.time_text_embed(t, guidance.to(hidden.dtype) * 1000, pooled))
    context = transformer.context_embedder(encoder_hidden_states)
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    out: dict[int, Tensor] = {}
    for k, block in enumerate(blocks[: max(taps) + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                image_rotary_emb=rotary)
        if k in taps:
            out[k] = hidden
    return [out[k] for k in taps]


def perceptual_errors(features: Features, sigmas: Tensor, next_sigmas: Tensor, x: Tensor, velocities: Sequence[Tensor], v_true: Tensor, weights: Sequence[float],
                      coef: bool = False) -> list[Tensor]:
    """Per-image (B,) perceptual errors of each velocity in ``velocities`` (policy, reference, ...) against
    ``v_true``, all from the same noised latents ``x`` at ``sigmas`` (B,), stepping to ``next_sigmas``.
    ``features(latents, sigmas)`` runs the frozen encoder at those sigmas (each family turns them into its
    timestep input: SD3 ``1000 sigma``, Flux ``sigma``); gradients reach each velocity through its Euler step.
    The target's features are computed without gradient."""
    step = (next_sigmas - sigmas).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    with torch.no_grad():
        target = features(x + step * v_true, next_sigmas)
    if len(target) != len(weights):
        raise ValueError(f"{len(target)} tapped maps but {len(weights)} weights")
    scale = (sigmas - next_sigmas).float() ** -2 if coef else None
    errors = []
    for v in velocities:
        feats = features(x + step * v, next_sigmas)
        err = sum(w * (f.float() - g.float()).pow(2).flatten(1).mean(1) for w, f, g in zip(weights, feats, target))
        errors.append(err * scale if coef else err)
    return errors

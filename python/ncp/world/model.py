"""The tiny SD1.5-style pipeline of the bundled world, built from configs.

Every component is a stock diffusers / transformers class (``AutoencoderKL``,
``UNet2DConditionModel`` with cross-attention, ``CLIPTextModel``,
``CLIPTokenizer``, ``DDPMScheduler``) so the bundle is loaded by the same code
that loads a real Stable Diffusion 1.5 folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the tiny pipeline (the defaults are the bundle's)."""

    resolution: int = 32
    vae_channels: tuple[int, ...] = (16, 32)  # 2 blocks: latents are resolution / 2
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    first_attention_block: int = 1  # down blocks from this index on have cross-attention
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 24


TINY_SPEC = ModelSpec(vae_channels=(8, 16), unet_channels=(16, 32), text_hidden=32, text_layers=1,
                      text_heads=2)


def build_vae(spec: ModelSpec) -> AutoencoderKL:
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels, layers_per_block=1,
        latent_channels=spec.latent_channels, norm_num_groups=8, sample_size=spec.resolution,
        mid_block_add_attention=False,
    )


def build_unet(spec: ModelSpec) -> UNet2DConditionModel:
    n = len(spec.unet_channels)
    latent = spec.resolution // 2 ** (len(spec.vae_channels) - 1)
    a = spec.first_attention_block
    down = ["DownBlock2D"] * a + ["CrossAttnDownBlock2D"] * (n - a)
    up = ["CrossAttnUpBlock2D"] * (n - a) + ["UpBlock2D"] * a
    return UNet2DConditionModel(
        sample_size=latent, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels, layers_per_block=spec.unet_layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        cross_attention_dim=spec.text_hidden, attention_head_dim=spec.attention_head_dim,
        norm_num_groups=8,
    )


def build_text_encoder(spec: ModelSpec, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_tokens, projection_dim=spec.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_scheduler() -> DDPMScheduler:
    """SD1.5's training schedule; 'trailing' spacing so short samplers start at t = T - 1."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, timestep_spacing="trailing",
        variance_type="fixed_small", steps_offset=1,
    )


def assemble_pipeline(vae, unet, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

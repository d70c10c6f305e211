"""A tiny random-weight Stable Diffusion 3 pipeline folder, built from configs.

``build_tiny_sd3(folder, seed)`` writes a ``StableDiffusion3Pipeline``
``save_pretrained`` folder whose every component is a stock diffusers /
transformers class at toy sizes: an ``SD3Transformer2DModel``, a 16-channel
``AutoencoderKL`` with SD3's scaling / shift factors, two
``CLIPTextModelWithProjection`` with the world's CLIP tokenizer
(``ncp.world.tokenizer``), a ``T5EncoderModel`` with a ``T5TokenizerFast``
made in-process with the ``tokenizers`` library (a Unigram over the world's
words, no sentencepiece file), and ``FlowMatchEulerDiscreteScheduler(shift=3)``.
Nothing is downloaded; the same seed gives bit-identical weights.

``build_tiny_flux(folder, seed)`` writes a ``FluxPipeline`` folder from the same
parts: a ``FluxTransformer2DModel`` (guidance-embedded, as FLUX.1 [dev]), one
``CLIPTextModel`` (its pooled output), the T5 encoder, the 16-channel VAE with
Flux's scaling / shift factors and Flux's dynamic-shift scheduler config.

How the sizes fit together (what ``StableDiffusion3Pipeline`` assumes):

* ``vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)``: four VAE
  blocks give SD3's factor 8, so 64 px images are 8x8x16 latents, and the
  default size ``transformer.sample_size * 8`` is 64 px.
* ``encode_prompt`` takes each CLIP's penultimate hidden states
  ``(B, clip_tokens, h)`` and its projected pooled output ``(B, p)``; it
  concatenates the two hidden states on the feature axis (``h1 + h2``), zero-pads
  them to the T5 width (so ``h1 + h2 <= joint_attention_dim = d_model``) and
  concatenates them with T5's ``(B, max_sequence_length, d_model)`` on the token
  axis: ``prompt_embeds`` is ``(B, clip_tokens + max_sequence_length,
  joint_attention_dim)``; ``pooled_prompt_embeds`` is ``(B, p1 + p2)`` =
  ``(B, pooled_projection_dim)``.
* ``caption_projection_dim`` is the width the context stream runs at in the
  joint blocks, which must equal the image stream's ``heads * head_dim``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from ncp.scoring.scenes import world_vocabulary
from ncp.world.tokenizer import build_tokenizer, save_tokenizer

SD3_SCALING_FACTOR = 1.5305  # SD3's VAE config
SD3_SHIFT_FACTOR = 0.0609
FLUX_SCALING_FACTOR = 0.3611  # Flux.1's VAE config
FLUX_SHIFT_FACTOR = 0.1159
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in T5


@dataclass(frozen=True)
class FlowSpec:
    """Sizes of the tiny SD3 pipeline."""

    resolution: int = 64
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # 4 blocks: vae_scale_factor 8, as SD3
    latent_channels: int = 16
    patch_size: int = 2
    num_layers: int = 4
    attention_head_dim: int = 8
    num_attention_heads: int = 2
    pos_embed_max_size: int = 16  # patches per side; up to 16 * 2 * 8 = 256 px
    clip_hidden: tuple[int, int] = (16, 16)
    clip_projection: tuple[int, int] = (16, 16)
    clip_layers: int = 2
    clip_heads: int = 2
    clip_tokens: int = 24  # the world's CLIP model_max_length
    t5_d_model: int = 32  # = joint_attention_dim
    t5_layers: int = 2
    t5_heads: int = 4
    t5_max_length: int = 256  # the pipeline's default max_sequence_length

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


TINY_FLOW_SPEC = FlowSpec()


def build_t5_tokenizer(words: list[str] | None = None, max_length: int = 256) -> T5TokenizerFast:
    """T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) as a Unigram over ``▁word`` pieces.

    Each of the world's words is one piece; single lowercase letters and digits
    (much less likely) back off anything else, and other characters are ``<unk>``.
    Pre-tokenizer, decoder and ``$A </s>`` post-processor are T5's.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    words = words or world_vocabulary()
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -8.0)]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁" + w, -2.0) for w in sorted(set(words))]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD,
                           extra_ids=0, additional_special_tokens=[], model_max_length=max_length)


def _clip(tok: CLIPTokenizer, hidden: int, projection: int, spec: FlowSpec,
          cls=CLIPTextModelWithProjection) -> CLIPTextModelWithProjection:
    return cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=spec.clip_layers,
        num_attention_heads=spec.clip_heads, max_position_embeddings=tok.model_max_length, projection_dim=projection,
        hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )).eval()


def _t5(tok: T5TokenizerFast, spec: FlowSpec) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=spec.t5_d_model, d_kv=spec.t5_d_model // spec.t5_heads, d_ff=spec.t5_d_model * 2,
        num_layers=spec.t5_layers, num_heads=spec.t5_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )).eval()


def _vae(spec: FlowSpec, scaling_factor: float = SD3_SCALING_FACTOR,
         shift_factor: float = SD3_SHIFT_FACTOR) -> AutoencoderKL:
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=spec.vae_channels, layers_per_block=1,
        latent_channels=spec.latent_channels, norm_num_groups=8, sample_size=spec.resolution,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False,
    ).eval()


def _transformer(spec: FlowSpec) -> SD3Transformer2DModel:
    sum_hidden, pooled = sum(spec.clip_hidden), sum(spec.clip_projection)
    if sum_hidden > spec.t5_d_model:
        raise ValueError(f"the CLIP widths {spec.clip_hidden} must fit in the T5 width {spec.t5_d_model}")
    if spec.latent_size // spec.patch_size > spec.pos_embed_max_size:
        raise ValueError("pos_embed_max_size is smaller than the latent's patches per side")
    return SD3Transformer2DModel(
        sample_size=spec.latent_size, patch_size=spec.patch_size, in_channels=spec.latent_channels,
        out_channels=spec.latent_channels, num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.t5_d_model,
        caption_projection_dim=spec.inner_dim, pooled_projection_dim=pooled,
        pos_embed_max_size=spec.pos_embed_max_size,
    ).eval()


def sd3_pipeline(spec: FlowSpec = TINY_FLOW_SPEC, seed: int = 0, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """A random-weight ``StableDiffusion3Pipeline`` of ``spec``'s sizes (not saved: :func:`save_sd3`); the same
    seed, the same weights. ``shift``: the scheduler's sigma shift (SD3's 3.0 is for 1024 px)."""
    tok = build_tokenizer(spec.clip_tokens)
    tok3 = build_t5_tokenizer(max_length=spec.t5_max_length)
    torch.manual_seed(seed)  # every module draws its init from here, in this fixed order
    transformer = _transformer(spec)
    vae = _vae(spec)
    text_encoder = _clip(tok, spec.clip_hidden[0], spec.clip_projection[0], spec)
    text_encoder_2 = _clip(tok, spec.clip_hidden[1], spec.clip_projection[1], spec)
    text_encoder_3 = _t5(tok3, spec)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok,
        text_encoder_3=text_encoder_3, tokenizer_3=tok3,
    )


def save_sd3(pipe: StableDiffusion3Pipeline, folder: str | Path) -> Path:
    """``save_pretrained`` plus CLIP's classic vocab.json / merges.txt in both CLIP tokenizer folders."""
    out = Path(folder)
    pipe.save_pretrained(out)
    for name in ("tokenizer", "tokenizer_2"):
        save_tokenizer(getattr(pipe, name), out / name)
    return out


def build_tiny_sd3(folder: str | Path, seed: int = 0, spec: FlowSpec = TINY_FLOW_SPEC) -> Path:
    """Write a random-weight ``StableDiffusion3Pipeline`` folder; the same seed, the same weights."""
    return save_sd3(sd3_pipeline(spec, seed), folder)


@dataclass(frozen=True)
class FluxSpec:
    """Sizes of the tiny Flux.1 pipeline (the VAE, CLIP and T5 of :class:`FlowSpec`)."""

    flow: FlowSpec = TINY_FLOW_SPEC
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 2
    attention_head_dim: int = 8
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4)  # sums to attention_head_dim
    t5_max_length: int = 512  # FluxPipeline's default max_sequence_length
    guidance_embeds: bool = True  # FLUX.1 [dev]; False: [schnell]


TINY_FLUX_SPEC = FluxSpec()


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux.1's scheduler config: resolution-dependent shift at sampling, the unshifted sigmas in training."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny_flux(folder: str | Path, seed: int = 0, spec: FluxSpec = TINY_FLUX_SPEC) -> Path:
    """Write a random-weight ``FluxPipeline`` folder (FLUX.1 [dev]'s layout: guidance embedding on); the same
    seed, the same weights. Latents are 16 channels, packed 2x2 into 64-channel tokens (``patch_size`` 1);
    CLIP (``CLIPTextModel``) gives the pooled condition, T5 the token condition."""
    flow = spec.flow
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim "
                         f"{spec.attention_head_dim}")
    out = Path(folder)
    tok = build_tokenizer(flow.clip_tokens)
    tok2 = build_t5_tokenizer(max_length=spec.t5_max_length)
    torch.manual_seed(seed)  # every module draws its init from here, in this fixed order
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=flow.latent_channels * 4, num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=flow.t5_d_model,
        pooled_projection_dim=flow.clip_hidden[0], guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=spec.axes_dims_rope,
    ).eval()
    vae = _vae(flow, FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR)
    text_encoder = _clip(tok, flow.clip_hidden[0], flow.clip_projection[0], flow, cls=CLIPTextModel)
    text_encoder_2 = _t5(tok2, flow)
    pipe = FluxPipeline(transformer=transformer, scheduler=flux_scheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok2)
    pipe.save_pretrained(out)
    save_tokenizer(tok, out / "tokenizer")  # adds CLIP's classic vocab.json / merges.txt
    return out

"""Tiny models and datasets built from configs and saved to disk, so tests exercise the real loading code."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def write_char_tokenizer(folder: Path) -> None:
    """A real CLIPTokenizer whose vocabulary is every byte symbol (with and without ``</w>``), no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    tok.save_pretrained(folder)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _text_config(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                          num_hidden_layers=2, vocab_size=514, max_position_embeddings=16,
                          bos_token_id=512, eos_token_id=513, pad_token_id=513,
                          projection_dim=projection or hidden)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=32)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, prediction_type=prediction_type, steps_offset=1)


def build_tiny_sd15(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """An SD1.5-shaped pipeline (cross-attention U-Net, KL VAE /2, CLIP text encoder) in ``folder``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    write_char_tokenizer(folder / "_tok")
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(16)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "_tok"), unet=unet,
        scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline: two text encoders, text_time added conditions."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    pooled = 16
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 16, attention_head_dim=4, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + pooled, transformer_layers_per_block=1)
    write_char_tokenizer(folder / "_tok")
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(16)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(16, pooled)), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=_scheduler())
    pipe.save_pretrained(folder)
    return folder


def jpeg_bytes(rgb: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def write_pickapic_parquet(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    """Write rows (caption, jpg_0, jpg_1, label_0, label_1, image_0_uid, image_1_uid) in Pick-a-Pic v2 schema."""
    table = pa.table({
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
        "label_0": pa.array([float(r["label_0"]) for r in rows], pa.float64()),
        "label_1": pa.array([float(r["label_1"]) for r in rows], pa.float64()),
        "image_0_uid": pa.array([r.get("image_0_uid", f"u{i}a") for i, r in enumerate(rows)], pa.string()),
        "image_1_uid": pa.array([r.get("image_1_uid", f"u{i}b") for i, r in enumerate(rows)], pa.string()),
        "has_label": pa.array([True] * len(rows)),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def random_pairs(n: int, size: int = 40, seed: int = 0, ties: int = 1) -> list[dict]:
    """n rows of random-colour JPEG pairs; the first ``ties`` rows are ties, the rest alternate the winner."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        imgs = [rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for _ in range(2)]
        label_0 = 0.5 if i < ties else float(i % 2)
        rows.append({"caption": f"a picture number {i}", "jpg_0": jpeg_bytes(imgs[0]), "jpg_1": jpeg_bytes(imgs[1]),
                     "label_0": label_0, "label_1": 1.0 - label_0 if label_0 != 0.5 else 0.5})
    return rows


def step_inputs_with_lora(folder: Path):
    """The tiny SD1.5 at ``folder`` with a rank-4 LoRA whose B is random (policy != reference), its schedule,
    two pairs of latents (winners then losers) and their prompts' condition: the inputs of one preference step."""
    from ncp.models import add_lora, encode_prompts, load_models
    from ncp.schedule import NoiseSchedule

    models = load_models(str(folder), "auto", torch.device("cpu"), torch.float32)
    add_lora(models.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)
    for name, p in models.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    schedule = NoiseSchedule.from_scheduler(models.scheduler, torch.device("cpu"))
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return models, schedule, x0, encode_prompts(models, ["a red cube", "two blue balls"])


def cli_args(model, data, out, *extra: str) -> list[str]:
    """``python -m ncp.train`` arguments for a tiny CPU run: the bundled world's recipe (``--config=default``: a
    run naming a model would get its family's recipe), the model at ``model``, the data at ``data`` through
    the torch backend, 32 px, batch 2, rank 4, no report / progress bar / TensorBoard, and NCP-DPO (beta 2e6) on
    every pair: the tests do not follow the bundled default run's objective and data filter (default.yaml), which
    a few-row test file would empty. ``extra`` come last, and a later override of the same key wins
    (``ncp.config.apply_overrides`` applies them in order)."""
    args = ["--config=default", f"model.path={model}", f"data.sources=[{data}]", "data.backend=torch", "data.resolution=32",
            "objective.name=ncp-dpo", "objective.beta=2e6", "data.absolute_winners=false",
            "data.batch_size=2", "data.num_workers=0", "lora.rank=4", f"train.output_dir={out}",
            "optim.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false", "train.report=false",
            *extra]
    return only_read_overrides(args)


def overrides_of(args: list[str]) -> list[str]:
    """The ``section.key=value`` items of CLI arguments (``load_config`` takes no ``--config``)."""
    return [a for a in args if not a.startswith("--")]


def only_read_overrides(args: list[str]) -> list[str]:
    """``args`` without the ``objective.*`` overrides the final objective does not read (the CLI refuses them:
    ``ncp.config.check_overrides_apply``), so one argument list serves every objective."""
    from ncp.config import unread_objective_keys

    names = [a.partition("=")[2] for a in args if a.startswith("objective.name=")]
    unread = unread_objective_keys(names[-1] if names else "kto", [a.partition("=")[0] for a in args])
    return [a for a in args if a.partition("=")[0] not in unread]


def lora_moves_unet(model: Path, lora: Path) -> float:
    """The largest change a saved diffusers-format LoRA makes to the tiny SD1.5 U-Net's output, loaded the
    way a user loads it (``pipe.load_lora_weights``), on fixed random inputs."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 10, encoder_hidden_states=ehs).sample
        pipe.load_lora_weights(str(lora))
        after = pipe.unet(x, 10, encoder_hidden_states=ehs).sample
    return float((after - before).abs().max())


def criterion_of(name: str, schedule, taps=("mid",), tap_weights=None, num_down_blocks: int = 4, **fields):
    """``Criterion.make`` for tests that run one objective or another on the same taps: the taps and their
    weights go to the perceptual objectives only (a latent objective refuses them, as the CLI does)."""
    from ncp.criterion import Criterion
    from ncp.objectives import OBJECTIVES

    if OBJECTIVES[name].space == "perceptual":
        fields = {"taps": list(taps), **({"tap_weights": list(tap_weights)} if tap_weights else {}), **fields}
    return Criterion.make(name, schedule, num_down_blocks=num_down_blocks, **fields)

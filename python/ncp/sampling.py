"""Batched, seed-exact sampling from a diffusers text-to-image pipeline.

Each image gets its own ``torch.Generator`` seeded by its seed, so an image
depends only on (prompt, seed), never on the batch it was drawn in: base and
aligned models are compared on the same noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def sampling_defaults(model_dir: str | Path) -> tuple[int, float]:
    """(steps, guidance) recorded in the bundle's world.json next to the model, else the defaults."""
    for cand in (Path(model_dir) / "world.json", Path(model_dir).parent / "world.json"):
        if cand.is_file():
            s = json.loads(cand.read_text()).get("sampling", {})
            return int(s.get("steps", DEFAULT_STEPS)), float(s.get("guidance_scale", DEFAULT_GUIDANCE))
    return DEFAULT_STEPS, DEFAULT_GUIDANCE


def load_pipeline(model_dir: str | Path, lora_dir: str | Path | None = None):
    """A StableDiffusionPipeline on the CPU, quiet, with the LoRA loaded when given."""
    from ncp.models import quiet_loading
    from ncp.pipelines import load_unet_lora, pipeline_class

    with quiet_loading():
        pipe = pipeline_class("sd15").from_pretrained(str(model_dir), safety_checker=None,
                                                      requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        load_unet_lora(pipe, lora_dir)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch_size: int = 64, desc: str | None = None) -> list[np.ndarray]:
    """uint8 (H, W, 3) images, one per (prompt, seed)."""
    out: list[np.ndarray] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False)
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i: i + batch_size], seeds[i: i + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]
        imgs = pipe(prompt=ps, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                    output_type="np").images
        out.extend((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
        bar.update(len(ps))
    bar.close()
    return out

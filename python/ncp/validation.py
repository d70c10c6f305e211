"""Validation images while training: base vs the current LoRA on fixed prompts and seeds.

Every ``logging.validation_every`` optimizer steps the run draws each prompt of
``logging.validation_prompts`` (one a line) with ``logging.validation_seeds``
seeds, with the adapters off (the base model) and on (the LoRA so far), and
writes ``validation/step-000050.png`` under the run folder (one row per prompt,
base and LoRA side by side per seed), the same grid to TensorBoard, and a line
under the progress bar. The pipeline is built around the training modules (no
second U-Net in memory); the sampling is ``ncp.sampling.generate``. Each
image has its own seeded generator and the global RNG state is restored
afterwards, so validation neither depends on nor changes the training
randomness: a resumed run draws the same images, and a run trains the same with
or without validation.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ncp.models import Models, adapters_disabled
from ncp.families import family
from ncp.sampling import generate, save_grid

SEED = 1234  # validation seeds are SEED + k, apart from train.seed: the same images for every run


def validation_scheduler(model_path: str, models: Models):
    """The scheduler the pipeline was saved with (model_index.json), as ``load_pipeline`` samples; a copy of
    the training scheduler when the folder does not name one."""
    import diffusers

    index = Path(model_path) / "model_index.json"
    name = json.loads(index.read_text()).get("scheduler", [None, None])[1] if index.is_file() else None
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        return type(models.scheduler).from_config(models.scheduler.config)
    return cls.from_pretrained(model_path, subfolder="scheduler")


def training_pipeline(models: Models, unet: nn.Module, scheduler):
    """A text-to-image pipeline around the training modules (the LoRA U-Net itself, not a copy)."""
    pipe = family(models.kind).training_pipeline(models.vae, models.text_encoders, models.tokenizers, unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def sampling_mode(models: Models, unet: nn.Module) -> Iterator[None]:
    """Eval mode, the VAE and text encoders on the U-Net's device (training from the latent cache keeps them
    on the CPU), the global RNG state restored on exit."""
    moved = [m for m in (models.vae, *models.text_encoders) if m.device != models.device]
    was_training = unet.training
    with torch.random.fork_rng(devices=[models.device] if models.device.type == "cuda" else []):
        try:
            for m in moved:  # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (0.42)
                nn.Module.to(m, models.device, models.weight_dtype)
            unet.eval()
            yield
        finally:
            unet.train(was_training)
            for m in moved:
                nn.Module.to(m, torch.device("cpu"), torch.float32)


class Validator:
    """Draws, saves and returns the validation grid of a step; the base images are drawn once per process."""

    def __init__(self, models: Models, unet: nn.Module, model_path: str, prompts: list[str], n_seeds: int,
                 steps: int, guidance: float, out_dir: Path):
        if not prompts:
            raise ValueError("logging.validation_prompts holds no prompt")
        self.models, self.unet, self.out_dir = models, unet, out_dir
        self.prompts = [p for p in prompts for _ in range(n_seeds)]
        self.seeds = [SEED + k for _ in prompts for k in range(n_seeds)]
        self.n_seeds, self.steps, self.guidance = n_seeds, steps, guidance
        self.pipe = training_pipeline(models, unet, validation_scheduler(model_path, models))
        self.base: list[np.ndarray] | None = None

    def _draw(self) -> list[np.ndarray]:
        return generate(self.pipe, self.prompts, self.seeds, self.steps, self.guidance)

    def __call__(self, step: int) -> Path:
        with sampling_mode(self.models, self.unet):
            if self.base is None:
                with adapters_disabled(self.unet):
                    self.base = self._draw()
            lora = self._draw()
        rows = [(self.prompts[i], [im for s in range(self.n_seeds) for im in (self.base[i + s], lora[i + s])])
                for i in range(0, len(self.prompts), self.n_seeds)]
        titles = [f"{v} s{s}" for s in range(self.n_seeds) for v in ("base", f"step {step}")]
        path = self.out_dir / "validation" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(path, rows, titles)
        return path


def read_grid(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a saved grid (for TensorBoard)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))

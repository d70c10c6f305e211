"""Batched, seed-exact sampling from a diffusers text-to-image pipeline, and the labelled image grid.

Each image gets its own ``torch.Generator`` seeded by its seed, so an image
depends only on (prompt, seed), never on the batch it was drawn in: base and
aligned models are compared on the same noise. ``read_prompts`` reads a prompt
file, ``save_grid`` draws the prompt-by-(variant, seed) grid that evaluation,
validation and the report write.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ncp.models import quiet_loading
from ncp.pipelines import load_unet_lora

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def sampling_defaults(model_dir: str | Path) -> tuple[int, float]:
    """(steps, guidance) recorded in the bundle's world.json next to the model, else the defaults."""
    for cand in (Path(model_dir) / "world.json", Path(model_dir).parent / "world.json"):
        if cand.is_file():
            s = json.loads(cand.read_text()).get("sampling", {})
            return int(s.get("steps", DEFAULT_STEPS)), float(s.get("guidance_scale", DEFAULT_GUIDANCE))
    return DEFAULT_STEPS, DEFAULT_GUIDANCE


def read_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """One prompt a line (.txt), a .tsv/.csv with a prompt column (PartiPrompts: 'Prompt'), or a parquet
    file's column (``column``, else ``caption`` as Pick-a-Pic names it; each prompt once, in order). UTF-8; a
    byte-order mark (as Windows editors write) is dropped, not kept in the first prompt or column name."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(path).schema_arrow.names
        col = column if column in names else "caption" if column == "prompt" and "caption" in names else None
        if col is None:
            raise ValueError(f"{path}: no {column!r} column (columns: {names})")
        values = pq.read_table(path, columns=[col]).column(col).to_pylist()
        return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))
    if path.suffix.lower() in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            names = {n.lower(): n for n in reader.fieldnames or []}
            if column.lower() not in names:
                raise ValueError(f"{path}: no {column!r} column (columns: {reader.fieldnames})")
            return [row[names[column.lower()]].strip() for row in reader if row[names[column.lower()]].strip()]
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def load_pipeline(model_dir: str | Path, lora_dir: str | Path | None = None, *, kind: str | None = None,
                  scheduler: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers text-to-image pipeline (SD1.5-style, or SDXL: ``kind``, else detected from the folder),
    quiet, on ``device``, with the LoRA loaded when given and ``scheduler`` (a diffusers scheduler class
    name, e.g. ``DPMSolverMultistepScheduler``) built from the model's scheduler config when given."""
    from ncp.families import detect_kind, family

    fam = family(kind or detect_kind(str(model_dir)))
    with quiet_loading():
        pipe = fam.pipeline_class().from_pretrained(str(model_dir), dtype=dtype, **fam.pipeline_kwargs)
    if scheduler:
        pipe.scheduler = scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        load_unet_lora(pipe, lora_dir)
    return pipe.to(device)


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name``, or a ValueError listing the known ones."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and isinstance(getattr(diffusers, n, None), type))
        raise ValueError(f"unknown diffusers scheduler {name!r}; known: {', '.join(known)}")
    return cls


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch_size: int = 64, desc: str | None = None) -> list[np.ndarray]:
    """uint8 (H, W, 3) images, one per (prompt, seed), conditioned as the family trains (its
    ``sampling_kwargs``: the T5 length of SD3 and Flux)."""
    from ncp.families import pipeline_family

    extra = pipeline_family(pipe).sampling_kwargs(pipe)
    out: list[np.ndarray] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False)
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i: i + batch_size], seeds[i: i + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]  # CPU noise: the same images on any device
        imgs = pipe(prompt=ps, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                    output_type="np", **extra).images
        out.extend((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
        bar.update(len(ps))
    bar.close()
    return out


def save_grid(path: str | Path, rows: list[tuple[str, list[np.ndarray]]], col_titles: list[str], cell: int = 96) -> None:
    """A labelled image grid: one row per prompt, one column per (variant, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(col_titles)
    fig, axes = plt.subplots(nr, nc, figsize=(1.3 * nc + 2.5, 1.35 * nr + 0.4), squeeze=False)
    for r, (prompt, imgs) in enumerate(rows):
        for c, im in enumerate(imgs):
            ax = axes[r][c]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
        axes[r][0].set_ylabel(_wrap(prompt), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])

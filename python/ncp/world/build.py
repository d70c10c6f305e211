"""Builds the bundled world: base pipeline, Pick-a-Pic-style preferences, held-out prompts.

``python -m ncp.world build [--out DIR] [--seed N] [--tiny] [--family sd15|sd3]``. The same seed
gives the same files (single-threaded CPU math). ``--family sd3`` builds the flow world: the same scenes,
judge, captioner and preference data on a small Stable Diffusion 3 pipeline (``ncp.world.flow_world``).
Layout of ``DIR``::

    model/                     diffusers pipeline folder (save_pretrained)
    data/train-00000.parquet   Pick-a-Pic v2 schema
    data/heldout_prompts.txt   evaluation prompts, never trained on
    world.json                 the spec, seed and measured statistics
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ncp.sampling import generate, load_pipeline
from ncp.scoring.judge import judge_many
from ncp.scoring.scenes import sample_prompt
from ncp.world.flow_model import FlowSpec
from ncp.world.flow_world import FLOW_PRETRAIN, TINY_WORLD_FLOW_SPEC, WORLD_FLOW_SPEC, pretrain_sd3
from ncp.world.model import TINY_SPEC, ModelSpec, assemble_pipeline, build_scheduler, build_text_encoder, build_unet, build_vae, n_params
from ncp.world.prefdata import AnnotatorConfig, make_rows, pair_stats, write_parquet
from ncp.world.pretrain import PretrainConfig, SceneStream, to_unit, train_denoiser, train_vae
from ncp.world.tokenizer import build_tokenizer, save_tokenizer


FAMILIES = ("sd15", "sd3")


@dataclass
class BuildConfig:
    seed: int = 0
    spec: ModelSpec | FlowSpec = field(default_factory=ModelSpec)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    n_heldout: int = 64
    n_train_prompts: int = 240
    samples_per_prompt: int = 4
    sample_steps: int = 20
    guidance_scale: float = 3.0
    eval_seeds: int = 8  # 64 held-out prompts x 8 seeds = 512 paired images per model in the report
    threads: int = 1

    @property
    def family(self) -> str:
        """The base model's family, from the spec's type: "sd15" (a U-Net) or "sd3" (an MM-DiT)."""
        return "sd3" if isinstance(self.spec, FlowSpec) else "sd15"


def default_config(seed: int = 0, family: str = "sd15") -> BuildConfig:
    """The full build of ``family``: the bundled world ("sd15") or the flow world ("sd3")."""
    if family == "sd15":
        return BuildConfig(seed=seed)
    if family == "sd3":
        return BuildConfig(seed=seed, spec=WORLD_FLOW_SPEC, pretrain=FLOW_PRETRAIN)
    raise ValueError(f"unknown world family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_config(seed: int = 0, family: str = "sd15") -> BuildConfig:
    """A seconds-long build for tests: same code paths, toy sizes."""
    if family not in FAMILIES:
        raise ValueError(f"unknown world family {family!r}; choose one of {', '.join(FAMILIES)}")
    return BuildConfig(
        seed=seed, spec=TINY_SPEC if family == "sd15" else TINY_WORLD_FLOW_SPEC,
        pretrain=PretrainConfig(vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8, warmup=1, latent_pool=16,
                                 more_unet_steps=(2,), more_unet_lr=(5e-4,)),
        n_heldout=4, n_train_prompts=6, samples_per_prompt=3, sample_steps=3, eval_seeds=1,
    )


def unique_prompts(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        c = sample_prompt(rng).caption()
        if c not in exclude and c not in out:
            out.append(c)
    return out


def judge_summary(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    js = judge_many(images, prompts)
    return {"score": float(np.mean([j.score for j in js])), "alignment": float(np.mean([j.alignment for j in js])),
            "quality": float(np.mean([j.quality for j in js])), "accuracy": float(np.mean([j.correct for j in js])),
            "n": len(js)}


def _vae_recon_summary(vae, stream: SceneStream, n: int) -> dict[str, float]:
    caps, imgs = stream.batch(n)
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_unit(imgs)).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return judge_summary(list(rec), caps)


def _logged_vae_recon(vae, cfg: BuildConfig, log: Callable[[str], None]) -> dict[str, float]:
    recon = _vae_recon_summary(vae, SceneStream(cfg.seed + 2, cfg.spec.resolution, set()),
                               64 if cfg.n_heldout > 8 else 4)
    log(f"vae reconstructions, judge: {recon}")
    return recon


def build_world(out: str | Path, cfg: BuildConfig, log: Callable[[str], None] = print,
                reuse_stages: bool = False, keep_stages: bool = False, data_only: bool = False) -> dict:
    """Runs every stage and writes the bundle; returns world.json's content.

    Each pretrained stage is saved in ``out/.stages`` while the build runs and
    removed at the end unless ``keep_stages``; ``reuse_stages`` loads the kept
    stages instead of training them again (to redo only the later stages).
    ``data_only`` loads the pipeline already saved in ``out/model`` and redoes
    only the preference data and the held-out statistics: the result is what a
    full build with the same seed writes, since the data depends only on the
    saved pipeline, the seed and the annotator settings.
    """
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    rng = random.Random(cfg.seed)
    heldout = unique_prompts(rng, cfg.n_heldout, set())
    train_prompts = unique_prompts(rng, cfg.n_train_prompts, set(heldout))

    prior: dict = {}
    if data_only:
        pipe, vae_recon, prior = _load_built(out, timings)
    else:
        pipe, vae_recon = _pretrain(out, cfg, log, reuse_stages, timings, heldout)
    pipe.set_progress_bar_config(disable=True)

    t0 = time.time()
    base = _sample_and_judge_heldout(pipe, heldout, cfg)
    log(f"base model on held-out prompts, judge: {base}")
    k = cfg.samples_per_prompt
    prompts = [p for p in train_prompts for _ in range(k)]
    seeds = [cfg.seed * 1_000_000 + i for i in range(len(prompts))]
    imgs = generate(pipe, prompts, seeds, cfg.sample_steps, cfg.guidance_scale, desc="sampling preference data")
    scores = [j.score for j in judge_many(imgs, prompts)]
    rows = make_rows(train_prompts, [imgs[i * k:(i + 1) * k] for i in range(len(train_prompts))],
                     [scores[i * k:(i + 1) * k] for i in range(len(train_prompts))], cfg.seed, cfg.annotator)
    write_parquet(rows, str(out / "data" / "train-00000.parquet"))
    (out / "data" / "heldout_prompts.txt").write_text("\n".join(heldout) + "\n")
    timings["data_s"] = time.time() - t0

    world = {
        "seed": cfg.seed, "spec": asdict(cfg.spec), "pretrain": asdict(cfg.pretrain),
        "annotator": asdict(cfg.annotator), "n_heldout": cfg.n_heldout, "n_train_prompts": cfg.n_train_prompts,
        "samples_per_prompt": k,
        "sampling": {"steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale, "eval_seeds": cfg.eval_seeds},
        "family": cfg.family,
        "params": {name: n_params(getattr(pipe, name)) for name in _COMPONENTS[cfg.family]},
        "stats": {"vae_reconstruction": vae_recon, "base_heldout": base, "pairs": pair_stats(rows),
                  "preference_samples": judge_summary(imgs, prompts)},
        "timings": {k2: round(v, 1) for k2, v in timings.items()},
        # how the model was built: a --data-only pass keeps the saved model, so it keeps this too
        "reused_stages": bool(prior.get("reused_stages", False)) if data_only else bool(reuse_stages),
        "data_only": bool(data_only),
    }
    # --data-only keeps what it does not redo, such as notes added to world.json by hand
    world |= {k: v for k, v in prior.items() if k not in world}
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    if not (keep_stages or reuse_stages or data_only):
        shutil.rmtree(out / ".stages", ignore_errors=True)
    return world


_COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"),
               "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}


def _sample_and_judge_heldout(pipe, heldout: list[str], cfg: BuildConfig) -> dict[str, float]:
    prompts = [p for p in heldout for _ in range(cfg.eval_seeds)]
    seeds = [s for _ in heldout for s in range(cfg.eval_seeds)]
    imgs = generate(pipe, prompts, seeds, cfg.sample_steps, cfg.guidance_scale, desc="sampling held-out prompts")
    return judge_summary(imgs, prompts)


def _pretrain(out: Path, cfg: BuildConfig, log: Callable[[str], None], reuse_stages: bool,
              timings: dict[str, float], heldout: list[str]):
    """Trains (or reloads from ``out/.stages``) the VAE and the denoiser; saves ``out/model``."""
    res = cfg.spec.resolution
    if cfg.family == "sd3":
        pipe = pretrain_sd3(out, cfg.spec, cfg.pretrain, cfg.seed, heldout, log, reuse_stages, timings)
        return pipe, _logged_vae_recon(pipe.vae, cfg, log)
    t0 = time.time()
    tokenizer = build_tokenizer(cfg.spec.max_tokens)
    vae, unet = build_vae(cfg.spec), build_unet(cfg.spec)
    text_encoder, scheduler = build_text_encoder(cfg.spec, tokenizer), build_scheduler()
    stages = out / ".stages"
    if reuse_stages and (stages / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(stages / "vae")
        log(f"reusing the VAE of {stages / 'vae'}")
    else:
        train_vae(vae, SceneStream(cfg.seed + 1, res, set(heldout)), cfg.pretrain, log)
        vae.save_pretrained(stages / "vae")
    timings["vae_s"] = time.time() - t0
    vae_recon = _logged_vae_recon(vae, cfg, log)

    t0 = time.time()
    for phase, (steps, lr) in enumerate(cfg.pretrain.phases()):
        folder = stages if phase == 0 else stages / f"phase{phase + 1}"
        if reuse_stages and (folder / "unet" / "config.json").is_file():
            unet = UNet2DConditionModel.from_pretrained(folder / "unet")
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
            log(f"reusing the U-Net and text encoder of {folder}")
            continue
        clean = phase < cfg.pretrain.clean_phases
        confusion = 0.0 if clean else cfg.pretrain.color_confusion
        log(f"denoiser phase {phase + 1}: {steps} steps, lr {lr:g}, "
            + ("truthful captions, text encoder trained" if clean else f"colour confusion {confusion:g}, text encoder frozen"))
        unet, text_encoder = train_denoiser(unet, text_encoder, tokenizer, vae, scheduler,
                                            SceneStream(cfg.seed + 3 + 10 * phase, res, set(heldout),
                                                        confusion, cfg.pretrain.confused_colors),
                                            cfg.pretrain, log, steps=steps, lr=lr, train_text_encoder=clean)
        unet.save_pretrained(folder / "unet")
        text_encoder.save_pretrained(folder / "text_encoder")
    timings["unet_s"] = time.time() - t0
    pipe = assemble_pipeline(vae, unet, text_encoder, tokenizer, scheduler)
    pipe.save_pretrained(out / "model")
    save_tokenizer(tokenizer, out / "model" / "tokenizer")
    return pipe, vae_recon


def _load_built(out: Path, timings: dict[str, float]):
    """The pipeline and VAE statistics of a world already built in ``out`` (``data_only``); keeps its timings."""
    model, meta = out / "model", out / "world.json"
    if not (model / "model_index.json").is_file() or not meta.is_file():
        raise FileNotFoundError(f"--data-only needs a built world in {out} (model/ and world.json); run a full build first")
    prior = json.loads(meta.read_text())
    timings.update({k: v for k, v in prior.get("timings", {}).items() if k != "data_s"})
    return load_pipeline(model), prior["stats"]["vae_reconstruction"], prior

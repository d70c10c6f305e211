"""End-to-end benchmark: the training loop as users run it, ncp against the baseline Diffusion-DPO pipeline.

Full-size SD1.5 (512 px) and SDXL (1024 px) pipelines of random weights are built from
their published configs (U-Nets from ``step.py``; VAE and CLIP text encoders below; a
byte-level tokenizer of CLIP's 77 tokens stands in for CLIP's BPE vocabulary) and saved
as a diffusers folder, which every pipeline loads as users do. The data is a generated
Pick-a-Pic v2-format parquet dataset of JPEG pairs (see ``write_dataset``). Pipelines,
each in its own process (clean peak memory), DPO objective unless ``--objectives``:

- ``ncp-jpeg``: ``ncp.train`` (``python -m ncp.train``'s loop): Rust loader, VAE encode and
  text encoding every step, LoRA step; pairs/s, TFLOP/s and MFU as it logs them.
- ``ncp-cache``: ``python -m ncp.cache`` first (timed apart), then ``ncp.train`` from the latent
  cache: the step alone plus reading the cache.
- ``baseline``: as Diffusion-DPO's ``train.py``: a torch DataLoader whose workers decode with
  PIL, VAE and text encoder every step (fp16 on CUDA), and ``step.py``'s ``BaselineStep``
  (the whole U-Net trained with an fp16 reference copy; Adafactor, checkpointing and an
  offloaded reference for SDXL).

    python benchmarks/e2e.py                 # CUDA: SD1.5 at 512 px (--model both adds SDXL at 1024 px)
    python benchmarks/e2e.py --cpu-small     # CPU: reduced components at 128 px, a few minutes (automatic on CPU)

Writes benchmarks/results/e2e.json (and $OUT/e2e.json when $OUT is set) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step import MODELS as STEP_MODELS  # noqa: E402  (the published U-Net configs, BaselineStep)
from step import SCHEDULER, BaselineStep, machine, print_report, write_report  # noqa: E402
from goals import goal  # noqa: E402  (benchmarks/goals.yaml)

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json (SDXL's VAE: the same network, scaling 0.13025)
VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}
# openai/clip-vit-large-patch14's text tower (SD1.5 text_encoder, SDXL text_encoder)
CLIP_L: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                          "num_hidden_layers": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
# laion/CLIP-ViT-bigG-14's text tower (SDXL text_encoder_2, with projection)
CLIP_BIGG: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                             "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}
TEXT_LEN = 77

# --cpu-small: the same architectures, narrower and shallower (minutes on 2 CPU cores)
SMALL_UNET = {"block_out_channels": [32, 64, 128, 128], "attention_head_dim": 4, "cross_attention_dim": 64,
              "norm_num_groups": 16}
SMALL_UNET_XL = {"block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8],
                 "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 64 + 64,
                 "projection_class_embeddings_input_dim": 64 + 6 * 256, "norm_num_groups": 16}
SMALL_VAE = {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}
SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
              "projection_dim": 64}

# Pick-a-Pic v2 (yuvalkirstain/pickapic_v2) was written by Hugging Face `datasets`' push_to_hub: ~500 MB
# shards (config.MAX_SHARD_SIZE) whose binary image columns are written in row groups of 100 rows
# (config.PARQUET_ROW_GROUP_SIZE_FOR_BINARY_DATASETS), snappy. Taken from the `datasets` source, not read
# from the published files (no network here): an assumption the GPU run does not test.
ROW_GROUP_ROWS = 100
PIPELINES = ("ncp-jpeg", "ncp-cache", "baseline")


# ---------------------------------------------------------------- the pipeline folder and the data


def _byte_level_tokenizer(folder: Path) -> None:
    """A real CLIPTokenizer over byte symbols (no merges), 77 tokens: CLIP's padding and length, no vocab file."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LEN).save_pretrained(folder)


def unet_config(model: str, small: bool) -> dict[str, Any]:
    config = dict(STEP_MODELS[model]["unet"])
    if small:
        config.update(SMALL_UNET_XL if model == "sdxl" else SMALL_UNET)
    return config


def build_pipeline(folder: Path, model: str, small: bool, device: str = "cpu") -> Path:
    """Random-weight SD1.5 / SDXL components from their configs, initialised on ``device`` (a GPU draws
    SDXL's 3.5 B random weights in a second) and saved as a diffusers folder (bf16 on disk: loading casts
    to the run's dtype)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    _byte_level_tokenizer(folder / "_tok")
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")

    def text(spec: dict[str, Any], projection: bool):
        spec = dict(spec, **(SMALL_CLIP if small else {}))
        config = CLIPTextConfig(**spec, vocab_size=49408, max_position_embeddings=TEXT_LEN,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    vae = dict(VAE, **(SMALL_VAE if small else {}))
    if model == "sdxl":
        vae.update(scaling_factor=0.13025, sample_size=1024, force_upcast=True)
    with torch.device(device):
        parts = dict(unet=UNet2DConditionModel.from_config(unet_config(model, small)), vae=AutoencoderKL(**vae),
                     scheduler=DDPMScheduler.from_config(SCHEDULER), tokenizer=tok, text_encoder=text(CLIP_L, False))
        text_2 = text(CLIP_BIGG, True) if model == "sdxl" else None
    if model == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**parts, tokenizer_2=tok, text_encoder_2=text_2)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(torch.bfloat16).to("cpu").save_pretrained(folder)
    return folder


def _jpeg_pair(args: tuple[int, int, int]) -> tuple[bytes, bytes]:
    """Two JPEGs (q=90) with the byte size of generated images: smooth colour fields, edges and grain."""
    import numpy as np
    from PIL import Image, ImageFilter

    seed, px, quality = args
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((px, px), Image.BICUBIC)
        detail = Image.fromarray(rng.integers(0, 256, (px // 8, px // 8, 3), dtype=np.uint8)).resize(
            (px, px), Image.NEAREST).filter(ImageFilter.GaussianBlur(2))
        img = Image.blend(field, detail, 0.35)
        grain = rng.normal(0, 6, (px, px, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out[0], out[1]


def write_dataset(folder: Path, pairs: int, px: int, shards: int, workers: int) -> list[Path]:
    """``pairs`` rows of the Pick-a-Pic v2 schema in ``shards`` parquet files, row groups of ROW_GROUP_ROWS."""
    import multiprocessing

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    if all(p.is_file() for p in paths):
        return paths
    with multiprocessing.Pool(max(1, workers)) as pool:
        jpegs = pool.map(_jpeg_pair, [(i, px, 90) for i in range(pairs)], chunksize=8)
    per = -(-pairs // shards)
    for s, path in enumerate(paths):
        rows = range(s * per, min(pairs, (s + 1) * per))
        table = pa.table({
            "caption": [f"a photograph of scene number {i} with {i % 7} objects, detailed, 4k" for i in rows],
            "jpg_0": pa.array([jpegs[i][0] for i in rows], pa.binary()),
            "jpg_1": pa.array([jpegs[i][1] for i in rows], pa.binary()),
            "label_0": [float(i % 2) for i in rows], "label_1": [float(1 - i % 2) for i in rows],
            "image_0_uid": [f"{i}a" for i in rows], "image_1_uid": [f"{i}b" for i in rows],
            "has_label": [True] * len(rows)})
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="snappy")
    return paths


# ---------------------------------------------------------------- the workers


def _ncp_config(spec: dict[str, Any], out: Path, cache_dir: str | None) -> list[str]:
    cuda = spec["device"] == "cuda"
    return [
        f"model.path={spec['model_dir']}", f"model.kind={spec['model']}",
        f"model.weight_dtype={'bf16' if cuda else 'fp32'}",
        "train.mixed_precision=bf16" if cuda else "train.mixed_precision='no'",  # (YAML reads a bare no as false)
        f"model.gradient_checkpointing={str(spec['model'] == 'sdxl').lower()}",
        f"data.sources=[{spec['data_glob']}]", "data.backend=rust", f"data.resolution={spec['resolution']}",
        f"data.batch_size={spec['batch']}", f"data.num_workers={spec['loader_threads']}",
        *([f"data.cache_dir={cache_dir}"] if cache_dir else []),
        f"objective.name={spec['objective']}", "objective.taps=[auto]",
        f"train.max_steps={spec['warmup'] + spec['steps']}", "train.checkpoint_every=0",
        f"train.output_dir={out}", f"train.cpu_threads={spec.get('threads') or 0}",
        "logging.progress=false", "logging.tensorboard=false", "train.report=false",
        *(["lora.rank=8", "lora.alpha=8"] if spec["small"] else []),  # rank 64 would outsize the small layers
        *spec.get("overrides", []),
    ]


def run_ncp(spec: dict[str, Any]) -> dict[str, Any]:
    """``ncp.train.train`` as the CLI runs it; the numbers are the metrics it logs (timed steps only)."""
    from ncp.config import load_config
    from ncp.train import train

    out = Path(spec["work"]) / f"run-{spec['pipeline']}-{spec['objective']}"
    cache_dir = None
    row: dict[str, Any] = {}
    if spec["pipeline"] == "ncp-cache":
        cache_dir = str(Path(spec["work"]) / f"cache-{spec['model']}-{spec['resolution']}")
        row["cache_build"] = build_cache(spec, cache_dir)
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends: a run folder of an earlier call would mix in
    t0 = time.perf_counter()
    train(load_config(None, _ncp_config(spec, out, cache_dir)))
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    timed = lines[spec["warmup"]:]
    med = lambda key: statistics.median(m[key] for m in timed) if key in timed[0] else None  # noqa: E731
    row.update(pairs_per_s=med("perf/pairs_per_s"), step_s=med("perf/step_s"), tflops=med("perf/tflops"),
               mfu=med("perf/mfu"), peak_mem_mb=max(m["perf/peak_mem_mb"] for m in lines),
               pairs_per_s_all=[round(m["perf/pairs_per_s"], 4) for m in timed], run_s=time.perf_counter() - t0,
               loss_finite=all(m["loss"] == m["loss"] for m in lines))
    return row


def build_cache(spec: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """``python -m ncp.cache`` over the dataset (both flips, as random_flip trains), timed (a cache of this ncp's
    format already in ``--work`` is reused and says so; one of an older format is rebuilt in its place)."""
    from ncp.data import DataError
    from ncp.data.cache import read_index

    try:
        read_index(cache_dir)
        return {"reused": cache_dir}
    except DataError:  # none, or an older format
        pass
    cmd = [sys.executable, "-m", "ncp.cache", "--model", spec["model_dir"], "--sources", spec["data_glob"],
           "--out", cache_dir, "--resolution", str(spec["resolution"]), "--flip", "--device", spec["device"],
           "--dtype", "bfloat16" if spec["device"] == "cuda" else "float32", "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 1), "pairs": spec["pairs"], "pairs_per_s": round(spec["pairs"] / seconds, 2),
            "command": " ".join(cmd[1:])}


class PickapicPairs:
    """Diffusion-DPO's data path: a map-style Dataset over the parquet rows, PIL decode, resize (shorter side),
    center crop, one flip per pair, winner first, ties dropped; the DataLoader's workers run it."""

    def __init__(self, paths: list[str], resolution: int):
        import pyarrow.parquet as pq

        self.paths, self.resolution = paths, resolution
        self.index = []  # (file, row) of non-tied pairs
        for f, path in enumerate(paths):
            labels = pq.read_table(path, columns=["label_0"]).column("label_0").to_pylist()
            self.index += [(f, r) for r, label in enumerate(labels) if label != 0.5]
        self.tables: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _image(self, data: bytes, flip: bool):
        import numpy as np
        import torch
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        r = self.resolution
        scale = r / min(img.size)
        img = img.resize((max(r, round(img.width * scale)), max(r, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - r) // 2, (img.height - r) // 2
        img = img.crop((left, top, left + r, top + r))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    def __getitem__(self, i: int) -> dict[str, Any]:
        import random

        import pyarrow.parquet as pq

        f, r = self.index[i]
        if f not in self.tables:  # each worker opens the files it reads once (datasets memory-maps them)
            self.tables[f] = pq.read_table(self.paths[f])
        row = self.tables[f].slice(r, 1).to_pylist()[0]
        first, second = (row["jpg_0"], row["jpg_1"]) if row["label_0"] >= row["label_1"] else (row["jpg_1"], row["jpg_0"])
        flip = random.random() < 0.5
        return {"winner": self._image(first, flip), "loser": self._image(second, flip), "caption": row["caption"]}


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline pipeline: DataLoader (PIL workers) -> VAE + text encoders every step -> BaselineStep."""
    import glob

    import torch

    from ncp.flops import full_finetune_dpo_flops, peak_flops
    from ncp.families import family
    from ncp.models import Conditioning, Models, encode_prompts, load_models

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    # Diffusion-DPO: VAE and text encoders in the half precision (SDXL's VAE in fp32: it overflows in fp16)
    loaded = load_models(spec["model_dir"], spec["model"], device, half, with_unet=False)
    vae = loaded.vae.to(torch.float32) if spec["model"] == "sdxl" else loaded.vae
    encoders = Models(loaded.kind, None, vae, loaded.text_encoders, loaded.tokenizers, loaded.scheduler, half, device)
    step_spec = dict(model=spec["model"], checkpointing=spec["model"] == "sdxl",
                     offload_ref=spec["model"] == "sdxl" and cuda, unet_config=unet_config(spec["model"], spec["small"]))
    runner = BaselineStep(step_spec, device)
    dataset = PickapicPairs(sorted(glob.glob(spec["data_glob"])), spec["resolution"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch"], shuffle=True, drop_last=True,
                                         num_workers=spec["loader_workers"], persistent_workers=spec["loader_workers"] > 0,
                                         pin_memory=cuda)
    times, losses = [], []
    data = iter(loader)
    for i in range(spec["warmup"] + spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            batch = next(data)
        except StopIteration:
            data = iter(loader)
            batch = next(data)
        with torch.no_grad():
            pixels = torch.cat([batch["winner"], batch["loser"]]).to(device, vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            cond: Conditioning = encode_prompts(encoders, list(batch["caption"]))
        b = len(batch["caption"])
        inp = dict(x0=latents.to(runner.half), hidden=cond.hidden_states.to(runner.half), pooled=None, time_ids=None)
        if spec["model"] == "sdxl":
            r = spec["resolution"]
            inp["pooled"] = cond.pooled.to(runner.half)
            inp["time_ids"] = family("sdxl").time_ids(torch.tensor([[r, r]] * b), torch.zeros(b, 2, dtype=torch.long), r).to(
                device, runner.half)
        losses.append(runner.step("baseline", inp))
        if cuda:
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = full_finetune_dpo_flops(step_spec["unet_config"], spec["resolution"], TEXT_LEN)
    pairs_per_s = spec["batch"] / step_s
    peak = peak_flops(device, torch.float16)
    return dict(pairs_per_s=pairs_per_s, step_s=step_s, tflops=flops * pairs_per_s / 1e12,
                mfu=flops * pairs_per_s / peak if peak else None, peak_mem_mb=_peak_mb(device),
                pairs_per_s_all=[round(spec["batch"] / t, 4) for t in times], optimizer=runner.optimizer_name,
                optimizer_steps_skipped_fp16=int(runner.skipped), loss_finite=all(x == x for x in losses))


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    return run_baseline(spec) if spec["pipeline"] == "baseline" else run_ncp(spec)


# ---------------------------------------------------------------- the driver


def launch(spec: dict[str, Any]) -> dict[str, Any]:
    label = f"{spec['model']} {spec['pipeline']} {spec['objective']} batch {spec['batch']} @ {spec['resolution']} px"
    print(f"-- {label} ...", file=sys.stderr, flush=True)
    keys = ("model", "pipeline", "objective", "resolution", "batch", "device")
    row = {k: spec[k] for k in keys}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              stdout=subprocess.PIPE, text=True, timeout=spec.get("timeout"))
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {spec.get('timeout')} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return dict(row, error=f"worker exited with {proc.returncode}")
    row.update(json.loads(lines[-1][len("RESULT "):]), wall_s=round(time.perf_counter() - t0, 1))
    print(f"   -> {row['pairs_per_s']:.3f} pairs/s, peak {row['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and objective: each ncp pipeline's pairs/s over the baseline pipeline's."""
    out: dict[str, Any] = {}
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["pipeline"] == "baseline"
                     and "pairs_per_s" in b), None)
        if r["pipeline"] != "baseline" and base and "pairs_per_s" in r:
            out[f"{r['model']} {r['pipeline']} {r['objective']} / baseline pairs/s"] = round(
                r["pairs_per_s"] / base["pairs_per_s"], 3)
    return out


def goals(rows: list[dict[str, Any]], summary: dict[str, Any], full_size: bool) -> dict[str, Any]:
    if not full_size or not any(r["device"] == "cuda" for r in rows):
        return {"note": "the goals are stated for full-size models on an H100; not evaluated on this run"}
    g = {}
    for model, pipeline in (("sd15", "ncp-cache"), ("sd15", "ncp-jpeg"), ("sdxl", "ncp-cache"), ("sdxl", "ncp-jpeg")):
        x = goal(f"e2e.over_baseline_pairs_per_s.{model}.{pipeline}")
        r = summary.get(f"{model} {pipeline} dpo / baseline pairs/s")
        g[f"{model}: {pipeline} (DPO) >= {x}x the baseline pipeline's pairs/s"] = None if r is None else r >= x
    return g


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':5} {'pipeline':10} {'objective':9} {'px':>5} {'batch':>5} {'pairs/s':>8} {'peak MB':>9} "
            f"{'TFLOP/s':>8} {'MFU':>6}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "pairs_per_s" not in r:
            lines.append(f"{r['model']:5} {r['pipeline']:10} {r['objective']:9} {r['resolution']:>5} {r['batch']:>5}  "
                         f"{r.get('error')}")
            continue
        note = ""
        if r.get("cache_build", {}).get("seconds"):
            note = f"cache built at {r['cache_build']['pairs_per_s']} pairs/s ({r['cache_build']['seconds']} s)"
        fmt = lambda x, spec: f"{x:{spec}}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        lines.append(f"{r['model']:5} {r['pipeline']:10} {r['objective']:9} {r['resolution']:>5} {r['batch']:>5} "
                     f"{r['pairs_per_s']:>8.3f} {r['peak_mem_mb']:>9.0f} {fmt(r.get('tflops'), '8.3g'):>8} "
                     f"{fmt(r.get('mfu'), '6.1%'):>6}  {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "both"])
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma list of {', '.join(PIPELINES)}")
    p.add_argument("--objectives", default="dpo", help="ncp objectives (comma list), e.g. dpo,ncp-dpo")
    p.add_argument("--cpu-small", action="store_true", help="reduced components and resolution (default on CPU)")
    p.add_argument("--resolution", type=int, help="pixels (default 512 SD1.5 / 1024 SDXL; 128 with --cpu-small)")
    p.add_argument("--image-px", type=int, help="stored JPEG size (default: 768 SD1.5, 1024 SDXL; 192 small)")
    p.add_argument("--batch", type=int, help="pairs per step, every pipeline (default 16 SD1.5, 8 SDXL; 2 small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2 CUDA, 1 CPU)")
    p.add_argument("--pairs", type=int, help="pairs in the dataset (default 800 CUDA, 64 small)")
    p.add_argument("--shards", type=int, default=2, help="parquet files the pairs are spread over")
    p.add_argument("--threads", type=int, help="torch threads per worker (CPU)")
    p.add_argument("--work", help="folder for the models, data and caches (default: a temporary folder)")
    p.add_argument("--worker-timeout", type=float, default=None)
    p.add_argument("--out", default=str(HERE / "results" / "e2e.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    small = args.cpu_small or device == "cpu"
    cuda = device == "cuda"
    steps = args.steps or (6 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    cpus = os.cpu_count() or 1
    work = Path(args.work or tempfile.mkdtemp(prefix="ncp-e2e-"))
    started = datetime.datetime.now(datetime.timezone.utc)
    rows: list[dict[str, Any]] = []
    info = machine(device)
    outs = [Path(args.out)] + ([Path(os.environ["OUT"]) / "e2e.json"] if os.environ.get("OUT") else [])

    def write(final: bool) -> dict[str, Any]:
        summary = summarize(rows)
        report = {"benchmark": "e2e", "date": started.isoformat(timespec="seconds"),
                  "command": "python " + " ".join(sys.argv), "complete": final, "machine": info, "device": device,
                  "small": small, "row_group_rows": ROW_GROUP_ROWS, "rows": rows, "summary": summary,
                  "goals": goals(rows, summary, not small),
                  "total_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)}
        return write_report(report, outs)

    for model in (["sd15", "sdxl"] if args.model == "both" else [args.model]):
        res = args.resolution or (128 if small else STEP_MODELS[model]["resolution"])
        px = args.image_px or (192 if small else (768 if model == "sd15" else 1024))
        batch = args.batch or (2 if small else (16 if model == "sd15" else 8))
        pairs = args.pairs or (64 if small else 800)
        t0 = time.perf_counter()
        model_dir = build_pipeline(work / f"{model}{'-small' if small else ''}", model, small, device)
        shards = write_dataset(work / f"data-{px}px-{pairs}", pairs, px, args.shards, cpus)
        size_mb = sum(p.stat().st_size for p in shards) / 2**20
        print(f"-- {model}: pipeline and {pairs} pairs of {px} px JPEGs ({size_mb:.0f} MB, {len(shards)} shards) "
              f"ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        base = dict(model=model, device=device, small=small, resolution=res, batch=batch, steps=steps, warmup=warmup,
                    model_dir=str(model_dir), data_glob=str(shards[0].parent / "*.parquet"), pairs=pairs,
                    work=str(work), threads=args.threads, timeout=args.worker_timeout, loader_threads=0,
                    loader_workers=min(cpus, 16), dataset_mb=round(size_mb, 1), image_px=px)
        for pipeline in [p for p in args.pipelines.split(",") if p]:
            objectives = ["dpo"] if pipeline == "baseline" else [o for o in args.objectives.split(",") if o]
            for objective in objectives:
                rows.append(dict(launch(dict(base, pipeline=pipeline, objective=objective)),
                                 image_px=px, dataset_mb=round(size_mb, 1)))
                write(False)
    return print_report(table(rows), write(True), outs)


if __name__ == "__main__":
    sys.exit(main())

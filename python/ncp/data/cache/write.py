"""Writing a latent cache: every selected pair (or unpaired image) encoded once by the VAE, every caption once
by the text encoder(s), in safetensors shards plus ``index.json`` (layout: :mod:`ncp.data.cache`).

A cache is written into ``.NAME.tmp-PID`` beside ``--out`` and put in place when complete, so a killed build
leaves the old cache (or none), never an index over other shards; replacing a cache needs ``overwrite``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ncp.data.batch import DataError, vae_posterior
from ncp.data.cache.key import (CACHE_DTYPES, FORMAT, cache_files, cache_key, check_cache, file_entry, is_cache,
                                model_folder, read_index, verify_files)
from ncp.data.items import KINDS
from ncp.data.expand import expand_sources
from ncp.data.rust import loader_batches, pair_loader, role_images
from ncp.files import written_whole
from ncp.models import encode_prompts, load_models

logger = logging.getLogger("ncp.cache")


class _ShardWriter:
    """Rows of fixed-shape tensors, written `shard_size` rows per safetensors file."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.count, self.files = 0, []

    def add(self, **tensors: torch.Tensor) -> None:
        for k, v in tensors.items():
            self.rows.setdefault(k, []).append(v)
        self.count += 1
        if self.count == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.count == 0:
            return
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file({k: torch.stack(v).contiguous() for k, v in self.rows.items()}, str(self.out / name),
                  metadata={"format": FORMAT})
        self.files.append(name)
        self.rows, self.count = {}, 0


def _invalid_row(shape: torch.Size, dtype: torch.dtype, unpaired: bool) -> dict[str, torch.Tensor]:
    """The row of a pair (image) skipped as corrupt: zeros, valid = 0."""
    zeros2 = torch.zeros(2, dtype=torch.long)
    row = dict(latents=torch.zeros(shape, dtype=dtype), caption_ids=torch.tensor(-1),
               valid=torch.tensor(0, dtype=torch.uint8), original_sizes=zeros2, crop_top_left=zeros2,
               image_hashes=torch.zeros(shape[1], dtype=torch.long))
    if unpaired:
        row["desirable"] = torch.tensor(0, dtype=torch.uint8)
    return row


@torch.no_grad()
def _posterior(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 2, C, h, w) posterior mean and logvar of uint8 (N, 3, H, W) pixels."""
    mean, logvar = vae_posterior(vae, pixels)
    return torch.stack([mean, logvar], dim=1).cpu()


class CacheTargetError(DataError):
    """``--out`` is a folder a cache build must not write into; the message says why and what to do."""


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, a non-empty folder without ``overwrite``, or a folder that is not a
    latent cache (``overwrite`` replaces caches only)."""
    if out.exists() and not out.is_dir():
        raise CacheTargetError(f"--out {out} is a file, not a cache folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_cache(out):
        raise CacheTargetError(f"--out {out} is a non-empty folder that holds no latent cache (no index.json of "
                               f"one); refusing to replace it: choose another --out")
    if not overwrite:
        raise CacheTargetError(f"--out {out} holds a latent cache; pass --overwrite to rebuild it (the old "
                               f"cache stays in place until the new one is complete)")


def build_cache(model: str, sources: Sequence[str], out: str | Path, resolution: int, flip: bool = False,
                dtype: str = "float32", batch_size: int = 8, columns: Mapping[str, str] | None = None,
                drop_ties: bool = True, absolute_winners: bool = False, shard_size: int = 1024,
                device: str = "cpu", num_threads: int = 0, data_format: str = "pairs",
                overwrite: bool = False) -> Path:
    """Encode every selected pair (``data_format="unpaired"``: every labelled image) once; returns the cache
    folder. The cache is written beside ``out`` and replaces it at the end, only if it is complete; an existing
    cache in ``out`` is replaced only with ``overwrite`` (any other non-empty folder never is)."""
    out = Path(out)
    check_target(out, overwrite)
    with written_whole(out) as tmp:
        _write_cache(tmp, model, sources, resolution, flip, dtype, batch_size, columns, drop_ties,
                     absolute_winners, shard_size, device, num_threads, data_format)
        check_target(out, overwrite)  # nothing else took the folder meanwhile
    index = read_index(out)
    logger.info("cached %d pairs (%d skipped), %d captions in %s (%.1fs)", index["num_valid"],
                len(index["skipped"]), index["num_captions"], out, index["seconds"])
    return out


@torch.no_grad()
def _write_cache(out: Path, model: str, sources: Sequence[str], resolution: int, flip: bool, dtype: str,
                 batch_size: int, columns: Mapping[str, str] | None, drop_ties: bool, absolute_winners: bool,
                 shard_size: int, device: str, num_threads: int, data_format: str) -> None:
    """The cache's files in the folder ``out``, index.json (with every other file's size and hash) last."""
    torch_dtype = CACHE_DTYPES[dtype]
    models = load_models(model_folder(model), "auto", torch.device(device), torch_dtype, with_unet=False)
    loader = pair_loader(
        sources=expand_sources(sources), resolution=resolution, batch_size=batch_size, random_crop=False,
        random_flip=False, drop_ties=drop_ties, absolute_winners=absolute_winners,
        columns=dict(columns) if columns else None, num_threads=num_threads, drop_last=False, shuffle=False,
        format=data_format)
    kind = KINDS[data_format]
    unpaired, roles = kind.binary, kind.roles
    pairs = _ShardWriter(out, "pairs", shard_size)
    embeds = _ShardWriter(out, "embeds", shard_size)
    caption_ids: dict[str, int] = {}
    latent_shape, start, next_index = None, time.perf_counter(), 0

    def embed(captions: list[str]) -> None:
        cond = encode_prompts(models, captions)
        for j in range(len(captions)):
            row = {"prompt_embeds": cond.hidden_states[j].cpu()}
            if cond.pooled is not None:
                row["pooled_prompt_embeds"] = cond.pooled[j].cpu()
            embeds.add(**row)

    for b in loader_batches(loader):
        n = len(b["indices"])
        pix = torch.from_numpy(np.concatenate(role_images(b)))  # (roles n, 3, R, R): winners then losers, or images
        views = [_posterior(models.vae, pix)]
        if flip:
            views.append(_posterior(models.vae, pix.flip(-1)))
        lat = torch.stack(views, dim=1)  # (roles n, F, 2, C, h, w)
        lat = lat.view(roles, n, *lat.shape[1:]).permute(1, 2, 0, 3, 4, 5, 6)  # (n, F, roles, 2, C, h, w)
        latent_shape = list(lat.shape[4:])
        new = [c for c in dict.fromkeys(b["captions"]) if c not in caption_ids]
        for c in new:
            caption_ids[c] = len(caption_ids)
        if new:
            embed(new)
        for j, index in enumerate(b["indices"].tolist()):
            while next_index < index:  # a skipped (corrupt) pair keeps its slot, marked invalid
                pairs.add(**_invalid_row(lat.shape[1:], lat.dtype, unpaired))
                next_index += 1
            label = {"desirable": torch.tensor(int(b["desirable"][j]), dtype=torch.uint8)} if unpaired else {}
            pairs.add(latents=lat[j].contiguous(), caption_ids=torch.tensor(caption_ids[b["captions"][j]]),
                      valid=torch.tensor(1, dtype=torch.uint8),
                      original_sizes=torch.from_numpy(b["original_sizes"][j].copy()),
                      crop_top_left=torch.from_numpy(b["crop_top_left"][j].copy()),
                      image_hashes=torch.from_numpy(b["image_hashes"][j].view(np.int64).copy()), **label)
            next_index += 1
    if latent_shape is None:
        raise DataError(f"no pair of {', '.join(sources)} could be decoded: nothing to cache")
    while next_index < loader.num_pairs:  # trailing skipped pairs
        pairs.add(**_invalid_row(torch.Size([1 + flip, roles, 2, *latent_shape]), torch_dtype, unpaired))
        next_index += 1
    pairs.flush()
    embeds.flush()
    empty = encode_prompts(models, [""])
    save_file({k: v.cpu().contiguous() for k, v in
               {"prompt_embeds": empty.hidden_states, "pooled_prompt_embeds": empty.pooled}.items() if v is not None},
              str(out / "empty.safetensors"), metadata={"format": FORMAT})
    (out / "captions.json").write_text(json.dumps(list(caption_ids), ensure_ascii=False))
    stats = loader.stats()
    index = {
        "format": FORMAT,
        "key": cache_key(model, sources, resolution, dtype, flip, columns, drop_ties, absolute_winners, data_format),
        "num_pairs": loader.num_pairs,
        "num_valid": int(stats["pairs_yielded"]),
        "shard_size": shard_size,
        "pair_shards": pairs.files,
        "embed_shards": embeds.files,
        "num_captions": len(caption_ids),
        "latent_shape": latent_shape,
        "flips": 2 if flip else 1,
        "skipped": stats["skipped_records"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    index["files"] = {name: file_entry(out / name) for name in cache_files(index)}
    (out / "index.json").write_text(json.dumps(index, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncp.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers-format folder (vae/, text_encoder/, tokenizer/), or 'bundle'")
    p.add_argument("--sources", nargs="+", required=True, help="parquet paths/globs/folders, or one .jsonl")
    p.add_argument("--format", choices=("pairs", "unpaired"), default="pairs",
                   help="rows of pairs, or of unpaired (caption, image, label) binary feedback (data.format)")
    p.add_argument("--out", required=True, help="cache folder (written beside it, moved in place when complete)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the cache already in --out (kept until the new one is complete)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--flip", action="store_true", help="also cache the mirror images (keeps flip augmentation)")
    p.add_argument("--dtype", choices=sorted(CACHE_DTYPES), default="float32", help="VAE / text encoder dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024, help="pairs (and captions) per shard file")
    p.add_argument("--columns", nargs="*", default=[], metavar="LOGICAL=NAME", help="column renames")
    p.add_argument("--keep-ties", action="store_true")
    p.add_argument("--absolute-winners", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-threads", type=int, default=0, help="loader threads (0 = all cores)")
    p.add_argument("--check", action="store_true",
                   help="do not build: verify every file's hash, check an existing cache against these settings "
                        "and re-hash every image")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    columns = dict(c.split("=", 1) for c in a.columns)
    try:
        if a.check:
            verify_files(a.out, read_index(a.out))
            check_cache(a.out, a.model, a.sources, a.resolution, a.dtype, a.flip, columns, not a.keep_ties,
                        a.absolute_winners, deep=True, data_format=a.format)
            print(f"{a.out}: intact and up to date")
            return 0
        build_cache(a.model, a.sources, a.out, a.resolution, a.flip, a.dtype, a.batch_size, columns,
                    not a.keep_ties, a.absolute_winners, a.shard_size, a.device, a.num_threads, a.format, a.overwrite)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if a.check else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

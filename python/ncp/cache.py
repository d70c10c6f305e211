"""The latent cache: every pair encoded once by the VAE, every prompt once by the text encoder(s).

``python -m ncp.cache --model M --sources S... --out DIR --resolution R [--flip]``
reads the pairs with the Rust loader (index order, center crop), stores the VAE
posterior (mean, logvar) of winner and loser (and of their mirror images with
``--flip``) and the text embeddings of each distinct caption, in mmap-able
safetensors shards plus ``index.json``. Training then reads batches with
:class:`CachedPairSource` without decoding an image or running an encoder.

A cache is only valid for what went into it. Its key holds the VAE and text
encoder identity (config and weight hashes) and dtype, the resolution, the
crop, the flip, the selection rules and every source file (size); each pair
keeps the content hash of its two images. :func:`check_cache` compares a key with
the run's settings (``deep=True`` re-hashes every image) and raises
:class:`StaleCacheError` naming what differs; a cache is never used silently
against other settings.

Layout of DIR::

    index.json                   format, key, shapes, shard lists, counts, skipped pairs
    captions.json                the distinct captions, by caption id
    pairs-00000.safetensors      per pair (shard_size rows): latents (n, F, 2, 2, C, h, w) =
                                 (pair, flip, winner/loser, mean/logvar, ...), caption_ids, valid,
                                 original_sizes, crop_top_left, image_hashes
    embeds-00000.safetensors     per caption: prompt_embeds (m, L, D) [, pooled_prompt_embeds (m, D2)]
    empty.safetensors            the empty prompt's embeddings (empty-prompt dropout)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncp.data.batch import DataError, PairBatch


logger = logging.getLogger("ncp.cache")

FORMAT = "ncp-latent-cache/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StaleCacheError(DataError):
    """The cache was made from other images, models or settings than the run's; the message names them."""


# ---------------------------------------------------------------- keys


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _model_path(model: str) -> str:
    """A diffusers folder with vae/ and text_encoder/ (no U-Net needed), 'bundle', or a hub id."""
    from ncp.models import resolve_model_path

    local = Path(model).expanduser()
    if model != "bundle" and local.is_dir() and (local / "vae").is_dir():
        return str(local)
    return resolve_model_path(model)


def component_identity(model_dir: str, subfolder: str) -> dict[str, Any]:
    """What identifies a model component: its config and the hashes of its weight files."""
    folder = Path(model_dir) / subfolder
    config = folder / "config.json"
    weights = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    return {
        "config_sha256": _sha256_file(config) if config.is_file() else None,
        "weights_sha256": {p.name: _sha256_file(p) for p in weights},
    }


def source_identity(sources: Sequence[str]) -> list[dict[str, Any]]:
    """Each source file (globs and folders expanded, as the loader does) with its size."""
    from ncp.data.rust import _resolve_sources

    files: list[Path] = []
    for src in _resolve_sources(list(sources)):
        p = Path(src)
        if any(c in src for c in "*?["):
            files.extend(sorted(Path(m) for m in __import__("glob").glob(src)))
        elif p.is_dir():
            files.extend(sorted(p.glob("*.parquet")))
        else:
            files.append(p)
    return [{"name": f.name, "size": f.stat().st_size} for f in files]


def cache_key(model: str, sources: Sequence[str], resolution: int, dtype: str, flip: bool,
              columns: Mapping[str, str] | None, drop_ties: bool, absolute_winners: bool) -> dict[str, Any]:
    """The key a cache is valid for (compared field by field by :func:`check_cache`)."""
    from ncp.models import detect_kind

    path = _model_path(model)
    kind = detect_kind(path)
    encoders = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    return {
        "model_kind": kind,
        "vae": component_identity(path, "vae"),
        "text_encoders": {name: component_identity(path, name) for name in encoders},
        "dtype": dtype,
        "resolution": resolution,
        "crop": "center",
        "flip": flip,
        "columns": dict(sorted((columns or {}).items())),
        "drop_ties": drop_ties,
        "absolute_winners": absolute_winners,
        "sources": source_identity(sources),
    }


# ---------------------------------------------------------------- safetensors, mmap-read

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "U8": np.uint8,
              "I32": np.int32, "U64": np.uint64, "BOOL": np.bool_}


def mmap_safetensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a safetensors file as a read-only numpy memmap (and its dtype name), no copy."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        dtype = _ST_DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        if end == start:
            out[name] = (np.zeros(shape, dtype), spec["dtype"])
        else:
            out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape), spec["dtype"])
    return out


def _to_torch(a: np.ndarray, st_dtype: str) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.view(torch.bfloat16) if st_dtype == "BF16" else t


# ---------------------------------------------------------------- writing


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
        from safetensors.torch import save_file

        if self.count == 0:
            return
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file({k: torch.stack(v).contiguous() for k, v in self.rows.items()}, str(self.out / name),
                  metadata={"format": FORMAT})
        self.files.append(name)
        self.rows, self.count = {}, 0


def _load_encoders(model: str, dtype: torch.dtype, device: torch.device):
    """VAE and text encoder(s) of a diffusers folder, as a `ncp.models.Models` without a U-Net."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from ncp.models import Models, detect_kind

    path = _model_path(model)
    kind = detect_kind(path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device, dtype).eval()
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    if kind == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
    encoders = [e.to(device, dtype).eval() for e in encoders]
    return Models(kind, None, vae, encoders, tokenizers, None, dtype, device)


def _invalid_row(shape: torch.Size, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The row of a pair skipped as corrupt: zeros, valid = 0."""
    zeros2 = torch.zeros(2, dtype=torch.long)
    return dict(latents=torch.zeros(shape, dtype=dtype), caption_ids=torch.tensor(-1),
                valid=torch.tensor(0, dtype=torch.uint8), original_sizes=zeros2, crop_top_left=zeros2,
                image_hashes=zeros2)


@torch.no_grad()
def _posterior(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 2, C, h, w) posterior mean and logvar of uint8 (N, 3, H, W) pixels."""
    x = pixels.to(vae.device, vae.dtype) / 127.5 - 1.0  # as ncp.train.batch_latents
    dist = vae.encode(x).latent_dist
    return torch.stack([dist.mean, dist.logvar], dim=1).cpu()


@torch.no_grad()
def build_cache(model: str, sources: Sequence[str], out: str | Path, resolution: int, flip: bool = False,
                dtype: str = "float32", batch_size: int = 8, columns: Mapping[str, str] | None = None,
                drop_ties: bool = True, absolute_winners: bool = False, shard_size: int = 1024,
                device: str = "cpu", num_threads: int = 0) -> Path:
    """Encode every selected pair once; returns the cache folder."""
    import ncp_dataloader

    from ncp.data.rust import _resolve_sources
    from ncp.models import encode_prompts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    models = _load_encoders(model, torch_dtype, torch.device(device))
    loader = ncp_dataloader.PairLoader(
        _resolve_sources(sources), resolution, batch_size, random_crop=False, random_flip=False,
        drop_ties=drop_ties, absolute_winners=absolute_winners, columns=dict(columns) if columns else None,
        num_threads=num_threads, drop_last=False, shuffle=False)
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

    for b in loader:
        n = len(b["indices"])
        pix = torch.from_numpy(np.concatenate([b["winners"], b["losers"]]))  # (2n, 3, R, R) winners then losers
        views = [_posterior(models.vae, pix)]
        if flip:
            views.append(_posterior(models.vae, pix.flip(-1)))
        lat = torch.stack(views, dim=1)  # (2n, F, 2, C, h, w)
        lat = lat.view(2, n, *lat.shape[1:]).permute(1, 2, 0, 3, 4, 5, 6)  # (n, F, 2, 2, C, h, w)
        latent_shape = list(lat.shape[4:])
        new = [c for c in dict.fromkeys(b["captions"]) if c not in caption_ids]
        for c in new:
            caption_ids[c] = len(caption_ids)
        if new:
            embed(new)
        for j, index in enumerate(b["indices"].tolist()):
            while next_index < index:  # a skipped (corrupt) pair keeps its slot, marked invalid
                pairs.add(**_invalid_row(lat.shape[1:], lat.dtype))
                next_index += 1
            pairs.add(latents=lat[j].contiguous(), caption_ids=torch.tensor(caption_ids[b["captions"][j]]),
                      valid=torch.tensor(1, dtype=torch.uint8),
                      original_sizes=torch.from_numpy(b["original_sizes"][j].copy()),
                      crop_top_left=torch.from_numpy(b["crop_top_left"][j].copy()),
                      image_hashes=torch.from_numpy(b["image_hashes"][j].view(np.int64).copy()))
            next_index += 1
    if latent_shape is None:
        raise ValueError(f"no pair of {', '.join(sources)} could be decoded: nothing to cache")
    while next_index < loader.num_pairs:  # trailing skipped pairs
        pairs.add(**_invalid_row(torch.Size([1 + flip, 2, 2, *latent_shape]), torch_dtype))
        next_index += 1
    pairs.flush()
    embeds.flush()
    empty = encode_prompts(models, [""])
    from safetensors.torch import save_file
    save_file({k: v.cpu().contiguous() for k, v in
               {"prompt_embeds": empty.hidden_states, "pooled_prompt_embeds": empty.pooled}.items() if v is not None},
              str(out / "empty.safetensors"), metadata={"format": FORMAT})
    stats = loader.stats()
    index = {
        "format": FORMAT,
        "key": cache_key(model, sources, resolution, dtype, flip, columns, drop_ties, absolute_winners),
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
    (out / "captions.json").write_text(json.dumps(list(caption_ids), ensure_ascii=False))
    (out / "index.json").write_text(json.dumps(index, indent=1))
    logger.info("cached %d pairs (%d skipped), %d captions in %s (%.1fs)", index["num_valid"],
                len(index["skipped"]), len(caption_ids), out, index["seconds"])
    return out


# ---------------------------------------------------------------- checking


def read_index(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise StaleCacheError(f"{cache_dir} is not a latent cache (no index.json); build it with `python -m ncp.cache`")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise StaleCacheError(f"{path}: format {index.get('format')!r}, this ncp reads {FORMAT!r}; rebuild the cache")
    return index


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: cache has {a!r}, the run has {b!r}"]


def check_cache(cache_dir: str | Path, model: str | None = None, sources: Sequence[str] | None = None,
                resolution: int | None = None, dtype: str | None = None, flip: bool | None = None,
                columns: Mapping[str, str] | None = None, drop_ties: bool | None = None,
                absolute_winners: bool | None = None, deep: bool = False) -> dict[str, Any]:
    """Raise :class:`StaleCacheError` naming every key field that differs from the given settings.

    Only the settings given are compared (``model`` compares the VAE and text
    encoder hashes). ``deep`` also re-reads every image of ``sources`` and compares
    its content hash with the one cached for the pair. Returns the index.
    """
    index = read_index(cache_dir)
    key = index["key"]
    want: dict[str, Any] = {}
    if model is not None:
        full = cache_key(model, [], 1, "", False, None, True, False)
        want.update({k: full[k] for k in ("model_kind", "vae", "text_encoders")})
    for name, value in (("resolution", resolution), ("dtype", dtype), ("flip", flip), ("drop_ties", drop_ties),
                        ("absolute_winners", absolute_winners)):
        if value is not None:
            want[name] = value
    if columns is not None:
        want["columns"] = dict(sorted(columns.items()))
    if sources is not None:
        want["sources"] = source_identity(sources)
    problems = _diff({k: key.get(k) for k in want}, want)
    if deep and sources is not None:
        problems += _deep_check(cache_dir, index, sources)
    if problems:
        raise StaleCacheError(f"latent cache {cache_dir} is stale or was made for other settings:\n  "
                              + "\n  ".join(problems[:20]) + "\nrebuild it with `python -m ncp.cache`")
    return index


def _deep_check(cache_dir: str | Path, index: dict, sources: Sequence[str]) -> list[str]:
    """Re-hash every pair's images (in index order, as cached) and compare."""
    import ncp_dataloader

    from ncp.data.rust import _resolve_sources

    key = index["key"]
    loader = ncp_dataloader.PairLoader(
        _resolve_sources(sources), 8, 64, random_flip=False, drop_ties=key["drop_ties"],
        absolute_winners=key["absolute_winners"], columns=key["columns"] or None, drop_last=False, shuffle=False)
    if loader.num_pairs != index["num_pairs"]:
        return [f"pairs: cache has {index['num_pairs']}, the sources give {loader.num_pairs}"]
    cached = np.concatenate([mmap_safetensors(Path(cache_dir) / f)["image_hashes"][0] for f in index["pair_shards"]])
    problems = []
    for b in loader:
        got = b["image_hashes"].view(np.int64)
        for j, i in enumerate(b["indices"].tolist()):
            if not np.array_equal(cached[i], got[j]):
                problems.append(f"pair {i} (caption {b['captions'][j]!r}): its images changed since caching")
    return problems


# ---------------------------------------------------------------- reading


class CachedPairSource:
    """Batches of cached posteriors and text embeddings, in the Rust loader's order.

    The pair order (permutation per (seed, epoch), split by rank), the flip and the
    empty-prompt draws come from ``ncp_dataloader`` itself, so a cache batch holds
    the same pairs with the same flips and dropped prompts as the pixel batch the
    Rust loader would give for the same settings (center crop). Pairs skipped as
    corrupt when the cache was built are skipped here too (a batch can be smaller).
    """

    def __init__(self, cache_dir: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 empty_prompt_prob: float = 0.0, random_flip: bool = True, drop_last: bool = True,
                 **expect: Any):
        import ncp_dataloader

        self._lib = ncp_dataloader
        self.dir = Path(cache_dir)
        self.index = check_cache(cache_dir, **expect)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.empty_prompt_prob, self.drop_last = empty_prompt_prob, drop_last
        self.random_flip = random_flip and self.index["flips"] == 2
        if random_flip and not self.random_flip:
            logger.info("latent cache %s holds no flipped latents: training without flips", cache_dir)
        self.num_pairs = self.index["num_pairs"]
        self._pairs = [mmap_safetensors(self.dir / f) for f in self.index["pair_shards"]]
        self._embeds = [mmap_safetensors(self.dir / f) for f in self.index["embed_shards"]]
        self._empty_np = {k: np.array(a[0]) for k, (a, _) in mmap_safetensors(self.dir / "empty.safetensors").items()}
        self._captions = json.loads((self.dir / "captions.json").read_text())
        # the small per-pair columns live in memory (tens of bytes a pair); latents and embeddings stay mapped
        small = ("valid", "caption_ids", "original_sizes", "crop_top_left")
        self._small = {k: np.concatenate([np.asarray(shard[k][0]) for shard in self._pairs]) for k in small}
        self.epoch, self.sample_in_epoch, self.skipped, self.yielded = 0, 0, 0, 0
        if len(self) == 0:
            raise ValueError(f"{self.num_pairs} cached pairs are fewer than one batch of {batch_size} per rank")

    def __len__(self) -> int:
        if self.drop_last:
            return (self.num_pairs // self.world_size) // self.batch_size
        mine = (self.num_pairs + self.world_size - 1 - self.rank) // self.world_size
        return -(-mine // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.sample_in_epoch = epoch, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size}

    def resume(self, state: Mapping[str, int]) -> None:
        for k in ("seed", "world_size", "batch_size"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"cannot resume: state has {k}={state[k]} but the source has {getattr(self, k)}")
        if state["sample_in_epoch"] % self.batch_size:
            raise ValueError(f"cannot resume: sample_in_epoch={state['sample_in_epoch']} is not a multiple of "
                             f"batch_size={self.batch_size}")
        self.epoch, self.sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])

    def stats(self) -> dict[str, Any]:
        return {"pairs": self.index["num_valid"], "cached_pairs": self.num_pairs, "skipped": self.skipped,
                "pairs_yielded": self.yielded, "skipped_at_build": len(self.index["skipped"])}

    def _order(self) -> np.ndarray:
        order = self._lib.epoch_order(self.num_pairs, self.batch_size, self.seed, self.epoch, self.rank,
                                      self.world_size, self.drop_last)
        return order.reshape(-1)

    def _gather(self, shards: list, rows: np.ndarray, name: str) -> tuple[np.ndarray, str]:
        """Rows `rows` of a sharded, memory-mapped tensor (fancy-indexed per shard), and its dtype name."""
        size = self.index["shard_size"]
        shard_of, offset = rows // size, rows % size
        first, dtype_name = shards[int(shard_of[0])][name]
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard_of).tolist():
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = shards[s][name][0][offset[sel]]
        return out, dtype_name

    def _gather_latents(self, rows: np.ndarray, flip: np.ndarray) -> torch.Tensor:
        """(2B, 2, C, h, w): the posteriors of the pairs' chosen flips, winners then losers, in one copy."""
        size = self.index["shard_size"]
        shard_of, offset = rows // size, rows % size
        first, dtype_name = self._pairs[int(shard_of[0])]["latents"]
        out = np.empty((2, len(rows), *first.shape[3:]), dtype=first.dtype)  # (image, pair, 2, C, h, w)
        for s in np.unique(shard_of).tolist():
            sel = np.nonzero(shard_of == s)[0]
            arr = self._pairs[s]["latents"][0]
            for image in (0, 1):
                out[image, sel] = arr[offset[sel], flip[sel], image]
        return _to_torch(out.reshape(2 * len(rows), *out.shape[2:]), dtype_name)

    def batch(self, ids: np.ndarray) -> PairBatch | None:
        """The batch of the pair ids `ids` (epoch draws of the current epoch); None if all were skipped."""
        valid = self._small["valid"][ids].astype(bool)
        self.skipped += int((~valid).sum())
        ids = ids[valid]
        if len(ids) == 0:
            return None
        flips, drops = self._lib.augment_draws(self.seed, self.epoch, ids.astype(np.uint32).tolist(),
                                               self.random_flip, self.empty_prompt_prob)
        flip_index = flips.astype(np.int64) if self.random_flip else np.zeros(len(ids), np.int64)
        latents = self._gather_latents(ids, flip_index)
        cap_ids = self._small["caption_ids"][ids]
        embeds, embeds_dtype = self._gather(self._embeds, cap_ids, "prompt_embeds")
        embeds[drops] = self._empty_np["prompt_embeds"]
        pooled = None
        if "pooled_prompt_embeds" in self._embeds[0]:
            pooled_np, pooled_dtype = self._gather(self._embeds, cap_ids, "pooled_prompt_embeds")
            pooled_np[drops] = self._empty_np["pooled_prompt_embeds"]
            pooled = _to_torch(pooled_np, pooled_dtype)
        captions = ["" if drop else self._captions[c] for c, drop in zip(cap_ids.tolist(), drops.tolist())]
        self.yielded += len(ids)
        return PairBatch(
            captions=captions, latents=latents, prompt_embeds=_to_torch(embeds, embeds_dtype),
            pooled_prompt_embeds=pooled,
            original_sizes=torch.from_numpy(self._small["original_sizes"][ids]),
            crop_top_left=torch.from_numpy(self._small["crop_top_left"][ids]),
            indices=torch.from_numpy(ids.astype(np.int64)))

    def __iter__(self) -> Iterator[PairBatch]:
        order = self._order()
        n = len(self) * self.batch_size if self.drop_last else len(order)
        while self.sample_in_epoch < n:
            ids = order[self.sample_in_epoch:min(self.sample_in_epoch + self.batch_size, n)]
            self.sample_in_epoch += self.batch_size
            batch = self.batch(ids)
            if batch is not None:
                yield batch
        self.epoch, self.sample_in_epoch = self.epoch + 1, 0


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncp.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers-format folder (vae/, text_encoder/, tokenizer/), or 'bundle'")
    p.add_argument("--sources", nargs="+", required=True, help="parquet paths/globs/folders, or one .jsonl")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--flip", action="store_true", help="also cache the mirror images (keeps flip augmentation)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="VAE / text encoder dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024, help="pairs (and captions) per shard file")
    p.add_argument("--columns", nargs="*", default=[], metavar="LOGICAL=NAME", help="column renames")
    p.add_argument("--keep-ties", action="store_true")
    p.add_argument("--absolute-winners", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-threads", type=int, default=0, help="loader threads (0 = all cores)")
    p.add_argument("--check", action="store_true",
                   help="do not build: check an existing cache against these settings (and re-hash every image)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    columns = dict(c.split("=", 1) for c in a.columns)
    if a.check:
        try:
            check_cache(a.out, a.model, a.sources, a.resolution, a.dtype, a.flip, columns, not a.keep_ties,
                        a.absolute_winners, deep=True)
        except StaleCacheError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{a.out}: up to date")
        return 0
    build_cache(a.model, a.sources, a.out, a.resolution, a.flip, a.dtype, a.batch_size, columns, not a.keep_ties,
                a.absolute_winners, a.shard_size, a.device, a.num_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

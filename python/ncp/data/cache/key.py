"""What a latent cache is valid for: its key (model components, data, settings), and the check that names
every field in which a cache differs from a run's settings; and what its files are: the size and xxh3 hash of
each, in the index, verified by :func:`verify_files`."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ncp.data.batch import DataError
from ncp.data.expand import expand_sources
from ncp.data.rust import loader_batches, pair_loader
from ncp.files import file_digest
from ncp.models import DTYPES, detect_kind, family, resolve_model_path

logger = logging.getLogger("ncp.cache")

FORMAT = "ncp-latent-cache/2"  # 2: the index holds the size and xxh3 of every file ("files")
REBUILD = "rebuild it with `python -m ncp.cache ... --overwrite`"
# The dtypes a cache is written in, by their torch names (the key stores the name): ncp.models' table.
CACHE_DTYPES = {str(t).removeprefix("torch."): t for t in DTYPES.values()}


class StaleCacheError(DataError):
    """The cache was made from other images, models or settings than the run's (or by an older ncp); the
    message names them."""


class CorruptCacheError(DataError):
    """A cache file is not what the index says: missing, truncated, other bytes, a bad header; the one-line
    message names the file."""


def read_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file, read whole (the others are not read)."""
    with safe_open(path, framework="np") as f:
        return f.get_tensor(name)


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_folder(model: str) -> str:
    """A diffusers folder with vae/ and text_encoder/ (no U-Net needed), 'bundle', or a hub id."""
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
    """Each source file (as the loader expands them) with its size."""
    return [{"name": Path(f).name, "size": Path(f).stat().st_size} for f in expand_sources(list(sources))]


def model_identity(model: str) -> dict[str, Any]:
    """The model part of a cache key: its kind and the identity of its VAE and text encoder(s)."""
    path = model_folder(model)
    kind = detect_kind(path)
    encoders = [encoder for _, encoder, _ in family(kind).text_encoders]
    return {"model_kind": kind, "vae": component_identity(path, "vae"),
            "text_encoders": {name: component_identity(path, name) for name in encoders}}


def cache_key(model: str, sources: Sequence[str], resolution: int, dtype: str, flip: bool,
              columns: Mapping[str, str] | None, drop_ties: bool, absolute_winners: bool,
              data_format: str = "pairs") -> dict[str, Any]:
    """The key a cache is valid for (compared field by field by :func:`check_cache`)."""
    return {
        "data_format": data_format,
        **model_identity(model),
        "dtype": dtype,
        "resolution": resolution,
        "crop": "center",
        "flip": flip,
        "columns": dict(sorted((columns or {}).items())),
        "drop_ties": drop_ties,
        "absolute_winners": absolute_winners,
        "sources": source_identity(sources),
    }


def _load_index(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
        raise CorruptCacheError(f"latent cache index {path} cannot be read ({err}); {REBUILD}") from err


def is_cache(folder: str | Path) -> bool:
    """Whether ``folder`` holds a latent cache of any format (one ``--overwrite`` may replace)."""
    path = Path(folder) / "index.json"
    try:
        index = _load_index(path) if path.is_file() else None
    except CorruptCacheError:
        return False
    return isinstance(index, dict) and str(index.get("format", "")).startswith("ncp-latent-cache/")


def read_index(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise StaleCacheError(f"{cache_dir} is not a latent cache (no index.json); build it with `python -m ncp.cache`")
    index = _load_index(path)
    if not isinstance(index, dict):
        raise CorruptCacheError(f"latent cache index {path} holds no mapping; {REBUILD}")
    if index.get("format") != FORMAT:
        raise StaleCacheError(f"{path}: a latent cache of format {index.get('format')!r}, this ncp reads {FORMAT!r} "
                              f"(which holds every file's hash); {REBUILD}")
    return index


def cache_files(index: dict[str, Any]) -> list[str]:
    """Every file of a cache besides index.json, as its readers open them."""
    return [*index["pair_shards"], *index["embed_shards"], "empty.safetensors", "captions.json"]


def file_entry(path: Path) -> dict[str, Any]:
    """A file's entry in the index (size, xxh3-64); the file is flushed to disk on the way."""
    return {"size": path.stat().st_size, "xxh3": file_digest(path, fsync=True)}


def verify_files(cache_dir: str | Path, index: dict[str, Any]) -> None:
    """Raise :class:`CorruptCacheError` naming the first file whose size or xxh3 differs from the index (each
    file is read whole once: the cost is that of reading the cache)."""
    start, total, files = time.perf_counter(), 0, index.get("files", {})
    for name in cache_files(index):
        path = Path(cache_dir) / name
        want = files.get(name)
        if want is None:
            raise CorruptCacheError(f"latent cache file {path}: index.json holds no hash for it; {REBUILD}")
        if not path.is_file():
            raise CorruptCacheError(f"latent cache file {path} is missing; {REBUILD}")
        size = path.stat().st_size
        if size != want["size"]:
            raise CorruptCacheError(f"latent cache file {path} has {size} bytes, index.json says {want['size']} "
                                    f"(truncated or replaced); {REBUILD}")
        digest = file_digest(path)
        if digest != want["xxh3"]:
            raise CorruptCacheError(f"latent cache file {path} has other bytes than when it was written (xxh3 "
                                    f"{digest}, index.json says {want['xxh3']}); {REBUILD}")
        total += size
    seconds = time.perf_counter() - start
    logger.info("latent cache %s: %d files (%.2f GB) match their hashes (%.1f s, %.2f GB/s)", cache_dir,
                len(cache_files(index)), total / 1e9, seconds, total / 1e9 / max(seconds, 1e-9))


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
                absolute_winners: bool | None = None, deep: bool = False,
                data_format: str | None = None) -> dict[str, Any]:
    """Raise :class:`StaleCacheError` naming every key field that differs from the given settings.

    Only the settings given are compared (``model`` compares the VAE and text
    encoder hashes). ``deep`` also re-reads every image of ``sources`` and compares
    its content hash with the one cached for the pair. Returns the index.
    """
    index = read_index(cache_dir)
    key = index["key"]
    want: dict[str, Any] = {}
    if model is not None:
        want.update(model_identity(model))
    for name, value in (("resolution", resolution), ("dtype", dtype), ("flip", flip), ("drop_ties", drop_ties),
                        ("absolute_winners", absolute_winners), ("data_format", data_format)):
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
    key = index["key"]
    loader = pair_loader(
        sources=expand_sources(sources), resolution=8, batch_size=64, random_flip=False, drop_ties=key["drop_ties"],
        absolute_winners=key["absolute_winners"], columns=key["columns"] or None, drop_last=False, shuffle=False,
        format=key["data_format"])
    if loader.num_pairs != index["num_pairs"]:
        return [f"pairs: cache has {index['num_pairs']}, the sources give {loader.num_pairs}"]
    cached = np.concatenate([read_tensor(Path(cache_dir) / f, "image_hashes") for f in index["pair_shards"]])
    problems = []
    for b in loader_batches(loader):
        got = b["image_hashes"].view(np.int64)
        for j, i in enumerate(b["indices"].tolist()):
            if not np.array_equal(cached[i], got[j]):
                problems.append(f"pair {i} (caption {b['captions'][j]!r}): its images changed since caching")
    return problems

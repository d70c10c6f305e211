"""What a latent cache is valid for: its key (model components, data, settings), and the check that names
every field in which a cache differs from a run's settings."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ncp.data.batch import DataError
from ncp.data.paths import expand_sources
from ncp.models import DTYPES, detect_kind, resolve_model_path

FORMAT = "ncp-latent-cache/1"
# The dtypes a cache is written in, by their torch names (the key stores the name): ncp.models' table.
CACHE_DTYPES = {str(t).removeprefix("torch."): t for t in DTYPES.values()}


class StaleCacheError(DataError):
    """The cache was made from other images, models or settings than the run's; the message names them."""


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
    encoders = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
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
    key = {"data_format": "pairs", **key}  # caches written before unpaired data hold pairs
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

    key = index["key"]
    loader = ncp_dataloader.PairLoader(
        expand_sources(sources), 8, 64, random_flip=False, drop_ties=key["drop_ties"],
        absolute_winners=key["absolute_winners"], columns=key["columns"] or None, drop_last=False, shuffle=False,
        format=key.get("data_format", "pairs"))
    if loader.num_pairs != index["num_pairs"]:
        return [f"pairs: cache has {index['num_pairs']}, the sources give {loader.num_pairs}"]
    cached = np.concatenate([read_tensor(Path(cache_dir) / f, "image_hashes") for f in index["pair_shards"]])
    problems = []
    for b in loader:
        got = b["image_hashes"].view(np.int64)
        for j, i in enumerate(b["indices"].tolist()):
            if not np.array_equal(cached[i], got[j]):
                problems.append(f"pair {i} (caption {b['captions'][j]!r}): its images changed since caching")
    return problems

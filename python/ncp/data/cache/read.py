"""Reading a latent cache: :class:`CachedPairSource`, a loader backend like the others."""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ncp.data.batch import Batch, item_batch, pair_labels
from ncp.data.cache.key import REBUILD, CorruptCacheError, check_cache, verify_files
from ncp.data.options import LoaderOptions
from ncp.data.contract import Position, PositionedSource, num_batches

logger = logging.getLogger("ncp.cache")


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "U8": torch.uint8, "I32": torch.int32, "BOOL": torch.bool}


class Shards:
    """One tensor family split over safetensors files of ``shard_size`` rows each, memory-mapped: only the rows
    asked for are read. The header is parsed here, not by ``safetensors.safe_open``, because reading rows
    through its slices was 20x slower (9-11 vs 208-239 pairs/s, SD1.5-shaped latents, this machine)."""

    def __init__(self, files: list[Path], shard_size: int):
        self.files, self.shard_size = files, shard_size
        self._maps: list[dict[str, torch.Tensor]] = []

    def _open(self, shard: int) -> dict[str, torch.Tensor]:
        if not self._maps:  # mapped on first use (a source may be copied before it is read)
            self._maps = [_map(f) for f in self.files]
        return self._maps[shard]

    def whole(self, name: str) -> torch.Tensor:
        return torch.cat([self._open(s)[name] for s in range(len(self.files))])

    def rows(self, name: str, rows: np.ndarray, sub: np.ndarray | None = None) -> torch.Tensor:
        """``name[rows]`` (or ``name[rows, sub]``, one index into the second dimension per row), in one copy."""
        shard_of, offset = rows // self.shard_size, rows % self.shard_size
        first = self._open(int(shard_of[0]))[name]
        out = torch.empty((len(rows), *first.shape[1 if sub is None else 2:]), dtype=first.dtype)
        for s in np.unique(shard_of).tolist():
            sel = np.nonzero(shard_of == s)[0]
            t = self._open(s)[name]
            out[torch.from_numpy(sel)] = t[offset[sel]] if sub is None else t[offset[sel], sub[sel]]
        return out


def _map(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a read-only memory map (no copy); a header that does not
    describe the file is a :class:`CorruptCacheError` naming it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
        specs = {name: spec for name, spec in header.items() if name != "__metadata__"}
        for name, spec in specs.items():
            start, end = spec["data_offsets"]
            itemsize = _ST_DTYPES[spec["dtype"]].itemsize
            if not 0 <= start <= end <= size - 8 - n or end - start != itemsize * int(np.prod(spec["shape"])):
                raise ValueError(f"tensor {name!r} {spec['dtype']} {spec['shape']} at bytes [{start}, {end}) "
                                 f"does not fit")
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        raise CorruptCacheError(f"latent cache file {path}: bad safetensors header ({err}); {REBUILD}") from err
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, spec in specs.items():
        start, end = spec["data_offsets"]
        out[name] = flat[8 + n + start:8 + n + end].view(_ST_DTYPES[spec["dtype"]]).view(spec["shape"])
    return out


class CachedPairSource(PositionedSource):
    """Batches of cached posteriors and text embeddings, in the Rust loader's order.

    The pair order (permutation per (seed, epoch), split by rank), the flip and the
    empty-prompt draws come from ``ncp_dataloader`` itself, so a cache batch holds
    the same pairs with the same flips and dropped prompts as the pixel batch the
    Rust loader would give for the same settings (center crop). Pairs skipped as
    corrupt when the cache was built are skipped here too (a batch can be smaller).
    A cache of unpaired data (``index["key"]["data_format"] == "unpaired"``) gives
    unpaired batches (:class:`ncp.data.batch.UnpairedBatch`) with the cached labels.
    """

    def __init__(self, cache_dir: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 empty_prompt_prob: float = 0.0, random_flip: bool = True, drop_last: bool = True,
                 **expect: Any):
        import ncp_dataloader

        self._lib = ncp_dataloader
        self.dir = Path(cache_dir)
        self.index = check_cache(cache_dir, **expect)
        verify_files(self.dir, self.index)  # every file, once, before any is read
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.empty_prompt_prob, self.drop_last = empty_prompt_prob, drop_last
        self.random_flip = random_flip and self.index["flips"] == 2
        if random_flip and not self.random_flip:
            logger.info("latent cache %s holds no flipped latents: training without flips", cache_dir)
        self.num_pairs = self.index["num_pairs"]
        self._pairs = Shards([self.dir / f for f in self.index["pair_shards"]], self.index["shard_size"])
        self._embeds = Shards([self.dir / f for f in self.index["embed_shards"]], self.index["shard_size"])
        with safe_open(str(self.dir / "empty.safetensors"), framework="pt") as f:
            self._empty = {k: f.get_tensor(k)[0] for k in f.keys()}
        self._captions = json.loads((self.dir / "captions.json").read_text())
        # the small per-pair columns live in memory (tens of bytes a pair); latents and embeddings are read by row
        self.unpaired = self.index["key"]["data_format"] == "unpaired"
        small = ("valid", "caption_ids", "original_sizes", "crop_top_left") + (("desirable",) if self.unpaired else ())
        self._small = {k: self._pairs.whole(k).numpy() for k in small}
        self.position, self.skipped, self.yielded = Position(), 0, 0
        if len(self) == 0:
            raise ValueError(f"{self.num_pairs} cached pairs are fewer than one batch of {batch_size} per rank")

    @classmethod
    def from_options(cls, o: LoaderOptions, model_path: str | None = None) -> CachedPairSource:
        """The cache of ``o.cache_dir``, checked against the run's model and data settings."""
        return cls(o.cache_dir, o.batch_size, o.seed, o.rank, o.world_size, o.empty_prompt_prob, o.random_flip,
                   o.drop_last, model=model_path, sources=list(o.sources), resolution=o.resolution,
                   columns=dict(o.columns), drop_ties=o.drop_ties, absolute_winners=o.absolute_winners,
                   data_format=o.format)

    def __len__(self) -> int:
        return num_batches(self.num_pairs, self.batch_size, self.rank, self.world_size, self.drop_last)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def stats(self) -> dict[str, Any]:
        stats = {"format": "unpaired" if self.unpaired else "pairs", "pairs": self.index["num_valid"],
                 "cached_pairs": self.num_pairs, "skipped": self.skipped, "pairs_yielded": self.yielded,
                 "skipped_at_build": len(self.index["skipped"])}
        if self.unpaired:
            valid = self._small["valid"].astype(bool)
            desirable = int((self._small["desirable"].astype(bool) & valid).sum())
            stats.update(desirable=desirable, undesirable=int(valid.sum()) - desirable)
        return stats

    def _order(self) -> np.ndarray:
        order = self._lib.epoch_order(self.num_pairs, self.batch_size, self.seed, self.epoch, self.rank,
                                      self.world_size, self.drop_last)
        return order.reshape(-1)

    def batch(self, ids: np.ndarray, epoch: int) -> Batch | None:
        """The batch of the pair ids `ids` with the draws of `epoch`; None if all were skipped."""
        valid = self._small["valid"][ids].astype(bool)
        self.skipped += int((~valid).sum())
        ids = ids[valid]
        if len(ids) == 0:
            return None
        flips, drops = self._lib.augment_draws(self.seed, epoch, ids.astype(np.uint32).tolist(),
                                               self.random_flip, self.empty_prompt_prob)
        flip_index = flips.astype(np.int64) if self.random_flip else np.zeros(len(ids), np.int64)
        # (B, R, 2, C, h, w) = (pair, winner/loser, mean/logvar, ...) -> (RB, 2, C, h, w), winners then losers
        # (R = 1 for unpaired images)
        latents = self._pairs.rows("latents", ids, flip_index).transpose(0, 1).flatten(0, 1)
        cap_ids = self._small["caption_ids"][ids]
        drop = torch.from_numpy(drops)
        embeds = {name: torch.where(drop.view(-1, *[1] * self._empty[name].dim()), self._empty[name],
                                    self._embeds.rows(name, cap_ids))
                  for name in self._empty}  # prompt_embeds (B, L, D) [, pooled_prompt_embeds (B, D2)]
        captions = ["" if drop else self._captions[c] for c, drop in zip(cap_ids.tolist(), drops.tolist())]
        self.yielded += len(ids)
        fields = dict(
            captions=captions, latents=latents, prompt_embeds=embeds["prompt_embeds"],
            pooled_prompt_embeds=embeds.get("pooled_prompt_embeds"),
            original_sizes=torch.from_numpy(self._small["original_sizes"][ids]),
            crop_top_left=torch.from_numpy(self._small["crop_top_left"][ids]),
            indices=torch.from_numpy(ids.astype(np.int64)))
        labels = (torch.from_numpy(self._small["desirable"][ids].astype(bool))[:, None] if self.unpaired
                  else pair_labels(len(ids)))
        return item_batch(labels, **fields)

    def __iter__(self) -> Iterator[Batch]:
        num = len(self)
        self.position.start(num)
        epoch, order = self.position.epoch, self._order()
        for k in range(self.position.batch, num):
            ids = order[k * self.batch_size:(k + 1) * self.batch_size]
            self.position.took(num)
            batch = self.batch(ids, epoch)
            if batch is not None:
                yield batch

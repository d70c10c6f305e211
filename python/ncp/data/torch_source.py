"""The PyTorch baseline loader: Pick-a-Pic-style parquet (or a JSONL of image paths) + PIL.

It is the correctness oracle of the Rust loader and the baseline it is measured
against. Order and augmentation follow docs/internals.md: a permutation per
(seed, epoch), split by rank; crop, flip and empty-prompt dropout seeded by
(seed, epoch, pair index), identical for any number of workers.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ncp.data.batch import DataError, PairBatch
from ncp.data.options import LoaderOptions
from ncp.data.paths import expand_sources
from ncp.data.pairs import REQUIRED_COLUMNS, PairRef, column_map, image_uid, select_pairs
from ncp.data.sources import Position, PositionedSource, num_batches, rank_share

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- transforms


def decode_rgb(data: bytes) -> Image.Image:
    """Decode any PIL-readable image (format from the magic bytes) to RGB; alpha is dropped."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def crop_box(size: tuple[int, int], resolution: int, u: tuple[float, float] | None) -> tuple[int, int, int, int]:
    """(new_w, new_h, top, left): resize the shorter side to ``resolution``, then crop.

    Integer arithmetic, so the Rust loader reproduces it exactly: the longer side
    becomes ``(long * R + short // 2) // short``. ``u`` = (u_top, u_left) in [0, 1)
    places a random crop at ``floor(u * (extent + 1))``; None centres it. The two
    images of a pair share ``u`` (one crop per pair, also when their sizes differ).
    """
    w, h = size
    short = min(w, h)
    new_w = resolution if w == short else (w * resolution + short // 2) // short
    new_h = resolution if h == short else (h * resolution + short // 2) // short
    if u is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = min(int(u[0] * (new_h - resolution + 1)), new_h - resolution)
        left = min(int(u[1] * (new_w - resolution + 1)), new_w - resolution)
    return new_w, new_h, top, left


def resize_crop(img: Image.Image, new_w: int, new_h: int, top: int, left: int, resolution: int,
                flip: bool) -> np.ndarray:
    """uint8 (3, R, R): bilinear (antialiased) resize, crop, optional horizontal flip."""
    img = img.resize((new_w, new_h), Image.BILINEAR)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


@dataclass
class Sample:
    index: int
    caption: str
    winner: np.ndarray
    loser: np.ndarray
    original_size: tuple[int, int]  # (h, w) of the winner
    crop_top_left: tuple[int, int]


# ---------------------------------------------------------------- the dataset


class PreferencePairs(torch.utils.data.Dataset):
    """Selected pairs of parquet shards (Pick-a-Pic v2 schema) or of a JSONL of image paths."""

    def __init__(self, sources: list[str], resolution: int, columns: dict[str, str] | None = None,
                 drop_ties: bool = True, absolute_winners: bool = False, random_crop: bool = False,
                 random_flip: bool = True, empty_prompt_prob: float = 0.0, seed: int = 0, strict: bool = False):
        self.files = [Path(f) for f in expand_sources(sources)]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise DataError(f"data.sources: no such file {missing[0]}")
        self.columns = column_map(columns or {})
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.empty_prompt_prob, self.seed, self.strict, self.epoch = empty_prompt_prob, seed, strict, 0
        self.jsonl = self.files[0].suffix == ".jsonl"
        meta = [self._read_jsonl(self.files[0])] if self.jsonl else [self._read_meta(f) for f in self.files]
        self.meta = meta
        self.pairs: list[PairRef] = select_pairs(meta, drop_ties, absolute_winners)
        if not self.pairs:
            raise DataError(f"no training pairs left in {', '.join(map(str, self.files))} after the filters")
        self._row_group_cache: dict[tuple[int, int], dict[str, list]] = {}

    def _read_meta(self, file: Path) -> dict[str, list]:
        try:
            pf = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"cannot read parquet file {file}: {err}") from err
        names = set(pf.schema_arrow.names)
        missing = [self.columns[c] for c in REQUIRED_COLUMNS if self.columns[c] not in names]
        if missing:
            raise DataError(f"parquet file {file} lacks column(s) {missing} (rename with data.columns; "
                            f"it has {sorted(names)})")
        wanted = ["caption", "label_0", "label_1"] + [c for c in ("image_0_uid", "image_1_uid")
                                                      if self.columns[c] in names]
        table = pf.read(columns=[self.columns[c] for c in wanted])
        cols = {c: table.column(self.columns[c]).to_pylist() for c in wanted}
        if "image_0_uid" not in cols:  # uids from the image bytes (read once, here)
            images = pf.read(columns=[self.columns["jpg_0"], self.columns["jpg_1"]])
            for k in (0, 1):
                cols[f"image_{k}_uid"] = [image_uid(b) for b in images.column(self.columns[f"jpg_{k}"]).to_pylist()]
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        cols["_row_group_starts"] = starts.tolist()
        return cols

    def _read_jsonl(self, file: Path) -> dict[str, list]:
        cols: dict[str, list] = {k: [] for k in ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")}
        cols["_paths"] = []
        for line_no, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                paths = [str((file.parent / rec[k]).resolve()) for k in ("winner", "loser")]
                caption = rec["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{file}:{line_no}: expected {{caption, winner, loser}}: {err}") from err
            cols["caption"].append(caption)
            cols["label_0"].append(1.0)
            cols["label_1"].append(0.0)
            cols["image_0_uid"].append(paths[0])
            cols["image_1_uid"].append(paths[1])
            cols["_paths"].append(paths)
        return cols

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _image_bytes(self, ref: PairRef) -> tuple[bytes, bytes]:
        meta = self.meta[ref.file]
        if self.jsonl:
            a, b = (Path(p).read_bytes() for p in meta["_paths"][ref.row])
            return a, b
        starts = meta["_row_group_starts"]
        group = int(np.searchsorted(starts, ref.row, side="right") - 1)
        key = (ref.file, group)
        if key not in self._row_group_cache:  # one row group at a time: parquet's unit of I/O
            self._row_group_cache.clear()
            table = pq.ParquetFile(self.files[ref.file]).read_row_group(
                group, columns=[self.columns["jpg_0"], self.columns["jpg_1"]])
            self._row_group_cache[key] = {k: table.column(self.columns[k]).to_pylist() for k in ("jpg_0", "jpg_1")}
        cached = self._row_group_cache[key]
        row = ref.row - starts[group]
        return cached["jpg_0"][row], cached["jpg_1"][row]

    def where(self, index: int) -> str:
        ref = self.pairs[index]
        return f"{self.files[ref.file]} row {ref.row}"

    def __getitem__(self, index: int) -> Sample | None:
        ref = self.pairs[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        flip = self.random_flip and bool(rng.random() < 0.5)
        drop_prompt = bool(rng.random() < self.empty_prompt_prob)
        try:
            data0, data1 = self._image_bytes(ref)
            img0, img1 = decode_rgb(data0), decode_rgb(data1)
        except Exception as err:  # PIL raises many types for a corrupt image
            if self.strict:
                raise DataError(f"corrupt image in {self.where(index)}: {err}") from err
            logger.warning("skipping pair %d: corrupt image in %s: %s", index, self.where(index), err)
            return None
        winner, loser = (img0, img1) if ref.winner_is_0 else (img1, img0)
        u = (float(rng.random()), float(rng.random())) if self.random_crop else None
        pixels, boxes = [], []
        for img in (winner, loser):
            new_w, new_h, top, left = crop_box(img.size, self.resolution, u)
            pixels.append(resize_crop(img, new_w, new_h, top, left, self.resolution, flip))
            boxes.append((top, left))
        caption = "" if drop_prompt else self.meta[ref.file]["caption"][ref.row]
        return Sample(index, caption, pixels[0], pixels[1], (winner.size[1], winner.size[0]), boxes[0])


def collate(samples: list[Sample | None]) -> tuple[PairBatch | None, int]:
    """Stack samples into a PairBatch; corrupt pairs (None) are dropped and counted."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return None, skipped
    batch = PairBatch(
        captions=[s.caption for s in good],
        winners=torch.from_numpy(np.stack([s.winner for s in good])),
        losers=torch.from_numpy(np.stack([s.loser for s in good])),
        original_sizes=torch.tensor([s.original_size for s in good], dtype=torch.long),
        crop_top_left=torch.tensor([s.crop_top_left for s in good], dtype=torch.long),
        indices=torch.tensor([s.index for s in good], dtype=torch.long),
    )
    return batch, skipped


def epoch_order(num_pairs: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's pair indices for an epoch: a permutation per (seed, epoch), every world_size-th entry from
    ``rank`` (the rule of every backend, :func:`ncp.data.sources.rank_share`), equal lengths over ranks."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_pairs)
    return rank_share(perm, rank, world_size)[:num_pairs // world_size]


class TorchPairSource(PositionedSource):
    """Batches of a :class:`PreferencePairs` through a torch DataLoader, resumable mid-epoch
    (a :class:`ncp.data.sources.PairSource`)."""

    def __init__(self, dataset: PreferencePairs, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.position, self.skipped = Position(), 0
        if len(self) == 0:
            raise DataError(f"{len(dataset)} pairs are fewer than one batch of {batch_size} per rank "
                            f"({world_size} rank(s))")

    @classmethod
    def from_options(cls, o: LoaderOptions) -> TorchPairSource:
        dataset = PreferencePairs(list(o.sources), o.resolution, dict(o.columns), o.drop_ties, o.absolute_winners,
                                  o.random_crop, o.random_flip, o.empty_prompt_prob, o.seed, o.strict)
        return cls(dataset, o.batch_size, o.seed, o.rank, o.world_size, o.num_workers)

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size, self.rank, self.world_size, drop_last=True)

    def stats(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def __iter__(self) -> Iterator[PairBatch]:
        n = len(self)
        self.position.start(n)
        epoch = self.position.epoch
        self.dataset.set_epoch(epoch)
        order = epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world_size)
        batches = [order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
                   for k in range(self.position.batch, n)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=self.num_workers,
                                             persistent_workers=False)
        for batch, skipped in loader:
            self.position.took(n)
            self.skipped += skipped
            if batch is not None:
                yield batch

"""The PyTorch baseline loader: Pick-a-Pic-style parquet (or a JSONL of image paths) + PIL.

It is the correctness oracle of the Rust loader and the baseline it is measured
against. Order and augmentation follow docs/internals.md: a permutation per
(seed, epoch), split by rank; crop, flip and empty-prompt dropout seeded by
(seed, epoch, pair index), identical for any number of workers.
"""
from __future__ import annotations

import glob
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ncp.data.batch import DataError, PairBatch
from ncp.data.pairs import REQUIRED_COLUMNS, PairRef, column_map, image_uid, select_pairs

logger = logging.getLogger(__name__)


def expand_sources(sources: list[str]) -> list[Path]:
    """Paths and globs to a sorted list of files; 'bundle' is the data shipped with ncp."""
    from ncp.world import bundle_path

    files: list[Path] = []
    for src in sources:
        if src == "bundle":
            src = str(bundle_path("data", "*.parquet"))
        matches = sorted(glob.glob(str(Path(src).expanduser())))
        if not matches:
            raise DataError(f"data.sources: {src} matches no file")
        files.extend(Path(m) for m in matches)
    if len(files) > 1 and any(f.suffix == ".jsonl" for f in files):
        raise DataError("data.sources: a JSONL source must be the only source")
    return files


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
        self.files = expand_sources(sources)
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
    """This rank's pair indices for an epoch: a permutation per (seed, epoch), split by rank, equal lengths."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_pairs)
    per_rank = num_pairs // world_size
    return perm[rank * per_rank:(rank + 1) * per_rank]


class TorchPairSource:
    """Batches of a :class:`PreferencePairs` through a torch DataLoader, resumable mid-epoch."""

    def __init__(self, dataset: PreferencePairs, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.sample_in_epoch, self.skipped = 0, 0, 0
        if len(self) == 0:
            raise DataError(f"{len(dataset)} pairs are fewer than one batch of {batch_size} per rank "
                            f"({world_size} rank(s))")

    def __len__(self) -> int:
        return (len(self.dataset) // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.sample_in_epoch = epoch, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch, "seed": self.seed,
                "world_size": self.world_size}

    def resume(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise DataError(f"cannot resume data order saved with seed {state['seed']} and world size "
                            f"{state['world_size']} under seed {self.seed} and world size {self.world_size}")
        self.epoch, self.sample_in_epoch = state["epoch"], state["sample_in_epoch"]

    def stats(self) -> dict:
        return {"skipped": self.skipped}

    def __iter__(self) -> Iterator[PairBatch]:
        self.dataset.set_epoch(self.epoch)
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.rank, self.world_size)
        usable = len(self) * self.batch_size
        batches = [order[i:i + self.batch_size].tolist() for i in range(self.sample_in_epoch, usable, self.batch_size)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=self.num_workers,
                                             persistent_workers=False)
        for batch, skipped in loader:
            self.sample_in_epoch += self.batch_size
            self.skipped += skipped
            if batch is not None:
                yield batch

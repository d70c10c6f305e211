"""The PyTorch baseline loader: Pick-a-Pic-style parquet (or a JSONL of image paths) + PIL; or unpaired
(caption, image, label) rows (:class:`UnpairedImages`).

It is the correctness oracle of the Rust loader and the baseline it is measured
against. Order and augmentation follow docs/internals.md: a permutation per
(seed, epoch), split by rank; crop, flip and empty-prompt dropout seeded by
(seed, epoch, pair index), identical for any number of workers.
"""
from __future__ import annotations

import io
import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ncp.data.batch import Batch, DataError, PairBatch, UnpairedBatch
from ncp.data.options import LoaderOptions
from ncp.data.paths import expand_sources
from ncp.data.pairs import REQUIRED_COLUMNS, PairRef, column_map, image_uid, select_pairs
from ncp.data.sources import Position, PositionedSource, num_batches, rank_share
from ncp.data.unpaired import parse_label, unpaired_column_map

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


def source_files(sources: list[str]) -> list[Path]:
    """``data.sources`` expanded to files (``ncp.data.paths.expand_sources``); a missing one is a DataError."""
    files = [Path(f) for f in expand_sources(sources)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"data.sources: no such file {missing[0]}")
    return files


@dataclass
class Sample:
    index: int
    caption: str
    winner: np.ndarray
    loser: np.ndarray
    original_size: tuple[int, int]  # (h, w) of the winner
    crop_top_left: tuple[int, int]


# ---------------------------------------------------------------- reading


def jsonl_lines(file: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSONL file with their numbers (from 1); a line that is not UTF-8 is a
    :class:`DataError` naming the file, line and byte (the Rust loader's message)."""
    for line_no, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{file} line {line_no}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                            f"{err.start + 1})") from None
        if line.strip():
            yield line_no, line


def json_string(value: Any, file: Path, line_no: int, key: str) -> str:
    """``value`` of ``key`` on a JSONL line, or a :class:`DataError` naming file, line and key (the Rust
    loader's message)."""
    if not isinstance(value, str):
        raise DataError(f"{file} line {line_no} key '{key}': expected a string, got {json.dumps(value)}")
    return value


def open_parquet(file: Path, columns: dict[str, str], required: tuple[str, ...]) -> pq.ParquetFile:
    """The parquet file, or a DataError naming it (unreadable) or the required columns it lacks."""
    try:
        pf = pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet file {file}: {err}") from err
    names = set(pf.schema_arrow.names)
    missing = [columns[c] for c in required if columns[c] not in names]
    if missing:
        raise DataError(f"parquet file {file} lacks column(s) {missing} (rename with data.columns; "
                        f"it has {sorted(names)})")
    return pf


def row_group_starts(pf: pq.ParquetFile) -> list[int]:
    return np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]).tolist()



def leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """A loader worker ignores SIGTERM, SIGINT and SIGUSR1: the training process handles them (``ncp.preempt``:
    finish the step, checkpoint) and then shuts its workers down. A signal sent to the whole process group
    (Slurm at the time limit, ``scancel``, Ctrl-C) would otherwise kill the workers first, and the run would
    end in PyTorch's "DataLoader worker is killed" error without its checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)

class RowGroupImages:
    """The image columns of one parquet row group at a time (parquet's unit of I/O), for reading rows in
    index order without re-reading their group."""

    def __init__(self, files: list[Path], names: list[str]):
        self.files, self.names = files, names
        self._key: tuple[int, int] | None = None
        self._cells: list[list] = []

    def row(self, file: int, row: int, starts: list[int]) -> list[bytes | None]:
        """The images of row ``row`` of ``files[file]`` (row groups starting at ``starts``), in column order."""
        group = int(np.searchsorted(starts, row, side="right") - 1)
        if self._key != (file, group):
            table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=self.names)
            self._key, self._cells = (file, group), [table.column(n).to_pylist() for n in self.names]
        return [cells[row - starts[group]] for cells in self._cells]


def draws(seed: int, epoch: int, index: int, random_flip: bool, empty_prompt_prob: float,
          random_crop: bool) -> tuple[bool, bool, tuple[float, float] | None]:
    """(flip, drop the prompt, crop u or None) of item ``index`` of ``epoch``: one numpy stream per
    (seed, epoch, index), drawn in this order (docs/internals.md)."""
    rng = np.random.default_rng([seed, epoch, index])
    flip = random_flip and bool(rng.random() < 0.5)
    drop_prompt = bool(rng.random() < empty_prompt_prob)
    u = (float(rng.random()), float(rng.random())) if random_crop else None
    return flip, drop_prompt, u


def transform(img: Image.Image, resolution: int, u: tuple[float, float] | None, flip: bool
              ) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (3, R, R) of a decoded image and its crop's (top, left)."""
    new_w, new_h, top, left = crop_box(img.size, resolution, u)
    return resize_crop(img, new_w, new_h, top, left, resolution, flip), (top, left)


# ---------------------------------------------------------------- the dataset


class PreferencePairs(torch.utils.data.Dataset):
    """Selected pairs of parquet shards (Pick-a-Pic v2 schema) or of a JSONL of image paths."""

    def __init__(self, sources: list[str], resolution: int, columns: dict[str, str] | None = None,
                 drop_ties: bool = True, absolute_winners: bool = False, random_crop: bool = False,
                 random_flip: bool = True, empty_prompt_prob: float = 0.0, seed: int = 0, strict: bool = False):
        self.files = source_files(sources)
        self.columns = column_map(columns or {})
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.empty_prompt_prob, self.seed, self.strict, self.epoch = empty_prompt_prob, seed, strict, 0
        self.jsonl = self.files[0].suffix == ".jsonl"
        meta = [self._read_jsonl(self.files[0])] if self.jsonl else [self._read_meta(f) for f in self.files]
        self.meta = meta
        self.pairs: list[PairRef] = select_pairs(meta, drop_ties, absolute_winners)
        if not self.pairs:
            raise DataError(f"no training pairs left in {', '.join(map(str, self.files))} after the filters")
        self._row_groups = RowGroupImages(self.files, [self.columns["jpg_0"], self.columns["jpg_1"]])

    def _read_meta(self, file: Path) -> dict[str, list]:
        pf = open_parquet(file, self.columns, REQUIRED_COLUMNS)
        names = set(pf.schema_arrow.names)
        wanted = ["caption", "label_0", "label_1"] + [c for c in ("image_0_uid", "image_1_uid")
                                                      if self.columns[c] in names]
        table = pf.read(columns=[self.columns[c] for c in wanted])
        cols = {c: table.column(self.columns[c]).to_pylist() for c in wanted}
        if "image_0_uid" not in cols:  # uids from the image bytes (read once, here)
            images = pf.read(columns=[self.columns["jpg_0"], self.columns["jpg_1"]])
            for k in (0, 1):
                cols[f"image_{k}_uid"] = [image_uid(b) for b in images.column(self.columns[f"jpg_{k}"]).to_pylist()]
        cols["_row_group_starts"] = row_group_starts(pf)
        return cols

    def _read_jsonl(self, file: Path) -> dict[str, list]:
        cols: dict[str, list] = {k: [] for k in ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")}
        cols["_paths"] = []
        for line_no, line in jsonl_lines(file):
            try:
                rec = json.loads(line)
                caption, winner, loser = (json_string(rec[k], file, line_no, k) for k in ("caption", "winner", "loser"))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{file}:{line_no}: expected {{caption, winner, loser}}: {err}") from err
            paths = [str((file.parent / p).resolve()) for p in (winner, loser)]
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
        a, b = self._row_groups.row(ref.file, ref.row, meta["_row_group_starts"])
        return a, b

    def where(self, index: int) -> str:
        ref = self.pairs[index]
        return f"{self.files[ref.file]} row {ref.row}"

    def __getitem__(self, index: int) -> Sample | None:
        ref = self.pairs[index]
        flip, drop_prompt, u = draws(self.seed, self.epoch, index, self.random_flip, self.empty_prompt_prob,
                                     self.random_crop)
        try:
            data0, data1 = self._image_bytes(ref)
            img0, img1 = decode_rgb(data0), decode_rgb(data1)
        except Exception as err:  # PIL raises many types for a corrupt image
            if self.strict:
                raise DataError(f"corrupt image in {self.where(index)}: {err}") from err
            logger.warning("skipping pair %d: corrupt image in %s: %s", index, self.where(index), err)
            return None
        winner, loser = (img0, img1) if ref.winner_is_0 else (img1, img0)
        (w_px, box), (l_px, _) = (transform(img, self.resolution, u, flip) for img in (winner, loser))
        caption = "" if drop_prompt else self.meta[ref.file]["caption"][ref.row]
        return Sample(index, caption, w_px, l_px, (winner.size[1], winner.size[0]), box)

    @staticmethod
    def collate(samples: list[Sample | None]) -> tuple[PairBatch | None, int]:
        return collate(samples)


@dataclass
class UnpairedSample:
    index: int
    caption: str
    image: np.ndarray
    desirable: bool
    original_size: tuple[int, int]  # (h, w)
    crop_top_left: tuple[int, int]


class UnpairedImages(torch.utils.data.Dataset):
    """Unpaired binary feedback (:mod:`ncp.data.unpaired`): every row of parquet files or of one JSONL file
    of ``{caption, image, label}`` (keys renamed by ``columns``) is an item; no selection. Draws and
    transforms are those of :class:`PreferencePairs`, applied to the one image."""

    def __init__(self, sources: list[str], resolution: int, columns: dict[str, str] | None = None,
                 random_crop: bool = False, random_flip: bool = True, empty_prompt_prob: float = 0.0,
                 seed: int = 0, strict: bool = False):
        self.files = source_files(sources)
        self.columns = unpaired_column_map(columns or {})
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.empty_prompt_prob, self.seed, self.strict, self.epoch = empty_prompt_prob, seed, strict, 0
        self.jsonl = self.files[0].suffix == ".jsonl"
        # items: (file, row, caption, desirable, image path or None); rows are lines (from 0) in JSONL
        self.items: list[tuple[int, int, str, bool, str | None]] = []
        self.starts: list[list[int]] = []
        for f, file in enumerate(self.files):
            self.items.extend(self._read_jsonl(file) if self.jsonl else self._read_parquet(f, file))
        if not self.items:
            raise DataError(f"no rows in {', '.join(map(str, self.files))}")
        self._row_groups = RowGroupImages(self.files, [self.columns["image"]])

    def _read_parquet(self, f: int, file: Path) -> list[tuple[int, int, str, bool, None]]:
        pf = open_parquet(file, self.columns, ("caption", "image", "label"))
        table = pf.read(columns=[self.columns["caption"], self.columns["label"]])
        self.starts.append(row_group_starts(pf))
        col = self.columns["label"]
        labels = [parse_label(v, f"{file} row {r} column '{col}'")
                  for r, v in enumerate(table.column(col).to_pylist())]
        captions = [c or "" for c in table.column(self.columns["caption"]).to_pylist()]
        return [(f, r, c, d, None) for r, (c, d) in enumerate(zip(captions, labels))]

    def _read_jsonl(self, file: Path) -> list[tuple[int, int, str, bool, str]]:
        out = []
        for line_no, line in jsonl_lines(file):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"cannot read {file}: line {line_no}: invalid JSON: {err}") from err
            values = {}
            for logical, key in self.columns.items():
                if not isinstance(rec, dict) or key not in rec:
                    raise DataError(f"column '{key}' (logical '{logical}') not found in {file} line {line_no}; "
                                    f"available columns: {', '.join(rec) if isinstance(rec, dict) else ''}")
                values[logical] = rec[key]
            for logical in ("caption", "image"):
                json_string(values[logical], file, line_no, self.columns[logical])
            desirable = parse_label(values["label"], f"{file} line {line_no} key '{self.columns['label']}'")
            out.append((0, line_no - 1, values["caption"], desirable, str(file.parent / values["image"])))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def where(self, index: int) -> str:
        f, row, *_ = self.items[index]
        return f"{self.files[f]} row {row}"

    def __getitem__(self, index: int) -> UnpairedSample | None:
        f, row, caption, desirable, path = self.items[index]
        flip, drop_prompt, u = draws(self.seed, self.epoch, index, self.random_flip, self.empty_prompt_prob,
                                     self.random_crop)
        try:
            data = Path(path).read_bytes() if path is not None else self._row_groups.row(f, row, self.starts[f])[0]
            img = decode_rgb(data)
        except Exception as err:  # PIL raises many types for a corrupt image; a missing file or a null too
            if self.strict:
                raise DataError(f"corrupt image in {self.where(index)}: {err}") from err
            logger.warning("skipping image %d: corrupt image in %s: %s", index, self.where(index), err)
            return None
        pixels, box = transform(img, self.resolution, u, flip)
        return UnpairedSample(index, "" if drop_prompt else caption, pixels, desirable, (img.size[1], img.size[0]),
                              box)

    @staticmethod
    def collate(samples: list[UnpairedSample | None]) -> tuple[UnpairedBatch | None, int]:
        """Stack samples into an UnpairedBatch; corrupt images (None) are dropped and counted."""
        good = [s for s in samples if s is not None]
        if not good:
            return None, len(samples)
        batch = UnpairedBatch(
            captions=[s.caption for s in good],
            images=torch.from_numpy(np.stack([s.image for s in good])),
            desirable=torch.tensor([s.desirable for s in good], dtype=torch.bool),
            original_sizes=torch.tensor([s.original_size for s in good], dtype=torch.long),
            crop_top_left=torch.tensor([s.crop_top_left for s in good], dtype=torch.long),
            indices=torch.tensor([s.index for s in good], dtype=torch.long),
        )
        return batch, len(samples) - len(good)


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
    """Batches of a :class:`PreferencePairs` (or :class:`UnpairedImages`) through a torch DataLoader,
    resumable mid-epoch (a :class:`ncp.data.sources.PairSource`)."""

    def __init__(self, dataset: PreferencePairs | UnpairedImages, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.position, self.skipped = Position(), 0
        if len(self) == 0:
            raise DataError(f"{len(dataset)} pairs are fewer than one batch of {batch_size} per rank "
                            f"({world_size} rank(s))")

    @classmethod
    def from_options(cls, o: LoaderOptions) -> TorchPairSource:
        if o.format == "unpaired":
            if o.absolute_winners:
                raise DataError("data.absolute_winners selects pairs; unpaired data has none")
            dataset = UnpairedImages(list(o.sources), o.resolution, dict(o.columns), o.random_crop, o.random_flip,
                                     o.empty_prompt_prob, o.seed, o.strict)
            return cls(dataset, o.batch_size, o.seed, o.rank, o.world_size, o.num_workers)
        dataset = PreferencePairs(list(o.sources), o.resolution, dict(o.columns), o.drop_ties, o.absolute_winners,
                                  o.random_crop, o.random_flip, o.empty_prompt_prob, o.seed, o.strict)
        return cls(dataset, o.batch_size, o.seed, o.rank, o.world_size, o.num_workers)

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size, self.rank, self.world_size, drop_last=True)

    def stats(self) -> dict[str, Any]:
        if isinstance(self.dataset, UnpairedImages):
            desirable = sum(item[3] for item in self.dataset.items)
            return {"format": "unpaired", "skipped": self.skipped, "desirable": desirable,
                    "undesirable": len(self.dataset) - desirable}
        return {"format": "pairs", "skipped": self.skipped}

    def __iter__(self) -> Iterator[Batch]:
        n = len(self)
        self.position.start(n)
        epoch = self.position.epoch
        self.dataset.set_epoch(epoch)
        order = epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world_size)
        batches = [order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
                   for k in range(self.position.batch, n)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.dataset.collate,
                                             num_workers=self.num_workers, persistent_workers=False,
                                             worker_init_fn=leave_stop_signals_to_the_parent)
        for batch, skipped in worker_errors(loader):
            self.position.took(n)
            self.skipped += skipped
            if batch is not None:
                yield batch


def worker_errors(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """The items of ``loader``; a :class:`DataError` raised in one of its worker processes keeps its own
    one-line message (torch re-raises it with the worker's traceback in the message)."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DataError as err:
            head = f"{type(err).__module__}.{type(err).__qualname__}: "
            own = [line.removeprefix(head) for line in str(err).splitlines() if line.startswith(head)]
            if not own:  # raised in this process: already its own message
                raise
            raise type(err)(own[-1]) from None
        yield item

"""The PyTorch baseline loader: items of either kind (:mod:`ncp.data.items`: Pick-a-Pic-style pairs, unpaired
(caption, image, label) rows) read from parquet or a JSONL of image paths (:mod:`ncp.data.formats`), decoded
by PIL.

It is the correctness oracle of the Rust loader and the baseline it is measured
against. Order and augmentation follow docs/internals.md: a permutation per
(seed, epoch), split by rank; crop, flip and empty-prompt dropout seeded by
(seed, epoch, item index), identical for any number of workers.
"""
from __future__ import annotations

import atexit
import io
import logging
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ncp.data.batch import Batch, DataError, item_batch
from ncp.data.contract import Position, PositionedSource, num_batches, rank_share
from ncp.data.formats import RowGroupImages, read_table
from ncp.data.items import KINDS, Item
from ncp.data.options import LoaderOptions
from ncp.data.expand import expand_sources

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
    """``data.sources`` expanded to files (``ncp.data.expand.expand_sources``); a missing one is a DataError."""
    files = [Path(f) for f in expand_sources(sources)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"data.sources: no such file {missing[0]}")
    return files


def leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """A loader worker ignores SIGTERM, SIGINT and SIGUSR1: the training process handles them (``ncp.preempt``:
    finish the step, checkpoint) and then shuts its workers down. A signal sent to the whole process group
    (Slurm at the time limit, ``scancel``, Ctrl-C) would otherwise kill the workers first, and the run would
    end in PyTorch's "DataLoader worker is killed" error without its checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


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


@dataclass
class Sample:
    """One item decoded and transformed, its images and labels in role order (a pair's winner first)."""

    index: int
    caption: str
    images: tuple[np.ndarray, ...]  # uint8 (3, R, R) each
    labels: tuple[bool, ...]
    original_size: tuple[int, int]  # (h, w) of the first image
    crop_top_left: tuple[int, int]


class ItemDataset(torch.utils.data.Dataset):
    """The items of parquet files or of one JSONL file: the selected pairs (``format="pairs"``: Pick-a-Pic v2
    columns, or JSONL ``{caption, winner, loser}``) or every row of unpaired binary feedback
    (``format="unpaired"``: ``{caption, image, label}``); columns renamed by ``columns``. The images of an item
    share its draws (one crop, one flip)."""

    def __init__(self, sources: list[str], resolution: int, columns: dict[str, str] | None = None,
                 drop_ties: bool = True, absolute_winners: bool = False, random_crop: bool = False,
                 random_flip: bool = True, empty_prompt_prob: float = 0.0, seed: int = 0, strict: bool = False,
                 format: str = "pairs"):
        self.kind = KINDS[format]
        if absolute_winners and self.kind.binary:
            raise DataError("data.absolute_winners selects pairs; unpaired data has none")
        self.files = source_files(sources)
        self.columns = self.kind.column_map(columns or {})
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.empty_prompt_prob, self.seed, self.strict, self.epoch = empty_prompt_prob, seed, strict, 0
        self.tables = [read_table(f, self.kind, self.columns) for f in self.files]
        self.items: list[Item] = self.kind.items(self.tables, drop_ties, absolute_winners)
        if not self.items:
            raise self.kind.nothing_left(self.files)
        self._row_groups = RowGroupImages(self.files, [self.columns[c] for c in self.kind.images])

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def where(self, index: int) -> str:
        item = self.items[index]
        return f"{self.files[item.file]} row {item.row}"

    def _image_bytes(self, item: Item) -> list[bytes | None]:
        """The item's images, in column order."""
        starts = self.tables[item.file].row_group_starts
        if starts is None:  # JSONL: paths
            return [Path(p).read_bytes() for p in item.images]
        return self._row_groups.row(item.file, item.row, starts)

    def __getitem__(self, index: int) -> Sample | None:
        item = self.items[index]
        flip, drop_prompt, u = draws(self.seed, self.epoch, index, self.random_flip, self.empty_prompt_prob,
                                     self.random_crop)
        try:
            decoded = [decode_rgb(data) for data in self._image_bytes(item)]
        except Exception as err:  # PIL raises many types for a corrupt image; a missing file or a null too
            if self.strict:
                raise DataError(f"corrupt image in {self.where(index)}: {err}") from err
            logger.warning("skipping %s %d: corrupt image in %s: %s", self.kind.noun, index, self.where(index), err)
            return None
        order = item.role_order()
        images = [decoded[k] for k in order]
        pixels, boxes = zip(*(transform(img, self.resolution, u, flip) for img in images))
        return Sample(index, "" if drop_prompt else item.caption, pixels, tuple(item.labels[k] for k in order),
                      (images[0].size[1], images[0].size[0]), boxes[0])

    @staticmethod
    def collate(samples: list[Sample | None]) -> tuple[Batch | None, int]:
        return collate(samples)


def collate(samples: list[Sample | None]) -> tuple[Batch | None, int]:
    """Stack samples into a batch (:func:`ncp.data.batch.item_batch`); corrupt items (None) are dropped and
    counted."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return None, skipped
    batch = item_batch(
        labels=torch.tensor([s.labels for s in good], dtype=torch.bool),
        images=[torch.from_numpy(np.stack([s.images[r] for s in good])) for r in range(len(good[0].images))],
        captions=[s.caption for s in good],
        original_sizes=torch.tensor([s.original_size for s in good], dtype=torch.long),
        crop_top_left=torch.tensor([s.crop_top_left for s in good], dtype=torch.long),
        indices=torch.tensor([s.index for s in good], dtype=torch.long),
    )
    return batch, skipped


def epoch_order(num_pairs: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's pair indices for an epoch: a permutation per (seed, epoch), every world_size-th entry from
    ``rank`` (the rule of every backend, :func:`ncp.data.contract.rank_share`), equal lengths over ranks."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_pairs)
    return rank_share(perm, rank, world_size)[:num_pairs // world_size]


class TorchPairSource(PositionedSource):
    """Batches of an :class:`ItemDataset` through a torch DataLoader, resumable mid-epoch (a
    :class:`ncp.data.contract.PairSource`)."""

    def __init__(self, dataset: ItemDataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.position, self.skipped = Position(), 0
        if len(self) == 0:
            raise DataError(f"{len(dataset)} pairs are fewer than one batch of {batch_size} per rank "
                            f"({world_size} rank(s))")

    @classmethod
    def from_options(cls, o: LoaderOptions) -> TorchPairSource:
        dataset = ItemDataset(list(o.sources), o.resolution, dict(o.columns), drop_ties=o.drop_ties,
                              absolute_winners=o.absolute_winners, random_crop=o.random_crop,
                              random_flip=o.random_flip, empty_prompt_prob=o.empty_prompt_prob, seed=o.seed,
                              strict=o.strict, format=o.format)
        return cls(dataset, o.batch_size, o.seed, o.rank, o.world_size, o.num_workers)

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size, self.rank, self.world_size, drop_last=True)

    def stats(self) -> dict[str, Any]:
        stats = {"format": self.dataset.kind.name, "skipped": self.skipped}
        if self.dataset.kind.binary:
            desirable = sum(item.labels[0] for item in self.dataset.items)
            stats.update(desirable=desirable, undesirable=len(self.dataset) - desirable)
        return stats

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


# Loader workers ignore SIGTERM (``leave_stop_signals_to_the_parent``). multiprocessing's exit hook stops daemonic
# children with SIGTERM and then joins them, so the workers of an iterator nobody closed (a generator dropped
# mid-epoch and kept alive by a reference cycle or a stored exception) would hold the process at exit forever.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's hook (torch imports it first), so it runs before it
def _stop_live_workers() -> None:
    """Tell every live iterator's workers to stop, as torch's own shutdown does (its done event, then join)."""
    for it in list(_LIVE_ITERATORS):
        it._shutdown_workers()


def worker_errors(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """The items of ``loader``; a :class:`DataError` raised in one of its worker processes keeps its own
    one-line message (torch re-raises it with the worker's traceback in the message). The workers stop when
    this generator ends, is closed, or raises, and at the latest when the process exits."""
    it = iter(loader)
    stop = getattr(it, "_shutdown_workers", None)  # None without workers (num_workers=0)
    if stop is not None:
        _LIVE_ITERATORS.add(it)
    try:
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
    finally:
        if stop is not None:
            stop()

"""Types of the Rust loader's Python module (the binding is rust_dataloader/src/python.rs).

Preference pairs from Pick-a-Pic-format parquet shards or a JSONL file (or, with
format="unpaired", single images with a desirable/undesirable label), decoded,
resized, cropped and batched outside the GIL. Order: a permutation per (seed,
epoch); rank r of world_size takes its entries r, r + world_size, ...
"""
from collections.abc import Iterator, Mapping, Sequence
from typing import TypedDict

import numpy as np
import numpy.typing as npt

__version__: str

class CorruptImageError(ValueError):
    """A corrupt or truncated image (raised in strict mode; otherwise the pair is skipped and counted)."""

class Batch(TypedDict, total=False):
    winners: npt.NDArray[np.uint8]  # (B, 3, R, R), pairs
    losers: npt.NDArray[np.uint8]  # (B, 3, R, R), pairs
    images: npt.NDArray[np.uint8]  # (B, 3, R, R), unpaired
    desirable: npt.NDArray[np.bool_]  # (B,), unpaired
    captions: list[str]  # "" where the empty-prompt draw dropped it
    original_sizes: npt.NDArray[np.int64]  # (B, 2) height, width of the winner
    crop_top_left: npt.NDArray[np.int64]  # (B, 2)
    indices: npt.NDArray[np.int64]  # (B,) pair ids
    image_hashes: npt.NDArray[np.uint64]  # (B, 2) xxh3-64 of the winner's and loser's bytes ((B, 1) unpaired)
    skipped: int  # pairs of this batch skipped as corrupt

class State(TypedDict):
    epoch: int
    sample_in_epoch: int
    seed: int
    world_size: int
    rank: int
    batch_size: int

class PairIter(Iterator[Batch]):
    """The rest of one epoch; after its last batch the loader stands at the next epoch's start."""

    def __iter__(self) -> PairIter: ...
    def __next__(self) -> Batch: ...
    def __len__(self) -> int: ...

class PairLoader:
    def __init__(
        self,
        sources: Sequence[str],
        resolution: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
        drop_ties: bool = True,
        absolute_winners: bool = False,
        columns: Mapping[str, str] | None = None,
        num_threads: int = 0,
        prefetch: int = 4,
        strict: bool = False,
        drop_last: bool = True,
        empty_prompt_prob: float = 0.0,
        shuffle: bool = True,
        row_group_cache_mb: int = 512,
        format: str = "pairs",  # or "unpaired": columns caption, image, label
    ) -> None: ...
    @property
    def format(self) -> str:
        """'pairs' or 'unpaired'."""
    def __len__(self) -> int:
        """Batches per epoch on this rank."""
    @property
    def num_pairs(self) -> int:
        """Pairs in the index (all ranks, after selection)."""
    def __iter__(self) -> PairIter: ...
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a no-op for the current epoch)."""
    def state(self) -> State: ...
    def resume(self, state: Mapping[str, int]) -> None:
        """Continue at `state`; another seed, world size or batch size is a ValueError."""
    def stats(self) -> dict[str, int | float | str | list[str]]:
        """format, files, rows, ties, dropped_ties, dropped_not_absolute, pairs (items), [desirable, undesirable
        (unpaired)], batches_yielded, pairs_yielded, skipped, skipped_records, num_threads, read_seconds,
        decode_seconds, row_group_* counters."""

def decode_image(data: bytes) -> npt.NDArray[np.uint8]:
    """Encoded bytes to uint8 (H, W, 3), like PIL's convert("RGB"); CorruptImageError or ValueError if refused."""

def resize_image(data: bytes, resolution: int) -> npt.NDArray[np.uint8]:
    """Decode and resize the shorter side to `resolution` (no crop): uint8 (h, w, 3)."""

def epoch_order(num_pairs: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = True) -> npt.NDArray[np.int64]:
    """This rank's pair ids of an epoch as PairLoader orders them: (num_batches, batch_size) with drop_last,
    else flat."""

def augment_draws(seed: int, epoch: int, indices: Sequence[int], random_flip: bool,
                  empty_prompt_prob: float) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(flip, empty_prompt) of each pair, as PairLoader draws them."""

def content_hash(data: bytes) -> int:
    """xxh3-64 of bytes: the image content hash of the latent cache's keys."""

def expand_sources(sources: Sequence[str]) -> list[str]:
    """The files PairLoader reads for `sources` (paths, ~, globs, folders), in order."""

def image_uid(data: bytes | None) -> str:
    """The uid of an image when the uid columns are missing: "xxh3:" and the 16 hex digits of its content
    hash (a null: of no bytes); `ncp.data.pairs.image_uid` gives the same."""

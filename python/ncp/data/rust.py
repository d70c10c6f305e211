"""The Rust loader (`ncp_dataloader.PairLoader`) as a source of `PairBatch`es (or `UnpairedBatch`es).

The Rust side reads, decodes, resizes, crops and flips the pairs on its own
threads with the GIL released; this adapter only wraps its numpy arrays as
torch tensors (zero-copy) and carries the position for resume.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ncp.data.batch import Batch, DataError, item_batch, pair_labels
from ncp.data.options import LoaderOptions
from ncp.data.expand import expand_sources
from ncp.data.contract import STATE_KEYS, DataState, check_resume


def _import_loader() -> Any:
    try:
        import ncp_dataloader
    except ImportError as e:  # the wheel is built by scripts/setup.sh
        raise ImportError(
            "ncp_dataloader (the Rust loader) is not installed; build it with "
            "`maturin build --release -m rust_dataloader/Cargo.toml -o wheels/` and pip-install the wheel, "
            "or use data.backend=torch"
        ) from e
    return ncp_dataloader


def pair_loader(**kwargs: Any) -> Any:
    """``ncp_dataloader.PairLoader(**kwargs)``; a missing column or a bad argument is a :class:`DataError`."""
    lib = _import_loader()
    try:
        return lib.PairLoader(**kwargs)
    except (KeyError, ValueError, OSError) as err:  # the loader's message names the file and column
        raise loader_error(err) from err


def loader_batches(loader: Any) -> Iterator[dict[str, Any]]:
    """The dict batches of a ``PairLoader``. What its threads meet is a :class:`DataError` with the loader's
    message (file, row, column): a corrupt image with ``strict``, a column of another type, a bad value, an
    unreadable shard. A panic (RuntimeError, a bug) is left as it is."""
    it = iter(loader)
    while True:
        try:
            d = next(it)
        except StopIteration:
            return
        except (KeyError, ValueError, OSError) as err:
            raise loader_error(err) from err
        yield d


def loader_error(err: Exception) -> DataError:
    """An error of the Rust loader as a DataError (a KeyError's message without its quotes)."""
    return DataError(str(err).strip("'\""))


ROLE_KEYS = {2: ("winners", "losers"), 1: ("images",)}  # a dict batch's images, by the images of an item


def role_images(d: Mapping[str, Any]) -> list[Any]:
    """The images of a dict batch of ``ncp_dataloader.PairLoader``, one (B, 3, H, W) array per role: winners
    and losers, or the unpaired images."""
    return [d[k] for k in ROLE_KEYS[1 if "desirable" in d else 2]]


def batch_from_dict(d: Mapping[str, Any]) -> Batch:
    """A `PairBatch` (or, for unpaired data, an `UnpairedBatch`) from one dict batch of
    `ncp_dataloader.PairLoader` (zero-copy views of its arrays)."""
    n = len(d["captions"])
    labels = torch.from_numpy(d["desirable"])[:, None] if "desirable" in d else pair_labels(n)
    return item_batch(labels, images=[torch.from_numpy(a) for a in role_images(d)], captions=list(d["captions"]),
                      original_sizes=torch.from_numpy(d["original_sizes"]),
                      crop_top_left=torch.from_numpy(d["crop_top_left"]), indices=torch.from_numpy(d["indices"]))


class RustPairSource:
    """Preference pairs from parquet shards (paths/globs/folders) or a JSONL file; with
    ``format="unpaired"``, single images with a desirable/undesirable label.

    Yields `PairBatch` (unpaired: `UnpairedBatch`) with uint8 pixels `(B, 3, resolution, resolution)`.
    Order: a permutation per (seed, epoch), rank `rank` of `world_size` takes every
    world_size-th pair; augmentation (crop, flip, empty-prompt dropout) is seeded
    by (seed, epoch, pair index), so the output does not depend on `num_threads`.
    Corrupt images are skipped (a batch can then be smaller) and listed in
    `stats()["skipped_records"]`; with `strict=True` they raise a
    :class:`ncp.data.batch.DataError` naming the file, row and column (as every error of the loader does).
    Up to `row_group_cache_mb` MB of whole row groups' images stay in memory, so a
    row group is not read and decoded again for each batch that draws from it
    (0: read only the selected rows, per batch).
    """

    def __init__(self, sources: Sequence[str] | str, resolution: int, batch_size: int, **options: Any) -> None:
        """Keyword arguments: the fields of :class:`ncp.data.options.LoaderOptions` (seed, rank, world_size,
        format, random_crop, random_flip, drop_ties, absolute_winners, columns, num_workers, strict,
        empty_prompt_prob, prefetch, drop_last, row_group_cache_mb)."""
        if "num_threads" in options:  # the loader's own name of num_workers
            options["num_workers"] = options.pop("num_threads")
        self._open(LoaderOptions(sources=sources, resolution=resolution, batch_size=batch_size, **options))

    @classmethod
    def from_options(cls, options: LoaderOptions) -> RustPairSource:
        self = cls.__new__(cls)
        self._open(options)
        return self

    def _open(self, options: LoaderOptions) -> None:
        self.options = options
        self.resolution, self.batch_size = options.resolution, options.batch_size
        self._loader = pair_loader(**options.pair_loader_kwargs(expand_sources(options.sources)))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._loader)

    @property
    def num_pairs(self) -> int:
        """Pairs (unpaired: images) in the index over all ranks, after ties and filters."""
        return self._loader.num_pairs

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (a no-op for the current one, so a resumed position survives)."""
        self._loader.set_epoch(epoch)

    def state(self) -> DataState:
        """{epoch, sample_in_epoch, seed, world_size, rank, batch_size}: where the next batch comes from."""
        return DataState(**self._loader.state())

    def resume(self, state: Mapping[str, int]) -> None:
        """Continue exactly at `state` (seed, world_size and batch_size must match)."""
        check_resume(state, self._loader.state())
        self._loader.resume({k: int(state[k]) for k in STATE_KEYS if k in state})

    def stats(self) -> dict[str, Any]:
        """Index counts (rows, ties, pairs) and iteration counts (yielded, skipped with file and row)."""
        return dict(self._loader.stats())

    def __iter__(self) -> Iterator[Batch]:
        for d in loader_batches(self._loader):
            yield batch_from_dict(d)

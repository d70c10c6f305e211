"""The loader options: built once from ``DataConfig`` and handed whole to a backend.

Every backend reads the fields it uses from this one frozen object; only the
PyO3 boundary (:meth:`LoaderOptions.pair_loader_kwargs`) unpacks it into
keyword arguments.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ncp.config import DataConfig


@dataclass(frozen=True)
class LoaderOptions:
    """What a loader backend needs; the fields of ``DataConfig`` plus the run's seed and rank."""

    sources: tuple[str, ...]
    resolution: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    backend: Literal["rust", "torch"] = "rust"
    format: Literal["pairs", "unpaired"] = "pairs"  # unpaired: (caption, image, label) rows
    cache_dir: str | None = None  # a latent cache: the backend whatever `backend` says
    random_crop: bool = False
    random_flip: bool = True
    drop_ties: bool = True
    absolute_winners: bool = False
    columns: Mapping[str, str] = field(default_factory=dict)
    num_workers: int = 0  # torch: DataLoader workers; rust: threads (0 = all cores)
    strict: bool = False
    empty_prompt_prob: float = 0.0
    prefetch: int = 4  # rust: batches in flight
    drop_last: bool = True
    row_group_cache_mb: int = 512  # rust: whole row groups kept decoded-ready in memory

    def __post_init__(self) -> None:
        if self.format not in ("pairs", "unpaired"):
            raise ValueError(f"format must be 'pairs' or 'unpaired'; got {self.format!r}")
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "columns", MappingProxyType(dict(self.columns or {})))

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1) -> LoaderOptions:
        return cls(sources=tuple(cfg.sources), resolution=cfg.resolution, batch_size=cfg.batch_size, seed=seed,
                   rank=rank, world_size=world_size, backend=cfg.backend, format=cfg.format,
                   cache_dir=cfg.cache_dir,
                   random_crop=cfg.random_crop, random_flip=cfg.random_flip, drop_ties=cfg.drop_ties,
                   absolute_winners=cfg.absolute_winners, columns=cfg.columns, num_workers=cfg.num_workers,
                   strict=cfg.strict, empty_prompt_prob=cfg.empty_prompt_prob)

    def with_(self, **changes: Any) -> LoaderOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def pair_loader_kwargs(self, sources: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments of ``ncp_dataloader.PairLoader`` (sources already expanded): the PyO3 boundary."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for python_only in ("sources", "backend", "cache_dir", "num_workers", "columns"):
            del kw[python_only]
        if kw["format"] == "pairs":  # the loader's default: a wheel older than unpaired data still loads pairs
            del kw["format"]
        return dict(sources=list(sources), columns=dict(self.columns) or None, num_threads=self.num_workers, **kw)

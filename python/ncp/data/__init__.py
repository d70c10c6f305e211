"""Preference-pair (and unpaired binary-feedback) data. An item is R images with R labels (``items``: a pair,
R = 2, or an unpaired image, R = 1), read from parquet or JSONL (``formats``); every backend (``rust``,
``torch_source``, ``cache``) keeps one source contract (``contract``) and yields the batches of ``batch``;
``sources`` builds the configured backend from the loader options (``options``) and source paths (``expand``)."""
from ncp.data.batch import Batch, DataError, PairBatch, UnpairedBatch
from ncp.data.contract import DataState, PairSource
from ncp.data.options import LoaderOptions
from ncp.data.expand import expand_sources
from ncp.data.sources import build_source

__all__ = ["Batch", "DataError", "DataState", "LoaderOptions", "PairBatch", "PairSource", "UnpairedBatch",
           "build_source", "expand_sources"]

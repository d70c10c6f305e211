"""Preference-pair (and unpaired binary-feedback) data: one source contract (``sources``), its backends (``rust``, ``torch_source``,
``cache``), the loader options (``options``), source paths (``paths``) and pair selection (``pairs``)."""
from ncp.data.batch import Batch, DataError, PairBatch, UnpairedBatch
from ncp.data.options import LoaderOptions
from ncp.data.paths import expand_sources
from ncp.data.sources import DataState, PairSource, build_source

__all__ = ["Batch", "DataError", "DataState", "LoaderOptions", "PairBatch", "PairSource", "UnpairedBatch", "build_source",
           "expand_sources"]

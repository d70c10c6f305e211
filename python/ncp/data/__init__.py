"""Preference-pair data: one source contract (``sources``), its backends (``rust``, ``torch_source``,
``cache``), the loader options (``options``), source paths (``paths``) and pair selection (``pairs``)."""
from ncp.data.batch import DataError, PairBatch
from ncp.data.options import LoaderOptions
from ncp.data.paths import expand_sources
from ncp.data.sources import DataState, PairSource, build_source

__all__ = ["DataError", "DataState", "LoaderOptions", "PairBatch", "PairSource", "build_source", "expand_sources"]

"""Preference-pair data: pair selection, the PyTorch baseline dataset, the Rust loader adapter."""
from ncp.data.batch import PairBatch

__all__ = ["PairBatch"]

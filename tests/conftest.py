"""Shared test fixtures and the `cuda` marker (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny SD1.5-shaped pipeline folder (built once per session)."""
    from fixtures import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from fixtures import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_parquet(tmp_path_factory):
    """12 rows of 40x48 JPEG pairs, the first a tie, in the Pick-a-Pic v2 schema."""
    from fixtures import random_pairs, write_pickapic_parquet

    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train-00000.parquet", random_pairs(12))

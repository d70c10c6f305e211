"""Where the files shipped with ncp live: a leaf module (no torch, no models, no world)."""
from __future__ import annotations

from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"


def bundle_path(*parts: str) -> Path:
    """A path inside the shipped bundle (``ncp/bundle``), built by ``python -m ncp.world build``."""
    return BUNDLE_DIR.joinpath(*parts)

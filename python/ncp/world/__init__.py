"""The bundled text-to-image world: scenes, tokenizer, tiny SD pipeline, judge, preference data, report.

Build it with ``python -m ncp.world build``; the built copy ships in ``ncp/bundle``.
"""
from __future__ import annotations

from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent.parent / "bundle"


def bundle_path(*parts: str) -> Path:
    """A path inside the shipped bundle (``ncp/bundle``)."""
    return BUNDLE_DIR.joinpath(*parts)

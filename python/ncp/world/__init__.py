"""The bundled text-to-image world: scenes, tokenizer, tiny SD pipeline, judge, preference data, report.

Build it with ``python -m ncp.world build``; the built copy ships in ``ncp/bundle``.
"""
from __future__ import annotations

from ncp.paths import BUNDLE_DIR, bundle_path

__all__ = ["BUNDLE_DIR", "bundle_path"]

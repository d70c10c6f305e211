"""What builds the bundled text-to-image world: tokenizer, tiny SD pipeline, pretraining, preference data.

Build it with ``python -m ncp.world build``; the built copy ships in ``ncp/bundle``.
The scenes it draws and the judge that ranks them are in ``ncp.scoring``
(evaluation and the report score with them too); sampling is ``ncp.sampling``,
the after-training report ``ncp.report``. Nothing outside this package imports it.
"""
from __future__ import annotations

from ncp.paths import BUNDLE_DIR, bundle_path

__all__ = ["BUNDLE_DIR", "bundle_path"]

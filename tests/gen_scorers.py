"""Scorers for the ``fn:module:function`` tests of ncp.generate (imported by name, in its scoring process)."""
from __future__ import annotations

import os
import time

import numpy as np


def brightness(images, prompts):
    """Mean pixel value in [0, 1]: a deterministic score a test can recompute from the decoded image."""
    return [float(np.asarray(im, dtype=np.float64).mean() / 255.0) for im in images]


def redness(images, prompts):
    return [float(np.asarray(im, dtype=np.float64)[..., 0].mean() / 255.0) for im in images]


def slow_brightness(images, prompts):
    """brightness, after NCP_TEST_SCORER_SLEEP seconds a batch (a run slow enough to be killed mid-way)."""
    time.sleep(float(os.environ.get("NCP_TEST_SCORER_SLEEP", "0")))
    return brightness(images, prompts)


def too_few(images, prompts):
    return [0.0] * (len(images) - 1)


def not_finite(images, prompts):
    return [float("nan")] + [0.0] * (len(images) - 1)


not_callable = 3

"""Scorers: one number per (image, prompt), shared by evaluation, validation and the report.

- ``judge`` (:class:`ncp.scoring.judge.JudgeScorer`): the bundled programmatic
  judge, from pixels, for prompts of the scene grammar (``ncp.scoring.scenes``);
- ``pickscore:DIR`` / ``hps:DIR`` (:class:`ncp.scoring.clip.CLIPScorer`):
  preference scores of a local CLIP model folder.

``make_scorers("judge,pickscore:DIR")`` builds them from a comma list.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ncp.scoring.clip import CLIPScorer
from ncp.scoring.judge import JudgeScorer

__all__ = ["CLIPScorer", "JudgeScorer", "Scorer", "make_scorers"]


class Scorer(Protocol):
    name: str

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray: ...


def make_scorers(spec: str) -> list[Scorer]:
    """Parse ``judge,pickscore:DIR,hps:DIR``."""
    scorers: list[Scorer] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, path = item.partition(":")
        if kind == "judge":
            scorers.append(JudgeScorer())
        elif kind in ("pickscore", "hps"):
            if not path:
                raise ValueError(f"scorer {kind!r} needs a model folder: {kind}:DIR")
            scorers.append(CLIPScorer(path, kind))
        else:
            raise ValueError(f"unknown scorer {kind!r} (known: judge, pickscore:DIR, hps:DIR)")
    if not scorers:
        raise ValueError("no scorer given")
    return scorers

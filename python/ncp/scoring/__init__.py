"""Scorers: one number per (image, prompt), shared by evaluation, validation, the report and ``ncp.generate``.

- ``judge`` (:class:`ncp.scoring.judge.JudgeScorer`): the bundled programmatic judge, from pixels, for
  prompts of the scene grammar (``ncp.scoring.scenes``); ``judge.alignment`` and ``judge.quality`` are
  its two parts alone (a reward-hacking check reports them apart);
- ``pickscore:DIR`` / ``hps:DIR`` (:class:`ncp.scoring.clip.CLIPScorer`): preference scores of a local
  CLIP model folder (``CLIPModel`` + ``CLIPProcessor``, as PickScore ships; HPSv2's open_clip checkpoint
  must be converted to that layout first);
- ``fn:package.module:function``: a user's function ``f(images, prompts) -> scores`` (a list of uint8
  ``(H, W, 3)`` arrays and a list of strings in, one finite number per image out). Wrap any other reward
  model this way (ImageReward, ``imscore``'s models, a VLM judge, a product metric): ncp never downloads,
  and ImageReward's loader fetches its BLIP tokenizer from the Hub, so it cannot be a built-in kind.

A spec is a comma list; ``@w`` after an item weighs it (default 1): ``make_scorers("judge,pickscore:DIR")``
gives the scorers one by one (evaluation reports each), :func:`make_reward` their weighted sum, keeping
each part's scores (``ncp.generate`` writes them as columns), and :func:`check_reward` checks a spec as
``make_reward`` does, without loading a model.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ncp.scoring.clip import CLIPScorer
from ncp.scoring.judge import JudgeScorer

__all__ = ["CLIPScorer", "FunctionScorer", "JudgeScorer", "Reward", "Scorer", "check_reward", "checked_scores",
           "make_reward", "make_scorers", "parse_spec", "resolve_function"]

KINDS = "judge, judge.alignment, judge.quality, pickscore:DIR, hps:DIR, fn:module:function"


class Scorer(Protocol):
    name: str

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray: ...


def checked_scores(name: str, scores, n: int) -> np.ndarray:
    """``scores`` as a float64 vector of ``n`` finite numbers, or a ValueError naming the scorer and the image."""
    try:
        out = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"scorer {name!r} returned {type(scores).__name__}, not numbers: {err}") from err
    if out.shape != (n,):
        raise ValueError(f"scorer {name!r} returned {out.size} scores for {n} images")
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ValueError(f"scorer {name!r} returned a non-finite score ({out[bad[0]]}) for image {int(bad[0])} "
                         f"of the batch ({bad.size} in all)")
    return out


def resolve_function(target: str) -> Callable:
    """The function of ``fn:module:function``, imported, or a ValueError saying what is wrong with ``target``."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"scorer fn:{target}: expected fn:package.module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ValueError(f"scorer fn:{target}: cannot import {module!r} ({err})") from err
    except AttributeError as err:
        raise ValueError(f"scorer fn:{target}: module {module!r} has no {attr!r}") from err
    if not callable(fn):
        raise ValueError(f"scorer fn:{target}: {attr!r} is not callable")
    return fn


class FunctionScorer:
    """A user's ``module:function`` taking (images, prompts) and returning one score per image."""

    def __init__(self, target: str):
        self.fn: Callable = resolve_function(target)
        self.name = f"fn:{target}"

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        return checked_scores(self.name, self.fn(images, prompts), len(images))


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"judge@0.7,pickscore:DIR@0.3"`` -> ``[("judge", 0.7), ("pickscore:DIR", 0.3)]``. A trailing ``@x`` is a
    weight only when ``x`` is a number, so a folder whose name holds '@' stays whole."""
    items = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        body, w = item, 1.0
        head, at, weight = item.rpartition("@")
        if at:
            try:
                body, w = head, float(weight)
            except ValueError:
                pass
        if not math.isfinite(w):
            raise ValueError(f"scorer {item!r}: the weight must be a finite number")
        items.append((body, w))
    if not items:
        raise ValueError(f"no scorer given (known: {KINDS})")
    return items


def _prepare(item: str) -> Callable[[], Scorer]:
    """The constructor of one item's scorer, after the checks that need no model: its kind, its judge part, its
    model folder, its function (imported). A bad item fails here, before anything is loaded."""
    kind, _, arg = item.partition(":")
    if kind == "judge" or kind.startswith("judge."):
        part = JudgeScorer.check_part(kind.split(".", 1)[1] if "." in kind else "score")
        return lambda: JudgeScorer(part)
    if kind in ("pickscore", "hps"):
        if not arg:
            raise ValueError(f"scorer {kind!r} needs a model folder: {kind}:DIR")
        if not Path(arg).is_dir():
            raise ValueError(f"scorer {item}: no such folder {arg}")
        if not (Path(arg) / "config.json").is_file():
            raise ValueError(f"scorer {item}: no config.json in {arg} (a saved CLIPModel + CLIPProcessor folder)")
        return lambda: CLIPScorer(arg, kind)
    if kind == "fn":
        resolve_function(arg)
        return lambda: FunctionScorer(arg)
    raise ValueError(f"unknown scorer {kind!r} (known: {KINDS})")


def make_scorers(spec: str) -> list[Scorer]:
    """The scorers of a comma list, one by one (weights, if given, are ignored here: see :func:`make_reward`)."""
    return [_prepare(item)() for item, _ in parse_spec(spec)]


def _reward_items(spec: str) -> list[tuple[Callable[[], Scorer], float]]:
    """(constructor, weight) of each scorer of a reward spec, every item checked (see :func:`_prepare`)."""
    items = parse_spec(spec)
    names = [item for item, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"scorer {dup[0]!r} is named twice in {spec!r}")
    return [(_prepare(item), w) for item, w in items]


def check_reward(spec: str) -> None:
    """Raise the ValueError :func:`make_reward` would raise for a bad ``spec``, without constructing a scorer:
    ``ncp.generate`` checks its spec before sampling, but loads the scorers (a CLIP model, a user's model) in its
    scoring process only, so they are never loaded twice nor held by the sampling process."""
    _reward_items(spec)


@dataclass
class Reward:
    """The weighted sum of several scorers; :meth:`parts` gives each one's scores as well."""

    scorers: list[Scorer]
    weights: list[float]

    @property
    def name(self) -> str:
        if len(self.scorers) == 1 and self.weights[0] == 1.0:
            return self.scorers[0].name
        return "+".join(f"{w:g}*{s.name}" for s, w in zip(self.scorers, self.weights))

    def parts(self, images: list[np.ndarray], prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the weighted sum, {scorer name: its scores}) of every image."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        parts = {s.name: checked_scores(s.name, s(images, prompts), len(images)) for s in self.scorers}
        total = np.zeros(len(images))
        for s, w in zip(self.scorers, self.weights):
            total += w * parts[s.name]
        return total, parts

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        return self.parts(images, prompts)[0]


def make_reward(spec: str) -> Reward:
    """The weighted sum of the scorers of ``spec`` (``judge@0.7,pickscore:DIR@0.3``)."""
    items = _reward_items(spec)
    return Reward([make() for make, _ in items], [w for _, w in items])

"""Preference data from scored samples: pairs (Pick-a-Pic v2 rows) or unpaired labels (KTO), per prompt.

``ncp.generate`` draws N images per prompt and scores them; this module turns each prompt's N scores into
training data that the loaders read unchanged:

- pairs, by a :class:`PairRule`: ``best-worst`` (the best of the N against the worst), ``margin:M`` (every
  pair whose score margin exceeds M), ``top-bottom:K`` (each of the K best against each of the K worst);
  a pair whose margin is at most ``tie_margin`` is a tie and is dropped (a scorer's noise is no preference);
- unpaired images, by an :class:`UnpairedRule`: ``quantile:Q`` (the top Q of all images desirable, the
  bottom Q undesirable, the middle dropped) or ``threshold:LO:HI`` (score >= HI desirable, < LO
  undesirable; ``threshold:T`` is LO = HI = T).

Pairs are written as Pick-a-Pic v2 parquet (JPEG bytes, caption, float64 labels, image uids, ...) with the
scores, the model and the seeds as extra columns; unpaired images as ``caption, image, label`` parquet
(``data.format=unpaired``). Files are written beside their final name and renamed into place.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PICKAPIC_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("image_0_uid", pa.string()), ("image_1_uid", pa.string()), ("best_image_uid", pa.string()),
    ("are_different", pa.bool_()), ("has_label", pa.bool_()), ("model_0", pa.string()), ("model_1", pa.string()),
    ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
# what generated pairs add to Pick-a-Pic's columns
GENERATED_PAIR_COLUMNS = [("score_0", pa.float64()), ("score_1", pa.float64()), ("margin", pa.float64()),
                          ("scores_0", pa.string()), ("scores_1", pa.string()),
                          ("seed_0", pa.int64()), ("seed_1", pa.int64())]
GENERATED_PAIR_SCHEMA = pa.schema(list(PICKAPIC_SCHEMA) + [pa.field(n, t) for n, t in GENERATED_PAIR_COLUMNS])
UNPAIRED_SCHEMA = pa.schema([("caption", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                             ("image_uid", pa.string()), ("score", pa.float64()), ("scores", pa.string()),
                             ("seed", pa.int64()), ("model", pa.string())])


def jpeg_bytes(image: np.ndarray, quality: int = 95, subsampling: str = "4:4:4") -> bytes:
    """JPEG of a uint8 (H, W, 3) image; 4:4:4 keeps the colours of small shapes (ncp.world.prefdata)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int = 256) -> None:
    """``table`` at ``path``, written beside it, synced and renamed into place: a kill leaves the old file or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class PairRule:
    kind: str  # "best-worst" | "margin" | "top-bottom"
    value: float = 0.0  # margin:M's M, top-bottom:K's K
    tie_margin: float = 0.0

    @classmethod
    def parse(cls, text: str, tie_margin: float = 0.0) -> "PairRule":
        kind, _, arg = text.strip().partition(":")
        if tie_margin < 0 or not math.isfinite(tie_margin):
            raise ValueError(f"tie margin {tie_margin}: must be a finite number >= 0")
        if kind == "best-worst" and not arg:
            return cls(kind, 0.0, tie_margin)
        if kind in ("margin", "top-bottom") and arg:
            try:
                value = float(arg)
            except ValueError:
                value = math.nan
            if kind == "margin" and math.isfinite(value) and value >= 0:
                return cls(kind, value, tie_margin)
            if kind == "top-bottom" and value >= 1 and value == int(value):
                return cls(kind, int(value), tie_margin)
        raise ValueError(f"pair rule {text!r}: expected best-worst, margin:M (M >= 0) or top-bottom:K (K >= 1)")

    def __str__(self) -> str:
        return self.kind if self.kind == "best-worst" else f"{self.kind}:{self.value:g}"


def select_pairs(scores: Sequence[float], rule: PairRule) -> list[tuple[int, int, float]]:
    """(winner, loser, margin) index pairs of one prompt's images; ties (margin <= tie_margin) dropped.
    Equal scores keep the order of the images (a stable sort), so the result never depends on chance."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")  # best first
    n = len(s)
    if n < 2:
        return []
    if rule.kind == "best-worst":
        cand = [(int(order[0]), int(order[-1]))]
    elif rule.kind == "top-bottom":
        k = min(int(rule.value), n // 2)
        cand = [(int(w), int(l)) for w in order[:k] for l in order[n - k:][::-1]]
    else:
        cand = [(int(order[a]), int(order[b])) for a in range(n) for b in range(a + 1, n)
                if s[order[a]] - s[order[b]] > rule.value]
    return [(w, l, float(s[w] - s[l])) for w, l in cand if s[w] - s[l] > rule.tie_margin]


@dataclass(frozen=True)
class UnpairedRule:
    kind: str  # "quantile" | "threshold"
    low: float
    high: float

    @classmethod
    def parse(cls, text: str) -> "UnpairedRule":
        kind, _, arg = text.strip().partition(":")
        try:
            vals = [float(v) for v in arg.split(":")] if arg else []
        except ValueError:
            vals = []
        if kind == "quantile" and len(vals) == 1 and 0 < vals[0] <= 0.5:
            return cls(kind, vals[0], vals[0])
        if kind == "threshold" and len(vals) in (1, 2) and all(map(math.isfinite, vals)) and vals[0] <= vals[-1]:
            return cls(kind, vals[0], vals[-1])
        raise ValueError(f"unpaired rule {text!r}: expected quantile:Q (0 < Q <= 0.5) or threshold:T or "
                         f"threshold:LO:HI (LO <= HI)")

    def __str__(self) -> str:
        return f"quantile:{self.low:g}" if self.kind == "quantile" else f"threshold:{self.low:g}:{self.high:g}"


def select_unpaired(scores: Sequence[float], rule: UnpairedRule) -> np.ndarray:
    """1 (desirable), 0 (undesirable) or -1 (dropped) for every image. ``quantile:Q``: the top Q of the scores
    desirable and the bottom Q undesirable (by rank: ties at a cut keep the images' order)."""
    s = np.asarray(scores, dtype=np.float64)
    labels = np.full(len(s), -1, dtype=np.int64)
    if rule.kind == "threshold":
        labels[s >= rule.high] = 1
        labels[s < rule.low] = 0
        return labels
    k = int(math.floor(rule.low * len(s)))
    order = np.argsort(-s, kind="stable")
    if k:
        labels[order[:k]] = 1
        labels[order[-k:]] = 0
    return labels


# ---------------------------------------------------------------- rows


@dataclass
class Sample:
    """One generated image and what made it."""

    prompt: str
    seed: int
    uid: str
    jpg: bytes
    score: float
    scores: dict[str, float]
    model: str


def pair_rows(prompt_samples: list[list[Sample]], rule: PairRule, placement_seed: int) -> tuple[list[dict], list[float]]:
    """Pick-a-Pic v2 rows (the generated columns too) of every prompt's pairs, and the kept pairs' margins.
    Winner and loser are placed left or right at random (seeded), as Pick-a-Pic's annotators saw them."""
    rng = random.Random(placement_seed)
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows: list[dict] = []
    margins: list[float] = []
    for samples in prompt_samples:
        for w, l, margin in select_pairs([x.score for x in samples], rule):
            a, b = (samples[w], samples[l]) if rng.random() < 0.5 else (samples[l], samples[w])
            rows.append({
                "caption": a.prompt, "jpg_0": a.jpg, "jpg_1": b.jpg,
                "label_0": 1.0 if a is samples[w] else 0.0, "label_1": 1.0 if b is samples[w] else 0.0,
                "image_0_uid": a.uid, "image_1_uid": b.uid, "best_image_uid": samples[w].uid,
                "are_different": True, "has_label": True, "model_0": a.model, "model_1": b.model,
                "ranking_id": len(rows), "user_id": 0, "num_example_per_prompt": len(samples),
                "created_at": created, "score_0": a.score, "score_1": b.score, "margin": margin,
                "scores_0": json.dumps(a.scores), "scores_1": json.dumps(b.scores),
                "seed_0": a.seed, "seed_1": b.seed,
            })
            margins.append(margin)
    return rows, margins


def unpaired_rows(samples: list[Sample], labels: np.ndarray) -> list[dict]:
    return [{"caption": x.prompt, "image": x.jpg, "label": int(lab), "image_uid": x.uid, "score": x.score,
             "scores": json.dumps(x.scores), "seed": x.seed, "model": x.model}
            for x, lab in zip(samples, labels) if lab >= 0]


def margin_histogram(margins: Sequence[float], bins: int = 10) -> dict:
    """Counts of the kept pairs' margins in ``bins`` equal bins from 0 to the largest margin."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(m, bins=bins, range=(0.0, float(m.max()) or 1.0))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def format_histogram(hist: dict, width: int = 40) -> str:
    if not hist["counts"]:
        return "  (no pairs)"
    top = max(hist["counts"]) or 1
    e = hist["edges"]
    return "\n".join(f"  {e[i]:8.4f} - {e[i + 1]:8.4f} {c:7d} {'#' * round(width * c / top)}"
                     for i, c in enumerate(hist["counts"]))

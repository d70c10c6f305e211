"""Preference data from the base model, made as Pick-a-Pic v2 was.

For every training prompt the base pipeline draws several samples; simulated
annotators compare pairs of them. An annotator sees the judge's scores through
Bradley-Terry noise (``p(a wins) = sigmoid((s_a - s_b) / temperature)``) and
calls a tie when the two scores are closer than ``tie_margin``. Some pairs are
shown to a second annotator, whose call may contradict the first: the
"absolute winners" filter (docs/internals.md) then has something to remove.
Rows follow the Pick-a-Pic v2 schema (JPEG bytes, float64 labels, 0.5/0.5 ties,
uids, best_image_uid that matches neither image on a tie).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ncp.data.pairing import PICKAPIC_SCHEMA, jpeg_bytes


@dataclass
class AnnotatorConfig:
    temperature: float = 0.04
    tie_margin: float = 0.01
    second_opinion: float = 0.3  # share of pairs shown to a second annotator
    n_annotators: int = 50
    jpeg_quality: int = 95
    # 4:4:4, not Pillow's default 4:2:0: at 32 px, chroma subsampling smears the
    # colours of 2-3 px shapes, costing 0.02 judge reward per image (measured on
    # 96 base samples: raw 0.669, q95 4:2:0 0.647, q95 4:4:4 0.668), and every
    # objective then learns the smear from its training images.
    jpeg_subsampling: str = "4:4:4"


def _label(rng: random.Random, s0: float, s1: float, cfg: AnnotatorConfig) -> tuple[float, float]:
    if abs(s0 - s1) < cfg.tie_margin:
        return 0.5, 0.5
    p0 = 1.0 / (1.0 + math.exp(-(s0 - s1) / cfg.temperature))
    return (1.0, 0.0) if rng.random() < p0 else (0.0, 1.0)


def make_rows(captions: list[str], images: list[list[np.ndarray]], scores: list[list[float]],
              seed: int, cfg: AnnotatorConfig, model_name: str = "ncp-world-base") -> list[dict]:
    """Pick-a-Pic v2 rows: every pair of a prompt's samples, some annotated twice."""
    rng = random.Random(seed)
    created = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows: list[dict] = []
    for pi, (cap, imgs, sc) in enumerate(zip(captions, images, scores)):
        uids = [f"w{seed}-p{pi:05d}-s{k}" for k in range(len(imgs))]
        jpgs = [jpeg_bytes(im, cfg.jpeg_quality, cfg.jpeg_subsampling) for im in imgs]
        for a, b in itertools.combinations(range(len(imgs)), 2):
            for _ in range(2 if rng.random() < cfg.second_opinion else 1):
                i, j = (a, b) if rng.random() < 0.5 else (b, a)  # random left/right placement
                l0, l1 = _label(rng, sc[i], sc[j], cfg)
                best = uids[i] if l0 > l1 else uids[j] if l1 > l0 else ""
                rows.append({
                    "caption": cap, "jpg_0": jpgs[i], "jpg_1": jpgs[j], "label_0": l0, "label_1": l1,
                    "image_0_uid": uids[i], "image_1_uid": uids[j], "best_image_uid": best,
                    "are_different": True, "has_label": True, "model_0": model_name, "model_1": model_name,
                    "ranking_id": len(rows), "user_id": rng.randrange(cfg.n_annotators),
                    "num_example_per_prompt": len(imgs), "created_at": created,
                })
    return rows


SCHEMA = PICKAPIC_SCHEMA


def write_parquet(rows: list[dict], path: str, row_group_size: int = 256) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def pair_stats(rows: list[dict]) -> dict[str, int]:
    """Ties, contradictions and the size of the absolute-winners subset (docs/internals.md rule)."""
    ties = sum(r["label_0"] == r["label_1"] for r in rows)
    calls: dict[frozenset, set] = {}
    wins: dict[tuple, int] = {}
    bad: set[tuple] = set()
    for r in rows:
        a, b = (r["caption"], r["image_0_uid"]), (r["caption"], r["image_1_uid"])
        if r["label_0"] == r["label_1"]:
            bad |= {a, b}
            continue
        w, l = (a, b) if r["label_0"] > r["label_1"] else (b, a)
        wins[w] = wins.get(w, 0) + 1
        bad.add(l)
        calls.setdefault(frozenset((a, b)), set()).add(w)
    contradictory = sum(len(v) > 1 for v in calls.values())
    kept = 0
    for r in rows:
        if r["label_0"] == r["label_1"]:
            continue
        w = (r["caption"], r["image_0_uid"] if r["label_0"] > r["label_1"] else r["image_1_uid"])
        kept += w not in bad and wins.get(w, 0) >= 2
    return {"rows": len(rows), "ties": ties, "contradictory_pairs": contradictory, "absolute_winner_rows": kept}

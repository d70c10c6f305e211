"""The bundled programmatic "human" judge: prompt alignment and visual quality, from pixels.

The judge never sees how an image was made. It reads the prompt with
``parse_caption``, classifies every pixel to the nearest palette colour,
finds the connected components of each object colour, recognises each
component's shape from its silhouette (width profile and box corners), its size
from its extent and its position from its centroid, and checks what the prompt
asks for. Visual quality is measured from the same pixels: the share of clean
palette-coloured pixels, the flatness of the background and the number of
specks. ``score = 0.7 * alignment + 0.3 * quality``, in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ncp.scoring.scenes import BACKGROUNDS, COLORS, SIZES, Prompt, parse_caption

_NAMES = list(BACKGROUNDS) + list(COLORS)
_PALETTE = np.array([BACKGROUNDS[n] for n in BACKGROUNDS] + [COLORS[n] for n in COLORS], dtype=np.float32)
_N_BG = len(BACKGROUNDS)
W_ALIGN, W_QUALITY = 0.7, 0.3


@dataclass
class Component:
    color: str
    area: int
    cx: float  # bounding-box centre, in pixels
    cy: float
    extent: int
    shape: str


@dataclass
class Judgement:
    score: float
    alignment: float  # nan for prompts outside the grammar
    quality: float
    correct: bool  # every check of the prompt passed
    checks: dict[str, float]


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)[..., :3]


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask by min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, lab):
            break
        lab = nb
    ids = np.unique(lab[mask])
    out = np.zeros((h, w), dtype=np.int32)
    for k, i in enumerate(ids, start=1):
        out[lab == i] = k
    return out, len(ids)


def _shape_of(mask: np.ndarray) -> str:
    """Upright triangle, square or circle, from the component's bounding-box crop.

    Triangles are narrow at the top and wide at the bottom; squares fill their
    box and its corners, circles leave the corners empty. The thresholds were
    fitted on VAE reconstructions of rendered scenes (94% of components right),
    so the cues survive the blur of a generated 32 px image.
    """
    h, w = mask.shape
    widths = mask.sum(axis=1).astype(np.float32)
    k = max(1, h // 3)
    if widths[:k].mean() < 0.65 * max(widths[-k:].mean(), 1e-6):
        return "triangle"
    c = max(1, round(min(h, w) / 5))
    corners = np.concatenate([mask[:c, :c].ravel(), mask[:c, -c:].ravel(), mask[-c:, :c].ravel(), mask[-c:, -c:].ravel()])
    return "square" if mask.mean() + 0.25 * corners.mean() > 0.92 else "circle"


def analyse(image, min_area: int | None = None) -> tuple[list[Component], dict[str, float], str]:
    """Object components, quality terms and the detected background colour of an image."""
    px = _as_array(image)
    res = px.shape[0]
    min_area = min_area or max(3, round(4 * (res / 32) ** 2))
    dist = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, P)
    cls, dmin = dist.argmin(-1), dist.min(-1)
    bg_counts = np.bincount(cls[cls < _N_BG].ravel(), minlength=_N_BG)
    bg = int(bg_counts.argmax())
    bg_mask = cls == bg
    comps, specks = [], 0
    for k in range(_N_BG, len(_NAMES)):
        mask = (cls == k) & (dmin < 80)
        if not mask.any():
            continue
        lab, n = _label(mask)
        for i in range(1, n + 1):
            m = lab == i
            area = int(m.sum())
            if area < min_area:
                specks += 1
                continue
            ys, xs = np.nonzero(m)
            crop = m[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
            comps.append(Component(_NAMES[k], area, (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2,
                                   int(max(crop.shape)), _shape_of(crop)))
    clean = float((dmin < 40).mean())
    bg_dev = float(dmin[bg_mask].mean()) if bg_mask.any() else 255.0
    quality = {"clean": clean, "flat_background": float(np.exp(-bg_dev / 15)), "no_specks": float(np.exp(-specks / 2))}
    return comps, quality, _NAMES[bg]


def _size_of(c: Component, res: int) -> str:
    return "small" if c.extent <= (SIZES["small"] + SIZES["big"]) / 2 * res / 32 else "big"


def _position_ok(c: Component, position: str, res: int) -> bool:
    h = res / 2
    return {"on the left": c.cx < h, "on the right": c.cx > h, "at the top": c.cy < h, "at the bottom": c.cy > h}[position]


def _relation_ok(a: Component, b: Component, relation: str) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b
    if relation in ("left of", "right of"):
        return (dx if relation == "left of" else -dx) > 0 and abs(dx) > abs(dy)
    return (dy if relation == "above" else -dy) > 0 and abs(dy) > abs(dx)


def _largest(comps: list[Component], color: str) -> Component | None:
    mine = [c for c in comps if c.color == color]
    return max(mine, key=lambda c: c.area) if mine else None


def alignment_checks(p: Prompt, comps: list[Component], bg: str, res: int) -> dict[str, tuple[float, float]]:
    """{check: (weight, value in [0, 1])} for what the prompt asks."""
    checks: dict[str, tuple[float, float]] = {}
    if p.kind == "single":
        c = _largest(comps, p.color)
        checks["present"] = (3.0, float(c is not None))
        checks["shape"] = (2.0, float(c is not None and c.shape == p.shape))
        checks["alone"] = (1.0, float(len(comps) == 1))
        if p.size:
            checks["size"] = (1.0, float(c is not None and _size_of(c, res) == p.size))
        if p.position:
            checks["position"] = (2.0, float(c is not None and _position_ok(c, p.position, res)))
    elif p.kind == "count":
        mine = [c for c in comps if c.color == p.color]
        checks["count"] = (4.0, max(0.0, 1.0 - abs(len(mine) - p.count) / p.count))
        checks["shape"] = (2.0, sum(c.shape == p.shape for c in mine) / max(len(mine), p.count))
        checks["no_others"] = (1.0, float(len(mine) == len(comps)))
    else:
        a, b = _largest(comps, p.color), _largest(comps, p.color2)
        checks["first_present"] = (2.0, float(a is not None))
        checks["second_present"] = (2.0, float(b is not None))
        checks["first_shape"] = (1.0, float(a is not None and a.shape == p.shape))
        checks["second_shape"] = (1.0, float(b is not None and b.shape == p.shape2))
        checks["relation"] = (3.0, float(a is not None and b is not None and _relation_ok(a, b, p.relation)))
    if p.background:
        checks["background"] = (1.0, float(bg == p.background))
    return checks


def judge(image, prompt: str | Prompt) -> Judgement:
    """Score one image (uint8 HxWx3 array or PIL image) for one prompt."""
    px = _as_array(image)
    comps, qual, bg = analyse(px)
    quality = 0.5 * qual["clean"] + 0.3 * qual["flat_background"] + 0.2 * qual["no_specks"]
    p = parse_caption(prompt) if isinstance(prompt, str) else prompt
    if p is None:
        return Judgement(quality, float("nan"), quality, False, dict(qual))
    checks = alignment_checks(p, comps, bg, px.shape[0])
    total = sum(w for w, _ in checks.values())
    alignment = sum(w * v for w, v in checks.values()) / total
    details = {k: v for k, (_, v) in checks.items()} | qual
    score = W_ALIGN * alignment + W_QUALITY * quality
    return Judgement(score, alignment, quality, all(v >= 1.0 for _, v in checks.values()), details)


def judge_many(images, prompts) -> list[Judgement]:
    return [judge(im, p) for im, p in zip(images, prompts)]


class JudgeScorer:
    """The judge as a :class:`ncp.scoring.Scorer`: ``judge(image, prompt).score`` of every image, or one of its
    parts (``part="alignment"`` or ``"quality"``: a reward-hacking check reports them apart)."""

    PARTS = ("score", "alignment", "quality")

    @classmethod
    def check_part(cls, part: str) -> str:
        """``part``, or a ValueError naming the known parts."""
        if part not in cls.PARTS:
            raise ValueError(f"judge part {part!r}: known parts are {', '.join(cls.PARTS)}")
        return part

    def __init__(self, part: str = "score"):
        self.part = self.check_part(part)
        self.name = "judge" if part == "score" else f"judge.{part}"

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        pairs = list(zip(images, prompts))
        return np.array([getattr(judge(im, p), self.part) for im, p in tqdm(pairs, desc=self.name, leave=False)],
                        dtype=np.float64)

"""Procedural scenes of the bundled world: sampling, captions, parsing, rendering.

A scene is a background colour and one to three flat shapes. Three caption
kinds describe it: a single object ("a big red circle on the left"), a count
("three blue squares") and a relation ("a red circle left of a green
triangle"); any of them may add "on a <colour> background". Captions are made
from a small grammar, and ``parse_caption`` inverts it, so the judge can read
any prompt of the grammar from its text alone.

It lives beside the judge (``ncp.scoring.judge``), which reads its grammar;
the world build (``ncp.world``) samples and renders its training scenes from
it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 175, 65),
    "blue": (45, 85, 230),
    "yellow": (235, 210, 40),
    "purple": (155, 65, 205),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 25),
    "white": (235, 235, 235),
    "gray": (125, 125, 125),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "big": 14}  # extent in pixels at 32 px; scaled with the resolution
RELATIONS = ("left of", "right of", "above", "below")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
NUMBERS = {"two": 2, "three": 3}
KINDS = ("single", "count", "relation")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cx: float  # centre, in pixels
    cy: float


@dataclass
class Prompt:
    """What a caption asks for (the parse of a caption)."""

    kind: str
    color: str
    shape: str
    size: str | None = None  # single
    position: str | None = None  # single
    count: int | None = None  # count
    relation: str | None = None  # relation
    color2: str | None = None  # relation
    shape2: str | None = None  # relation
    background: str | None = None

    def caption(self) -> str:
        if self.kind == "single":
            text = f"a {self.size + ' ' if self.size else ''}{self.color} {self.shape}"
            if self.position:
                text += f" {self.position}"
        elif self.kind == "count":
            word = {v: k for k, v in NUMBERS.items()}[self.count]
            text = f"{word} {self.color} {self.shape}s"
        else:
            text = f"a {self.color} {self.shape} {self.relation} a {self.color2} {self.shape2}"
        if self.background:
            text += f" on a {self.background} background"
        return text


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)


def sample_prompt(rng: random.Random, kind_weights: tuple[float, float, float] = (0.35, 0.25, 0.4)) -> Prompt:
    """A random prompt of the grammar."""
    kind = rng.choices(KINDS, weights=kind_weights)[0]
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    bg = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else None
    if kind == "single":
        size = rng.choice(list(SIZES)) if rng.random() < 0.7 else None
        pos = rng.choice(POSITIONS) if rng.random() < 0.4 else None
        return Prompt("single", color, shape, size=size, position=pos, background=bg)
    if kind == "count":
        return Prompt("count", color, shape, count=rng.choice(list(NUMBERS.values())), background=bg)
    color2 = rng.choice([c for c in COLORS if c != color])
    return Prompt("relation", color, shape, relation=rng.choice(RELATIONS), color2=color2,
                  shape2=rng.choice(SHAPES), background=bg)


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_BG = rf"(?: on an? ({'|'.join(BACKGROUNDS)}) background)?"
_RE_SINGLE = re.compile(rf"^an? (?:(small|big) )?({_COLOR}) ({_SHAPE})(?: ({'|'.join(POSITIONS)}))?{_BG}$")
_RE_COUNT = re.compile(rf"^({'|'.join(NUMBERS)}) ({_COLOR}) ({_SHAPE})s{_BG}$")
_RE_REL = re.compile(rf"^an? ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) an? ({_COLOR}) ({_SHAPE}){_BG}$")


def parse_caption(text: str) -> Prompt | None:
    """Inverse of ``Prompt.caption``; None for text outside the grammar."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    if m := _RE_SINGLE.match(t):
        return Prompt("single", m[2], m[3], size=m[1], position=m[4], background=m[5])
    if m := _RE_COUNT.match(t):
        return Prompt("count", m[2], m[3], count=NUMBERS[m[1]], background=m[4])
    if m := _RE_REL.match(t):
        if m[1] == m[4]:
            return None
        return Prompt("relation", m[1], m[2], relation=m[3], color2=m[4], shape2=m[5], background=m[6])
    return None


def _extent(size: str, res: int) -> int:
    return max(3, round(SIZES[size] * res / 32))


def _free(objs: list[Obj], cx: float, cy: float, ext: int, res: int, margin: float = 2.0) -> bool:
    for o in objs:
        e2 = _extent(o.size, res)
        if abs(o.cx - cx) < (ext + e2) / 2 + margin and abs(o.cy - cy) < (ext + e2) / 2 + margin:
            return False
    return True


def _place(rng: random.Random, res: int, ext: int, objs: list[Obj], box=None) -> tuple[float, float] | None:
    lo, hi = ext / 2 + 1, res - ext / 2 - 1
    x0, x1, y0, y1 = box or (lo, hi, lo, hi)
    for _ in range(200):
        # integer centres: even extents then fall on pixel boundaries (crisp squares)
        cx = float(round(rng.uniform(max(lo, x0), min(hi, x1))))
        cy = float(round(rng.uniform(max(lo, y0), min(hi, y1))))
        if _free(objs, cx, cy, ext, res):
            return cx, cy
    return None


def _relation_ok(a: Obj, b: Obj, relation: str, min_gap: float) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b
    if relation in ("left of", "right of"):
        sign = 1 if relation == "left of" else -1
        return sign * dx >= min_gap and abs(dy) < abs(dx)
    sign = 1 if relation == "above" else -1
    return sign * dy >= min_gap and abs(dx) < abs(dy)


def scene_for(prompt: Prompt, rng: random.Random, res: int = 32) -> Scene:
    """A scene that satisfies ``prompt``; unspecified attributes are random."""
    bg = prompt.background or rng.choice(list(BACKGROUNDS))
    for _ in range(100):
        objs: list[Obj] = []
        if prompt.kind == "single":
            size = prompt.size or rng.choice(list(SIZES))
            ext = _extent(size, res)
            half = res / 2
            box = {None: None, "on the left": (0, half - 1, 0, res), "on the right": (half + 1, res, 0, res),
                   "at the top": (0, res, 0, half - 1), "at the bottom": (0, res, half + 1, res)}[prompt.position]
            at = _place(rng, res, ext, objs, box)
            if at:
                objs.append(Obj(prompt.shape, prompt.color, size, *at))
        elif prompt.kind == "count":
            ext = _extent("small", res)
            for _ in range(prompt.count):
                at = _place(rng, res, ext, objs)
                if at:
                    objs.append(Obj(prompt.shape, prompt.color, "small", *at))
        else:
            sa, sb = rng.choice(list(SIZES)), "small"
            if rng.random() < 0.5:
                sa, sb = sb, sa
            a_at = _place(rng, res, _extent(sa, res), objs)
            if a_at:
                objs.append(Obj(prompt.shape, prompt.color, sa, *a_at))
                b_at = _place(rng, res, _extent(sb, res), objs)
                if b_at:
                    b = Obj(prompt.shape2, prompt.color2, sb, *b_at)
                    if _relation_ok(objs[0], b, prompt.relation, min_gap=res / 6):
                        objs.append(b)
        want = {"single": 1, "count": prompt.count, "relation": 2}[prompt.kind]
        if len(objs) == want:
            return Scene(bg, objs)
    raise RuntimeError(f"could not place a scene for {prompt.caption()!r}")


def render(scene: Scene, res: int = 32, supersample: int = 4) -> np.ndarray:
    """Draw the scene: uint8 (res, res, 3), anti-aliased by supersampling."""
    s = supersample
    img = Image.new("RGB", (res * s, res * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        e = _extent(o.size, res) * s
        x, y = o.cx * s, o.cy * s
        box = [x - e / 2, y - e / 2, x + e / 2 - 1, y + e / 2 - 1]
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return np.asarray(img.resize((res, res), Image.BOX), dtype=np.uint8)


def world_vocabulary() -> list[str]:
    """Every word the grammar can produce."""
    words = {"a", "an", "on", "background", "of", *COLORS, *BACKGROUNDS, *SIZES, *NUMBERS}
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    for phrase in RELATIONS + POSITIONS:
        words |= set(phrase.split())
    return sorted(words)

"""The benchmarks' goals, read from ``benchmarks/goals.yaml`` (one place instead of each script's code).

    from goals import goal
    goal("step.dpo_mfu.sd15")        # -> 0.27

``names()`` lists every threshold's dotted name (the keys ``issue``, ``read_by`` and ``text`` describe
a benchmark's entry and are not thresholds); ``READ`` collects the names looked up in this process, so a
test can check that each benchmark reads all of its goals.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

GOALS_FILE = Path(__file__).resolve().with_name("goals.yaml")
META_KEYS = ("issue", "read_by", "text")
READ: set[str] = set()


@lru_cache(maxsize=None)
def _load(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of benchmarks to goals")
    return data


def load(path: Path | str = GOALS_FILE) -> dict[str, Any]:
    """The whole file as a dict (cached per path)."""
    return _load(str(path))


def goal(name: str, path: Path | str = GOALS_FILE) -> Any:
    """The threshold at dotted ``name`` (``benchmark.key[.key...]``); KeyError naming the missing part."""
    node: Any = load(path)
    done = []
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"goal {name!r}: no {part!r} under {'.'.join(done) or 'the top'} of {path}")
        node = node[part]
        done.append(part)
    if isinstance(node, dict):
        raise KeyError(f"goal {name!r} is a group, not a threshold: {sorted(node)}")
    READ.add(name)
    return node


def names(path: Path | str = GOALS_FILE) -> list[str]:
    """Every threshold's dotted name, in file order."""
    out: list[str] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{name}.{key}")
        else:
            out.append(name)

    for bench, entry in load(path).items():
        for key, value in entry.items():
            if key not in META_KEYS:
                walk(value, f"{bench}.{key}")
    return out


def read_by(bench: str, path: Path | str = GOALS_FILE) -> str:
    """The script (in benchmarks/) that reads ``bench``'s goals."""
    return load(path)[bench]["read_by"]

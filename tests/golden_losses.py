"""Fixed-seed losses of short CPU runs on the tiny models: the record that refactors of the step, the data
layer and the loop keep every objective's numbers unchanged (``tests/test_fixed_seed.py``).

``python tests/golden_losses.py --write`` (from the repo root, ``PYTHONPATH=python:tests``) regenerates
``tests/data/golden_losses.json`` with the code as it is, for this platform (torch build and CPU model: each
platform's kernels sum in their own order, so each has its own record; the others are kept). Do that only
for a change that is meant to move the numbers (then on every platform recorded), or to add a platform from
the code as it was before a refactor, and say so in the commit.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_losses.json"
STEPS = 3
KEYS = ("loss", "train/grad_norm", "err/policy_winner", "err/policy_loser", "rewards/margin")

# name -> (model, data, overrides): every objective in both spaces, the authors' NCP, the calibrated scale,
# unpaired feedback, SDXL, and the Rust loader
CASES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sft": ("sd15", "pairs", ("objective.name=sft",)),
    "dpo": ("sd15", "pairs", ("objective.name=dpo", "objective.beta=5000")),
    "cpo": ("sd15", "pairs", ("objective.name=cpo",)),
    "mapo": ("sd15", "pairs", ("objective.name=mapo",)),
    "kto": ("sd15", "pairs", ("objective.name=kto",)),
    "ncp-sft": ("sd15", "pairs", ("objective.name=ncp-sft",)),
    "ncp-dpo": ("sd15", "pairs", ("objective.name=ncp-dpo", "objective.taps=[mid]")),
    "ncp-cpo": ("sd15", "pairs", ("objective.name=ncp-cpo",)),
    "ncp-mapo": ("sd15", "pairs", ("objective.name=ncp-mapo",)),
    "ncp-kto": ("sd15", "pairs", ("objective.name=ncp-kto",)),
    "ncp-dpo-authors-coef": ("sd15", "pairs", ("objective.name=ncp-dpo", "objective.taps=[authors]",
                                               "objective.error_scale=coef", "objective.beta=4490")),
    "ncp-dpo-multiscale-log_t": ("sd15", "pairs", ("objective.name=ncp-dpo", "objective.taps=[multiscale]",
                                                   "objective.error_scale=log_t", "objective.beta=50")),
    "kto-unpaired": ("sd15", "unpaired", ("objective.name=kto", "data.format=unpaired")),
    "sdxl-ncp-dpo": ("sdxl", "pairs", ("objective.name=ncp-dpo",)),
    "dpo-rust": ("sd15", "pairs", ("objective.name=dpo", "objective.beta=5000", "data.backend=rust")),
}


def platform_key() -> dict:
    """What bit-identity depends on: the same torch build on the same kind of CPU gives the same floats."""
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": _cpu_model(),
            "python": platform.python_version()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_inputs(folder: Path) -> dict[str, Path]:
    from fixtures import build_tiny_sd15, build_tiny_sdxl, random_pairs, write_pickapic_parquet
    from test_unpaired import FORMS, write_unpaired_parquet

    return {"sd15": build_tiny_sd15(folder / "sd15"), "sdxl": build_tiny_sdxl(folder / "sdxl"),
            "pairs": write_pickapic_parquet(folder / "pairs" / "train-00000.parquet", random_pairs(12)),
            "unpaired": write_unpaired_parquet(folder / "unpaired.parquet", FORMS["bool"])}


def run_case(name: str, inputs: dict[str, Path], out: Path) -> list[dict[str, float]]:
    from fixtures import cli_args
    from ncp.train import main

    model, data, extra = CASES[name]
    args = cli_args(inputs[model], inputs[data], out, f"train.max_steps={STEPS}", "optim.lr=1e-3",
                    "train.cpu_threads=1", "logging.log_every=1", "train.checkpoint_every=0", *extra)
    if main(args) != 0:
        raise RuntimeError(f"golden case {name} failed: python -m ncp.train {' '.join(args)}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: m[k] for k in KEYS if k in m} for m in lines]


def run_all(names=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(Path(tmp))
        return {name: run_case(name, inputs, Path(tmp) / name) for name in (names or CASES)}


def records(golden: dict) -> list[dict]:
    """Every platform's record in the golden file: the first, and those under ``more_platforms``."""
    first = {k: v for k, v in golden.items() if k != "more_platforms"}
    return [first, *golden.get("more_platforms", [])]


def record_for(golden: dict, platform: dict) -> dict | None:
    return next((r for r in records(golden) if r["platform"] == platform), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help=f"write this platform's record into {GOLDEN} (the other platforms' records are kept)")
    args = parser.parse_args(argv)
    record = {"platform": platform_key(), "steps": STEPS, "cases": run_all()}
    if args.write:
        old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else None
        others = [r for r in records(old) if r["platform"] != record["platform"]] if old else []
        golden = {**record, "more_platforms": others} if others else record
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

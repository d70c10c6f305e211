"""benchmarks/equal_time.py's bookkeeping: ABAB timing, the steps a time budget buys, training minutes."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_bench = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(_bench))
_spec = importlib.util.spec_from_file_location("equal_time", _bench / "equal_time.py")
equal_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(equal_time)


def test_measure_ratio_alternates_and_takes_medians(monkeypatch):
    calls = []
    times = iter([1.0, 2.0, 3.0, 2.5, 1.2, 2.4])  # base, candidate, base, candidate, ...

    def fake(overrides, steps, warmup):
        calls.append(overrides[0])
        return next(times)

    monkeypatch.setattr(equal_time, "step_time", fake)
    t = equal_time.measure_ratio(["objective.name=kto"], ["objective.name=ncp-kto"], 3, 10, 2)
    assert calls == ["objective.name=kto", "objective.name=ncp-kto"] * 3
    assert t["base_step_s"] == [1.0, 3.0, 1.2] and t["candidate_step_s"] == [2.0, 2.5, 2.4]
    assert t["ratio"] == pytest.approx(1.2 / 2.4)  # median 1.2 over median 2.4


def test_equal_steps():
    assert equal_time.equal_steps(600, 0.761) == 457  # 456.6
    assert equal_time.equal_steps(600, 1.0) == 600
    assert equal_time.equal_steps(10, 0.01) == 1  # never zero steps
    with pytest.raises(SystemExit, match="must be positive"):
        equal_time.equal_steps(600, 0.0)


def test_training_minutes_sums_logged_steps(tmp_path):
    rows = [{"step": 1, "perf/step_s": 30.0}, {"step": 2, "perf/step_s": 60.0}, {"step": 2, "eval": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert equal_time.training_minutes(tmp_path) == pytest.approx(1.5)

"""benchmarks/quality.py's bookkeeping: objective@scale names, the comparisons a plan makes, training fit."""
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules["quality"] = quality  # its dataclasses look their module up by name
_spec.loader.exec_module(quality)


def test_split_objective():
    assert quality.split_objective("ncp-dpo@log") == ("ncp-dpo", "log")
    assert quality.split_objective("dpo") == ("dpo", "paper")
    assert quality.latent_counterpart("ncp-dpo@log") == "dpo"
    assert quality.latent_counterpart("ncp-cpo") == "cpo"


def test_comparisons_need_both_sides_in_the_plan():
    plan = ["dpo", "ncp-dpo", "ncp-dpo@log", "ncp-cpo", "sft"]
    assert quality.comparisons(plan) == [("ncp-dpo", "dpo"), ("ncp-dpo@log", "dpo")]


def test_training_fit_hand_computed():
    """Two seeds of 10 steps, windows of 5: accuracies (0,1,...) averaged over seeds per step, then per window;
    the last fifth is the last 2 steps; spikes count steps with loss > 2, averaged over runs."""
    a = {"accuracy": [0.0] * 5 + [1.0] * 5, "loss": [0.7] * 9 + [2.5]}
    b = {"accuracy": [0.5] * 8 + [0.0, 1.0], "loss": [3.0, 2.0, 0.1] + [0.7] * 7}
    fit = quality.training_fit([a, b], window=5)
    assert fit["steps"] == [5, 10]
    assert fit["accuracy"] == pytest.approx([0.25, (0.75 * 3 + 0.5 + 1.0) / 5])
    assert fit["accuracy_last_fifth"] == pytest.approx((0.5 + 1.0) / 2)
    assert fit["loss_spikes_per_run"] == pytest.approx(1.0)  # one step each (2.0 is not > 2)
    assert quality.training_fit([{"step_s": [1.0]}]) is None  # results written before the curves were kept


def test_truncated_run_keeps_what_it_had_at_the_step():
    run = {"scores": {"300": [0.1], "600": [0.2], "900": [0.3]}, "step_s": [1.0] * 900, "loss": [0.5] * 900,
           "accuracy": [0.6] * 900, "spec": {"objective": "dpo"}}
    cut = quality.truncated(run, 600)
    assert sorted(cut["scores"]) == ["300", "600"]
    assert len(cut["step_s"]) == len(cut["loss"]) == len(cut["accuracy"]) == 600
    assert cut["spec"] == run["spec"] and len(run["step_s"]) == 900  # the original is left as it was


def test_write_result_stamps_writes_atomically_plots_and_prints(tmp_path, capsys):
    """quality.py and protocol.py end through write_result: the JSON gets the machine, date and total time,
    is written whole (no .tmp left beside it), the plot goes beside it, and the tables are printed."""
    import json
    import time

    out = tmp_path / "sub" / "p.json"
    plotted = []

    def plot_fn(res, png):
        plotted.append(png)
        png.write_bytes(b"png")

    res = quality.write_result({"variants": {"dpo": 1}}, out, time.time() - 2.0, 3, plot_fn,
                               lambda r: f"TABLE {sorted(r)}")
    back = json.loads(out.read_text())
    assert back == res and back["variants"] == {"dpo": 1}
    assert back["machine"]["torch_threads"] == 3 and back["total_s"] >= 2.0 and back["date"].endswith("+00:00")
    assert plotted == [tmp_path / "sub" / "p_reward_vs_steps.png"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.json", "p_reward_vs_steps.png"]
    assert "TABLE ['date', 'machine', 'total_s', 'variants']" in capsys.readouterr().out

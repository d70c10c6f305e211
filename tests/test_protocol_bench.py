"""benchmarks/protocol.py's run settings: variants parsed, training threads from --threads, variants win."""
import argparse
import importlib.util
import sys
from pathlib import Path

_bench = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(_bench))
_spec = importlib.util.spec_from_file_location("protocol_bench", _bench / "protocol.py")
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)


def test_parse_variant_keeps_commas_in_brackets():
    label, ov = protocol.parse_variant("a=objective.name=ncp-dpo,objective.taps=[mid,up],objective.beta=5")
    assert label == "a" and ov == ["objective.name=ncp-dpo", "objective.taps=[mid,up]", "objective.beta=5"]


def test_training_threads_follow_threads_and_a_variant_wins(tmp_path):
    """Two runs side by side at the default config's train.cpu_threads=2 oversubscribe 2 cores (~10x slower
    per step, 2026-12-06): the run's training threads are --threads unless the variant sets its own."""
    from ncp.config import DEFAULT_CONFIG, load_config

    args = argparse.Namespace(steps=30, eval_every=10, threads=1, override=[])
    ov = protocol.run_overrides(["objective.name=dpo"], 2, args, tmp_path / "r")
    assert "train.cpu_threads=1" in ov
    cfg = load_config(DEFAULT_CONFIG, ov)
    assert (cfg.train.cpu_threads, cfg.train.seed, cfg.train.keep_checkpoints) == (1, 2, 5)  # 30 // 10 + 2
    ov = protocol.run_overrides(["objective.name=dpo", "train.cpu_threads=2"], 0, args, tmp_path / "r")
    assert load_config(DEFAULT_CONFIG, ov).train.cpu_threads == 2

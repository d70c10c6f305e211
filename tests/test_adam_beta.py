"""benchmarks/adam_beta.py's comparison of two LoRAs, by the deltas (up @ down) they add to the model."""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import adam_beta  # noqa: E402


def _lora(path: Path, up: list, down: list, name: str = "unet.mid.to_q") -> Path:
    save_file({f"{name}.lora.up.weight": torch.tensor(up), f"{name}.lora.down.weight": torch.tensor(down)}, str(path))
    return path


def test_deltas_are_up_times_down(tmp_path):
    d = adam_beta.lora_deltas(_lora(tmp_path / "a.safetensors", [[2.0], [0.0]], [[1.0, 3.0]]))
    assert list(d) == ["unet.mid.to_q"]
    assert d["unet.mid.to_q"].tolist() == [[2.0, 6.0], [0.0, 0.0]]
    assert d["unet.mid.to_q"].dtype == torch.float64


def test_compare_by_hand(tmp_path):
    # a = [[2, 0], [0, 0]], b = [[0, 0], [2, 0]]: orthogonal, |a - b| = sqrt(8), |b| = 2
    a = adam_beta.lora_deltas(_lora(tmp_path / "a.safetensors", [[2.0], [0.0]], [[1.0, 0.0]]))
    b = adam_beta.lora_deltas(_lora(tmp_path / "b.safetensors", [[0.0], [2.0]], [[1.0, 0.0]]))
    c = adam_beta.compare(a, b)
    assert c["cosine"] == pytest.approx(0.0)
    assert c["rel_diff"] == pytest.approx(2 ** 0.5)
    assert (c["norm_a"], c["norm_b"]) == pytest.approx((2.0, 2.0))
    # twice a: the same direction, |a - 2a| / |2a| = 1/2 (the rank-1 factors split the scale between them)
    a2 = adam_beta.lora_deltas(_lora(tmp_path / "a2.safetensors", [[1.0], [0.0]], [[4.0, 0.0]]))
    c = adam_beta.compare(a, a2)
    assert c["cosine"] == pytest.approx(1.0) and c["rel_diff"] == pytest.approx(0.5)


def test_mismatched_loras_are_refused(tmp_path):
    a = adam_beta.lora_deltas(_lora(tmp_path / "a.safetensors", [[1.0]], [[1.0]]))
    b = adam_beta.lora_deltas(_lora(tmp_path / "b.safetensors", [[1.0]], [[1.0]], name="unet.mid.to_k"))
    with pytest.raises(ValueError, match="different modules"):
        adam_beta.compare(a, b)
    save_file({"unet.x.lora.down.weight": torch.ones(1, 1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match=r"c\.safetensors: unet\.x\.lora\.down\.weight has no"):
        adam_beta.lora_deltas(tmp_path / "c.safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="no '\\*.lora.down.weight'"):
        adam_beta.lora_deltas(tmp_path / "d.safetensors")

"""benchmarks/adam_beta.py's comparison of two LoRAs, by the deltas (up @ down) they add to the model."""
import sys
from pathlib import Path

import json

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import adam_beta  # noqa: E402
from ncp.export import LORA_FILE, ExportError  # noqa: E402


def _save(lora_dir: Path, tensors: dict, alpha: float = 1.0, rank: int = 1) -> Path:
    """A LoRA folder as ncp.train writes it: the weights, with the adapter config in the file's metadata."""
    lora_dir.mkdir()
    meta = {"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha})}
    save_file(tensors, str(lora_dir / LORA_FILE), metadata=meta)
    return lora_dir


def _lora(lora_dir: Path, up: list, down: list, name: str = "unet.mid.to_q", alpha: float = 1.0) -> Path:
    return _save(lora_dir, {f"{name}.lora.up.weight": torch.tensor(up), f"{name}.lora.down.weight": torch.tensor(down)},
                 alpha=alpha)


def test_deltas_are_up_times_down(tmp_path):
    d = adam_beta.lora_deltas(_lora(tmp_path / "a", [[2.0], [0.0]], [[1.0, 3.0]]))
    assert list(d) == ["mid.to_q"]
    assert d["mid.to_q"].tolist() == [[2.0, 6.0], [0.0, 0.0]]
    assert d["mid.to_q"].dtype == torch.float64
    # scaled by alpha / rank, as peft applies it: alpha 3 at rank 1 triples the delta
    d = adam_beta.lora_deltas(_lora(tmp_path / "b", [[2.0], [0.0]], [[1.0, 3.0]], alpha=3.0))
    assert d["mid.to_q"].tolist() == [[6.0, 18.0], [0.0, 0.0]]


def test_compare_by_hand(tmp_path):
    # a = [[2, 0], [0, 0]], b = [[0, 0], [2, 0]]: orthogonal, |a - b| = sqrt(8), |b| = 2
    a = adam_beta.lora_deltas(_lora(tmp_path / "a", [[2.0], [0.0]], [[1.0, 0.0]]))
    b = adam_beta.lora_deltas(_lora(tmp_path / "b", [[0.0], [2.0]], [[1.0, 0.0]]))
    c = adam_beta.compare(a, b)
    assert c["cosine"] == pytest.approx(0.0)
    assert c["rel_diff"] == pytest.approx(2 ** 0.5)
    assert (c["norm_a"], c["norm_b"]) == pytest.approx((2.0, 2.0))
    # twice a: the same direction, |a - 2a| / |2a| = 1/2 (the rank-1 factors split the scale between them)
    a2 = adam_beta.lora_deltas(_lora(tmp_path / "a2", [[1.0], [0.0]], [[4.0, 0.0]]))
    c = adam_beta.compare(a, a2)
    assert c["cosine"] == pytest.approx(1.0) and c["rel_diff"] == pytest.approx(0.5)


def test_mismatched_loras_are_refused(tmp_path):
    a = adam_beta.lora_deltas(_lora(tmp_path / "a", [[1.0]], [[1.0]]))
    b = adam_beta.lora_deltas(_lora(tmp_path / "b", [[1.0]], [[1.0]], name="unet.mid.to_k"))
    with pytest.raises(ValueError, match="different modules"):
        adam_beta.compare(a, b)
    c = _save(tmp_path / "c", {"unet.x.lora.down.weight": torch.ones(1, 1)})
    with pytest.raises(ExportError, match=r"c/pytorch_lora_weights\.safetensors: module x has its lora down weight only"):
        adam_beta.lora_deltas(c)
    d = _save(tmp_path / "d", {"w": torch.ones(1)})
    with pytest.raises(ExportError, match="unexpected key w"):
        adam_beta.lora_deltas(d)

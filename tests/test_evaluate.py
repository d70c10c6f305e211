"""`python -m ncp.evaluate` and the after-training report: prompt files, statistics, scorers, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from ncp.evaluate import bootstrap_ci, paired_stats  # noqa: E402
from ncp.paths import bundle_path  # noqa: E402
from ncp.report import after_training, curve_panels  # noqa: E402
from ncp.sampling import read_prompts  # noqa: E402
from ncp.scoring import CLIPScorer, make_scorers  # noqa: E402
from ncp.scoring.scenes import Obj, Scene, render  # noqa: E402


def test_read_prompts_txt_and_partiprompts_tsv(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two blue squares  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "two blue squares"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\tNote\n"
                                        "a green triangle\tAbstract\tBasic\t\nthree red squares\tAbstract\tCount\t\n")
    assert read_prompts(tmp_path / "parti.tsv") == ["a green triangle", "three red squares"]
    with pytest.raises(ValueError, match="no 'text' column"):
        read_prompts(tmp_path / "parti.tsv", column="text")


@pytest.mark.parametrize("name, text", [("p.txt", "a red circle\ntwo blue squares\n"),
                                        ("p.tsv", "Prompt\tCategory\na red circle\tA\ntwo blue squares\tB\n"),
                                        ("p.csv", "prompt,category\na red circle,A\ntwo blue squares,B\n")])
def test_read_prompts_drops_a_utf8_bom(tmp_path, name, text):
    """A byte-order mark is neither in the first prompt (.txt) nor in the first column's name (.tsv/.csv)."""
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    prompts = read_prompts(tmp_path / name)
    assert prompts == ["a red circle", "two blue squares"] and not prompts[0].startswith("\ufeff")


def test_bootstrap_and_paired_stats():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    lo, hi = bootstrap_ci(x)
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    s = paired_stats(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.2, 0.2, 0.5, 0.3]))
    assert s["mean_diff"] == pytest.approx(0.05)
    assert s["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)  # a tie counts 1/2
    lo, hi = paired_stats(np.zeros(50), np.full(50, 0.1))["mean_diff_ci95"]
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_unknown_scorer_is_an_error():
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorers("judge,imagereward:/x")
    with pytest.raises(ValueError, match="needs a model folder"):
        make_scorers("pickscore")


def tiny_clip(path: Path) -> Path:
    """A tiny CLIP (PickScore/HPS-style scorer) built from config, with the world's tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ncp.world.tokenizer import build_tokenizer

    tok = build_tokenizer(24)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=24, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


def test_clip_scorers_from_a_local_folder(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    images = [render(Scene("black", [Obj("circle", "red", "big", 16, 16)])),
              render(Scene("white", [Obj("square", "blue", "small", 8, 8)]))]
    prompts = ["a big red circle", "a small blue square"]
    pick, hps = CLIPScorer(str(folder), "pickscore"), CLIPScorer(str(folder), "hps")
    p, h = pick(images, prompts), hps(images, prompts)
    assert p.shape == h.shape == (2,) and np.all(np.abs(h) <= 1.0 + 1e-5)
    scale = float(pick.model.logit_scale.detach().exp())
    np.testing.assert_allclose(p, scale * h, rtol=1e-4, atol=1e-5)  # PickScore = logit_scale * cosine


def random_lora(model_dir: Path, out: Path, scale: float = 0.05) -> Path:
    """A diffusers-format LoRA with random weights (what `python -m ncp.train` writes, untrained)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, scale)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=state, safe_serialization=True)
    return out


BUNDLE = bundle_path()
needs_bundle = pytest.mark.skipif(not (BUNDLE / "model" / "model_index.json").is_file(), reason="bundle not built")


@needs_bundle
def test_evaluate_cli_end_to_end_on_the_bundle_with_two_prompts(tmp_path):
    lora = random_lora(BUNDLE / "model", tmp_path / "lora")
    clip = tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle left of a blue square\nthree yellow triangles\n")
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", str(BUNDLE / "model"), "--lora", str(lora),
           "--prompts", str(prompts), "--scorers", f"judge,pickscore:{clip},hps:{clip}", "--out", str(out),
           "--seeds", "2", "--steps", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["n_prompts"] == 2 and res["n_images"] == 4 and res["steps"] == 4
    assert set(res["scorers"]) == {"judge", "pickscore:clip", "hps:clip"}
    for entry in res["scorers"].values():
        assert entry["base"]["n"] == entry["lora"]["n"] == 4
        lo, hi = entry["lora_vs_base"]["win_rate_ci95"]
        assert 0.0 <= lo <= entry["lora_vs_base"]["win_rate"] <= hi <= 1.0
    assert (out / "grid.png").stat().st_size > 0
    assert "lora win rate" in proc.stdout


@needs_bundle
def test_after_training_report_writes_grid_curves_and_rewards(tmp_path):
    lora = random_lora(BUNDLE / "model", tmp_path / "lora")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": i, "loss": 0.7 - 0.01 * i, "rewards/accuracy": 0.5 + 0.01 * i,
                                             "note": "text is skipped"}) for i in range(1, 21)) + "\n")
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red circle\ntwo green squares\n")
    res = after_training(str(BUNDLE / "model"), str(lora), str(tmp_path / "out"), str(metrics), str(prompts),
                         seed=0, n_seeds=2)
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "curves.png").is_file()
    assert 0.0 <= res["base_reward"] <= 1.0 and 0.0 <= res["aligned_reward"] <= 1.0
    lo, hi = res["diff_ci95"]
    assert lo <= res["diff"] <= hi
    assert json.loads((tmp_path / "out" / "report.json").read_text())["n_prompts"] == 2


def test_curves_show_the_read_metrics_and_skip_constant_ones():
    """curves.png: loss, rewards, validation reward, grad norm and throughput, in that order; constant series
    (train/lr, train/world_size, a flat margin), other keys (err/*, memory), text and flags are not drawn."""
    recs = [{"step": i, "loss": 0.7 - 0.01 * i, "rewards/accuracy": 0.5 + 0.01 * i, "rewards/margin": 0.0,
             "err/policy_winner": 0.1 * i, "train/grad_norm": 1.0 / i, "train/lr": 1e-4, "train/world_size": 1,
             "perf/step_s": 1.0 + 0.1 * (i % 2), "perf/pairs_per_s": 8.0 / (1.0 + 0.1 * (i % 2)),
             "perf/peak_mem_mb": 100.0 + i, "resumed": i > 2, "note": "text"} for i in range(1, 6)]
    recs[1]["validation/reward"], recs[3]["validation/reward"] = 0.4, 0.5
    assert curve_panels(recs) == [("loss", ["loss"]), ("rewards/accuracy", ["rewards/accuracy"]),
                                  ("validation reward", ["validation/reward"]),
                                  ("train/grad_norm", ["train/grad_norm"]),
                                  ("perf/pairs_per_s", ["perf/pairs_per_s"]), ("perf/step_s", ["perf/step_s"])]
    assert curve_panels([{"step": 1, "train/lr": 1e-4}, {"step": 2, "train/lr": 1e-4}]) == []
    assert curve_panels([]) == []

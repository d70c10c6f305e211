"""ncp.generate, ncp.data.pairing, the scorer interface and ncp.onpolicy: hand-computed pair and label rules,
the CLI on tiny models, kill-and-resume of generation and of rounds."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))

from ncp.data.pairing import PairRule, UnpairedRule, margin_histogram, select_pairs, select_unpaired  # noqa: E402
from ncp.generate import GenerateError, Runtime, Settings, image_seed, run  # noqa: E402
from ncp.scoring import FunctionScorer, checked_scores, make_reward, make_scorers, parse_spec  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}{os.pathsep}{ROOT / 'tests'}"}


# ---------------------------------------------------------------- pair and label rules (hand-computed)


def test_best_worst_margin_and_top_bottom_pairs():
    s = [0.5, 0.9, 0.1, 0.7]
    assert select_pairs(s, PairRule.parse("best-worst")) == [(1, 2, pytest.approx(0.8))]
    # every pair with margin > 0.3: (0.9, 0.1) (0.9, 0.5) (0.7, 0.1) (0.5, 0.1); not (0.9, 0.7) nor (0.7, 0.5)
    got = {(w, l) for w, l, _ in select_pairs(s, PairRule.parse("margin:0.3"))}
    assert got == {(1, 2), (1, 0), (3, 2), (0, 2)}
    # top 2 (0.9, 0.7) x bottom 2 (0.1, 0.5)
    got = [(w, l) for w, l, _ in select_pairs(s, PairRule.parse("top-bottom:2"))]
    assert sorted(got) == [(1, 0), (1, 2), (3, 0), (3, 2)]
    assert len(select_pairs(s, PairRule.parse("top-bottom:5"))) == 4  # K is capped at N // 2


def test_ties_by_margin_are_dropped_and_equal_scores_keep_image_order():
    assert select_pairs([0.5, 0.5, 0.5], PairRule.parse("best-worst")) == []  # all equal: a tie
    # margins exact in binary: 0.125 is not > 0.125, 0.25 is
    assert select_pairs([0.5, 0.625], PairRule.parse("best-worst", tie_margin=0.125)) == []
    assert select_pairs([0.5, 0.75], PairRule.parse("best-worst", tie_margin=0.125))[0][:2] == (1, 0)
    # two images share the best score: the first of them wins (stable), never a random one
    assert select_pairs([0.9, 0.1, 0.9], PairRule.parse("best-worst"))[0][:2] == (0, 1)
    assert select_pairs([0.3], PairRule.parse("best-worst")) == []


@pytest.mark.parametrize("bad", ["best", "margin", "margin:-1", "margin:x", "top-bottom:0", "top-bottom:1.5",
                                 "best-worst:3"])
def test_bad_pair_rules_are_named(bad):
    with pytest.raises(ValueError, match="pair rule"):
        PairRule.parse(bad)


def test_unpaired_quantile_and_threshold_labels():
    s = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]
    # quantile 0.25 of 8 images: the 2 best (0.9, 0.8) desirable, the 2 worst (0.1, 0.2) undesirable
    assert select_unpaired(s, UnpairedRule.parse("quantile:0.25")).tolist() == [0, 1, -1, -1, -1, 0, 1, -1]
    assert select_unpaired(s, UnpairedRule.parse("threshold:0.3:0.7")).tolist() == [0, 1, -1, -1, 1, 0, 1, -1]
    assert select_unpaired(s, UnpairedRule.parse("threshold:0.5")).tolist() == [0, 1, 1, 0, 1, 0, 1, 0]
    assert select_unpaired(s[:3], UnpairedRule.parse("quantile:0.25")).tolist() == [-1, -1, -1]  # floor(0.75) = 0
    for bad in ("quantile:0.6", "quantile:0", "threshold:0.7:0.3", "threshold", "median"):
        with pytest.raises(ValueError, match="unpaired rule"):
            UnpairedRule.parse(bad)


def test_margin_histogram_counts():
    h = margin_histogram([0.1, 0.2, 0.2, 1.0], bins=5)
    assert h["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0]) and sum(h["counts"]) == 4
    assert h["counts"] == [1, 2, 0, 0, 1]
    assert margin_histogram([]) == {"edges": [], "counts": []}


# ---------------------------------------------------------------- scorers


def test_spec_weights_and_folders_with_at_signs():
    assert parse_spec("judge@0.7, pickscore:/m/ps@0.3") == [("judge", 0.7), ("pickscore:/m/ps", 0.3)]
    assert parse_spec("hps:/models/v2@home") == [("hps:/models/v2@home", 1.0)]  # not a number: part of the path
    with pytest.raises(ValueError, match="finite"):
        parse_spec("judge@inf")
    with pytest.raises(ValueError, match="no scorer"):
        parse_spec(" , ")


def test_weighted_reward_of_user_functions_is_the_weighted_sum():
    images = [np.full((4, 4, 3), v, np.uint8) for v in (0, 51, 255)]
    images[1][..., 0] = 255  # one red-ish image: redness 1.0, brightness (255 + 51 + 51) / 3 / 255
    reward = make_reward("fn:gen_scorers:brightness@2,fn:gen_scorers:redness@-1")
    total, parts = reward.parts(images, ["a", "b", "c"])
    bright = np.array([0.0, 357 / 3 / 255, 1.0])
    red = np.array([0.0, 1.0, 1.0])
    np.testing.assert_allclose(parts["fn:gen_scorers:brightness"], bright)
    np.testing.assert_allclose(total, 2 * bright - red)
    assert reward.name == "2*fn:gen_scorers:brightness+-1*fn:gen_scorers:redness"
    assert [s.name for s in make_scorers("judge,judge.quality,fn:gen_scorers:redness")] == [
        "judge", "judge.quality", "fn:gen_scorers:redness"]
    with pytest.raises(ValueError, match="named twice"):
        make_reward("judge,judge@2")


def test_judge_parts_are_the_judgement_parts():
    from ncp.scoring.judge import judge

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:20, 4:16] = (220, 30, 30)
    j = judge(img, "a red square")
    out = {n: make_scorers(n)[0]([img], ["a red square"])[0] for n in ("judge", "judge.alignment", "judge.quality")}
    assert out == {"judge": j.score, "judge.alignment": j.alignment, "judge.quality": j.quality}
    with pytest.raises(ValueError, match="known parts"):
        make_scorers("judge.beauty")


def test_bad_user_scorers_are_named():
    with pytest.raises(ValueError, match="cannot import"):
        FunctionScorer("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no 'nope'"):
        FunctionScorer("gen_scorers:nope")
    with pytest.raises(ValueError, match="not callable"):
        FunctionScorer("gen_scorers:not_callable")
    with pytest.raises(ValueError, match="expected fn:package.module:function"):
        make_scorers("fn:gen_scorers")
    img = [np.zeros((2, 2, 3), np.uint8)] * 3
    with pytest.raises(ValueError, match="returned 2 scores for 3 images"):
        FunctionScorer("gen_scorers:too_few")(img, ["p"] * 3)
    with pytest.raises(ValueError, match="non-finite score .* for image 0"):
        FunctionScorer("gen_scorers:not_finite")(img, ["p"] * 3)
    with pytest.raises(ValueError, match="not numbers"):
        checked_scores("x", ["a", "b"], 2)


def test_image_seeds_are_stable_and_distinct():
    seeds = {image_seed(0, k, p) for k in range(8) for p in ("a red circle", "a blue square")}
    assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)
    assert image_seed(3, 1, "x") == image_seed(3, 1, "x") != image_seed(4, 1, "x")


# ---------------------------------------------------------------- the CLI on a tiny model


def prompts_file(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"a picture number {i}" for i in range(n)) + "\n")
    return path


def gen_settings(model, prompts, **kw) -> Settings:
    base = dict(model=str(model), prompts=str(prompts), images_per_prompt=3, steps=2, guidance=2.0,
                scorers="fn:gen_scorers:brightness", shard_prompts=2)
    return Settings(**(base | kw))


def test_the_scorer_spec_is_checked_before_sampling_and_its_scorers_are_built_in_the_scoring_process_only(
        tmp_path, monkeypatch):
    """A bad spec (a missing CLIP folder, a module that does not import, a name it lacks) fails before sampling,
    naming it; a good one is checked without constructing a scorer in the main process (a CLIP model would
    otherwise be loaded twice: here and in the scoring process)."""
    import re

    import ncp.generate as gen
    import ncp.scoring as scoring

    class Sampling(Exception):
        pass

    def sample_all(*args, **kwargs):
        raise Sampling

    monkeypatch.setattr(gen, "sample_all", sample_all)
    prompts = prompts_file(tmp_path, 2)
    missing, empty = tmp_path / "no_such_clip", tmp_path / "no_config"
    empty.mkdir()
    for spec, error in ((f"judge,pickscore:{missing}@0.5", f"no such folder {missing}"),
                        (f"hps:{empty}", f"no config.json in {empty}"),
                        ("fn:no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                        ("fn:gen_scorers:nope", "module 'gen_scorers' has no 'nope'"),
                        ("judge.beauty", "judge part 'beauty'")):
        with pytest.raises(GenerateError, match=re.escape(error)):
            run(tmp_path / "bad", gen_settings("no-such-model", prompts, scorers=spec))
    assert not (tmp_path / "bad").exists()  # failed before any setting was written, let alone a sample

    def constructed(self, *args, **kwargs):
        raise AssertionError(f"a {type(self).__name__} was constructed in the main process")

    for cls in (scoring.CLIPScorer, scoring.FunctionScorer, scoring.JudgeScorer):
        monkeypatch.setattr(cls, "__init__", constructed)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")  # not a model: loading it would fail
    with pytest.raises(Sampling):
        run(tmp_path / "good", gen_settings("no-such-model", prompts,
                                            scorers=f"pickscore:{clip}@0.5,fn:gen_scorers:brightness,judge.quality"))


# ---------------------------------------------------------------- pairs from the samples, shard by shard


def write_sample_shards(out: Path, prompts_per_shard: list[int], n: int = 4, seed: int = 0) -> None:
    """Sample shards as the scoring process writes them, without a model: scores on a 1/8 grid (ties within a
    prompt and across shards), each shard's rows shuffled (the pairs follow prompt and image order, not the
    file's), fake image bytes."""
    import pyarrow as pa

    from ncp.data.pairing import write_parquet_atomic
    from ncp.generate import SAMPLES_SCHEMA_COLUMNS, shard_path

    rng = np.random.default_rng(seed)
    first = 0
    for i, count in enumerate(prompts_per_shard):
        rows = [{"prompt_index": pi, "prompt": f"prompt {pi}", "k": k, "seed": 1000 * pi + k, "uid": f"u-p{pi}-k{k}",
                 "jpg": f"jpeg of p{pi} k{k}".encode(), "score": float(rng.integers(0, 9)) / 8,
                 "scores": json.dumps({"x": float(k)}), "model": "m"}
                for pi in range(first, first + count) for k in range(n)]
        rows = [rows[j] for j in rng.permutation(len(rows))]
        assert tuple(rows[0]) == SAMPLES_SCHEMA_COLUMNS
        write_parquet_atomic(pa.Table.from_pylist(rows), shard_path(out, i))
        first += count


def all_at_once(out: Path, n_shards: int, seed: int, pair_rule, unpaired_rule):
    """The pair and unpaired files, and the summary counts, made the way write_pairs did before it streamed:
    every shard's samples in memory, the unpaired labels of all images at once (whatever the rule)."""
    import pyarrow as pa

    from ncp.data.pairing import (GENERATED_PAIR_SCHEMA, UNPAIRED_SCHEMA, Sample, pair_rows, select_unpaired,
                                  unpaired_rows)

    shards = []
    for i in range(n_shards):
        rows = sorted(pq.read_table(out / "samples" / f"samples-{i:05d}.parquet").to_pylist(),
                      key=lambda r: (r["prompt_index"], r["k"]))
        groups: dict[int, list] = {}
        for r in rows:
            groups.setdefault(r["prompt_index"], []).append(
                Sample(r["prompt"], r["seed"], r["uid"], r["jpg"], r["score"], json.loads(r["scores"]), r["model"]))
        shards.append(list(groups.values()))
    files: dict[str, list[dict]] = {}
    kept = 0
    for i, sh in enumerate(shards):
        rows, margins = pair_rows(sh, pair_rule, placement_seed=seed * 100_003 + i)
        kept += len(margins)
        if rows:
            files[f"pairs/train-{i:05d}.parquet"] = pa.Table.from_pylist(rows, schema=GENERATED_PAIR_SCHEMA).to_pylist()
    flat = [[x for g in sh for x in g] for sh in shards]
    labels = select_unpaired([x.score for f in flat for x in f], unpaired_rule)
    start = 0
    for i, f in enumerate(flat):
        rows = unpaired_rows(f, labels[start: start + len(f)])
        start += len(f)
        if rows:
            files[f"unpaired/train-{i:05d}.parquet"] = pa.Table.from_pylist(rows, schema=UNPAIRED_SCHEMA).to_pylist()
    scores = np.array([x.score for f in flat for x in f])
    counts = {"prompts": sum(map(len, shards)), "images": len(scores), "kept": kept,
              "desirable": int((labels == 1).sum()), "undesirable": int((labels == 0).sum()),
              "mean": float(scores.mean()), "std": float(scores.std())}
    return files, counts


@pytest.mark.parametrize("pairs,tie_margin,unpaired", [("best-worst", 0.0, "quantile:0.25"),
                                                       ("top-bottom:2", 0.125, "threshold:0.25:0.75"),
                                                       ("margin:0.3", 0.0, "quantile:0.5")])
def test_pairs_are_made_shard_by_shard_as_from_all_samples_at_once(tmp_path, monkeypatch, pairs, tie_margin, unpaired):
    """The pairs and unpaired labels written shard by shard are those of all the samples at once (the same rows,
    in the same order, in the same files, even quantile's, which ranks the whole run); a shard's images are read
    only once the files of the shards before it are written, and quantile's ranking reads no image."""
    import pyarrow.parquet

    from ncp.data.pairing import PairRule, UnpairedRule
    from ncp.generate import write_pairs

    out = tmp_path / "gen"
    write_sample_shards(out, [2, 2, 1], seed=len(pairs))
    (out / "pairs").mkdir()
    pq.write_table(pq.read_table(out / "samples" / "samples-00000.parquet"), out / "pairs" / "train-00007.parquet")
    pair_rule, unpaired_rule = PairRule.parse(pairs, tie_margin), UnpairedRule.parse(unpaired)
    expected, counts = all_at_once(out, 3, 5, pair_rule, unpaired_rule)

    reads: list[tuple[str, bool, set[str]]] = []  # (file, images read?, the output files there were then)
    read_table = pyarrow.parquet.read_table

    def spy(path, *args, columns=None, **kwargs):
        written = {f for f in expected if (out / f).exists()}
        reads.append((Path(path).name, columns is None or "jpg" in columns, written))
        return read_table(path, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pyarrow.parquet, "read_table", spy)
    summary = write_pairs(out, Settings(seed=5), 3, pair_rule, unpaired_rule)
    monkeypatch.undo()

    got = {str(f.relative_to(out)): pq.read_table(f).to_pylist()
           for sub in ("pairs", "unpaired") for f in sorted((out / sub).glob("*.parquet"))}
    assert sorted(got) == sorted(expected)  # the stale train-00007 is gone too
    assert got == expected
    assert (summary["prompts"], summary["images"], summary["pairs"]["kept"]) == (counts["prompts"], counts["images"],
                                                                                  counts["kept"])
    assert (summary["unpaired"]["desirable"], summary["unpaired"]["undesirable"]) == (counts["desirable"],
                                                                                      counts["undesirable"])
    assert summary["score"]["mean"] == counts["mean"] and summary["score"]["std"] == counts["std"]
    assert counts["kept"] and counts["desirable"] and counts["undesirable"]  # the input tests something

    # quantile: first the scores of every shard, no image; then each shard's images once, after the files before it
    assert [images for _, images, _ in reads] == [False] * (3 if unpaired_rule.kind == "quantile" else 0) + [True] * 3
    with_images = [(name, written) for name, images, written in reads if images]
    assert [name for name, _ in with_images] == [f"samples-{i:05d}.parquet" for i in range(3)]
    for i, (_, written) in enumerate(with_images):
        assert written == {f for f in expected if int(f.split("-")[1][:5]) < i}


def test_generate_writes_pairs_the_loader_reads(tiny_sd15, tmp_path):
    prompts = prompts_file(tmp_path)
    (tmp_path / "exclude.txt").write_text("a picture number 4\n")
    out = tmp_path / "gen"
    summary = run(out, gen_settings(tiny_sd15, prompts, exclude=str(tmp_path / "exclude.txt")),
                  Runtime(batch_size=4, threads=1), unpaired="quantile:0.25")
    assert summary["prompts"] == 4 and summary["images"] == 12  # the excluded prompt was not sampled
    assert sorted(f.name for f in (out / "samples").iterdir()) == ["samples-00000.parquet", "samples-00001.parquet"]
    samples = pq.read_table(out / "samples").to_pylist()
    assert len(samples) == 12 and {r["prompt"] for r in samples} == {f"a picture number {i}" for i in range(4)}
    for r in samples:
        assert r["seed"] == image_seed(0, r["k"], r["prompt"])
        decoded = np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("RGB"))
        assert r["score"] == pytest.approx(decoded.mean() / 255, abs=0.01)  # scored before the JPEG
    pairs = pq.read_table(out / "pairs").to_pylist()
    assert len(pairs) == summary["pairs"]["kept"] == 4  # best-worst: one pair a prompt (no ties here)
    by_prompt = {}
    for r in samples:
        by_prompt.setdefault(r["prompt"], []).append(r["score"])
    for r in pairs:
        w, l = (0, 1) if r["label_0"] == 1.0 else (1, 0)
        assert r[f"label_{l}"] == 0.0 and r["best_image_uid"] == r[f"image_{w}_uid"]
        assert r[f"score_{w}"] == max(by_prompt[r["caption"]]) and r[f"score_{l}"] == min(by_prompt[r["caption"]])
        assert r["margin"] == pytest.approx(r[f"score_{w}"] - r[f"score_{l}"])
        assert json.loads(r["scores_0"]) == {"fn:gen_scorers:brightness": r["score_0"]}
    unpaired = pq.read_table(out / "unpaired").to_pylist()
    assert sorted(r["label"] for r in unpaired) == [0, 0, 0, 1, 1, 1]  # floor(0.25 * 12) = 3 each

    from ncp.config import load_config
    from ncp.data import LoaderOptions, build_source
    from ncp.train import recipe

    for fmt, folder, n in (("pairs", "pairs", 4), ("unpaired", "unpaired", 6)):
        cfg = load_config(recipe("default", [])[0], [f"data.sources=[{out / folder}/*.parquet]", f"data.format={fmt}",
                                                     "data.absolute_winners=false", "data.batch_size=1"])
        assert len(build_source(LoaderOptions.from_config(cfg.data, cfg.train.seed))) == n  # batches of one


def test_generate_is_deterministic_and_resumes_after_a_kill(tiny_sd15, tmp_path):
    prompts = prompts_file(tmp_path, 6)
    whole = tmp_path / "whole"
    run(whole, gen_settings(tiny_sd15, prompts, shard_prompts=1), Runtime(batch_size=3, threads=1))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ncp.generate", "--out", str(killed), "--model", str(tiny_sd15), "--prompts",
           str(prompts), "-n", "3", "--steps", "2", "--guidance", "2.0", "--shard-prompts", "1", "--batch-size", "3",
           "--threads", "1", "--scorers", "fn:gen_scorers:slow_brightness"]
    proc = subprocess.Popen(cmd, env=ENV | {"NCP_TEST_SCORER_SLEEP": "1.5"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = killed / "samples" / "samples-00000.parquet"
    deadline = time.time() + 120
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted((killed / "samples").glob("samples-*.parquet"))
    assert first in written and len(written) < 6, "the kill came too late to test a resume"
    for f in written:  # a file under its final name is whole (a half-written one stays under a .tmp- name)
        assert pq.read_table(f).num_rows == 3
    mtime = first.stat().st_mtime_ns
    # a prompt file edited in between is refused (every shard's prompts would shift), and so is a changed setting
    original = prompts.read_text()
    prompts.write_text(original.replace("number 2", "number two"))
    try:
        with pytest.raises(GenerateError, match="prompts_sha256"):
            run(killed, gen_settings(tiny_sd15, prompts, shard_prompts=1, scorers="fn:gen_scorers:slow_brightness"),
                Runtime(batch_size=3, threads=1))
    finally:
        prompts.write_text(original)
    with pytest.raises(GenerateError, match="images_per_prompt: 3 -> 4"):
        run(killed, gen_settings(tiny_sd15, prompts, shard_prompts=1, images_per_prompt=4,
                                 scorers="fn:gen_scorers:slow_brightness"), Runtime(batch_size=3, threads=1))
    resumed = run(killed, gen_settings(tiny_sd15, prompts, shard_prompts=1, scorers="fn:gen_scorers:slow_brightness"),
                  Runtime(batch_size=2, threads=1))  # another batch size: the same images
    assert first.stat().st_mtime_ns == mtime  # the written shard was skipped, not redone
    assert resumed["sampling"]["shards_done_before"] == len(written)
    a = pq.read_table(whole / "samples").to_pylist()
    b = pq.read_table(killed / "samples").to_pylist()
    assert [(r["prompt"], r["seed"]) for r in a] == [(r["prompt"], r["seed"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["score"] == pytest.approx(rb["score"], abs=2e-3)  # batch size changes float rounding only
    assert pq.read_table(killed / "pairs").num_rows == pq.read_table(whole / "pairs").num_rows == 6


def test_generate_cli_errors_name_the_input(tiny_sd15, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ncp.generate", "--out", str(tmp_path / "o"), *args],
                              env=ENV, capture_output=True, text=True, timeout=300)

    r = cli("--prompts", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt: no such file" in r.stderr
    prompts = prompts_file(tmp_path, 2)
    r = cli("--prompts", str(prompts), "--model", str(tiny_sd15), "--pairs", "best")
    assert r.returncode == 2 and "pair rule 'best'" in r.stderr
    r = cli("--prompts", str(prompts), "--model", str(tiny_sd15), "--scorers", "imagereward:/x")
    assert r.returncode == 2 and "unknown scorer 'imagereward'" in r.stderr
    r = cli("--prompts", str(prompts), "--model", str(tiny_sd15), "--exclude", str(prompts))
    assert r.returncode == 2 and "no prompts left" in r.stderr
    r = cli("--prompts", str(prompts), "--model", str(tiny_sd15), "--scheduler", "NoSuchScheduler", "--steps", "1")
    assert r.returncode == 2 and "unknown diffusers scheduler 'NoSuchScheduler'" in r.stderr
    assert not (tmp_path / "o" / "samples").exists()  # nothing sampled before an input error


def test_another_scheduler_changes_the_images(tiny_sd15, tmp_path):
    prompts = prompts_file(tmp_path, 1)
    common = dict(images_per_prompt=2, shard_prompts=1)
    run(tmp_path / "ddim", gen_settings(tiny_sd15, prompts, **common), Runtime(threads=1), pairs="none")
    run(tmp_path / "euler", gen_settings(tiny_sd15, prompts, scheduler="EulerDiscreteScheduler", **common),
        Runtime(threads=1), pairs="none")
    a = pq.read_table(tmp_path / "ddim" / "samples").column("jpg").to_pylist()
    b = pq.read_table(tmp_path / "euler" / "samples").column("jpg").to_pylist()
    assert a != b and not (tmp_path / "ddim" / "pairs").exists()


# ---------------------------------------------------------------- train.init_from and the rounds


def test_init_from_loads_the_lora_and_the_optimizer_moments(tiny_sd15, tiny_parquet, tmp_path):
    import torch

    from fixtures import cli_args
    from ncp.train import parse_args, train
    from ncp.trainer import init_from, setup

    first = tmp_path / "first"
    train(parse_args(cli_args(tiny_sd15, tiny_parquet, first, "train.max_steps=2"))[0])
    ckpt = first / "step-000002"
    cfg = parse_args(cli_args(tiny_sd15, tiny_parquet, tmp_path / "second", "train.max_steps=1",
                              "train.seed=5"))[0]
    tr = setup(cfg)
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]
    init_from(tr, str(ckpt))
    state = tr.optimizer.state_dict()
    assert state["param_groups"][0]["lr"] == pytest.approx(tr.optimizer.param_groups[0]["lr"])
    for k, v in saved["state"].items():
        torch.testing.assert_close(state["state"][k]["exp_avg"], v["exp_avg"])
    from ncp.models import lora_state_dict

    fresh = setup(cfg)
    init_from(fresh, str(first / "lora"))  # an exported LoRA: the weights alone
    mine, theirs = lora_state_dict(tr.base), lora_state_dict(fresh.base)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not fresh.optimizer.state_dict()["state"]


def onpolicy_cmd(out: Path, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ncp.onpolicy", "--out", str(out), "--rounds", str(rounds), "--round-steps", "2",
            "--max-prompts", "3", "--shard-prompts", "1", "-n", "2", "--steps", "2", "--threads", "1", "--batch-size", "2",
            "--scorers", "fn:gen_scorers:slow_brightness", "data.batch_size=2", "train.report=false",
            "logging.progress=false", "logging.tensorboard=false", "train.cpu_threads=1", "objective.name=dpo", *extra]


def test_rounds_train_on_policy_and_resume_after_a_kill(tmp_path):
    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    r = subprocess.run(onpolicy_cmd(whole, 2), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = [json.loads((whole / f"round-{i:03d}" / "done.json").read_text()) for i in range(2)]
    assert [d["pairs"] for d in done] == [3, 3]
    cfg1 = json.loads((whole / "round-001" / "train" / "step-000002" / "config.json").read_text())
    assert cfg1["train"]["init_from"] == str(whole / "round-000" / "train" / "step-000002")
    seeds0 = set(pq.read_table(whole / "round-000" / "generate" / "samples").column("seed").to_pylist())
    seeds1 = set(pq.read_table(whole / "round-001" / "generate" / "samples").column("seed").to_pylist())
    assert not seeds0 & seeds1  # every round draws new samples
    models1 = set(pq.read_table(whole / "round-001" / "generate" / "samples").column("model").to_pylist())
    assert models1 == {f"bundle+{whole / 'round-000' / 'train' / 'lora'}"}  # round 1 samples round 0's policy

    # killed while round 1 generates, then the same command again: round 0 is not redone, the result is the same
    killed = tmp_path / "killed"
    proc = subprocess.Popen(onpolicy_cmd(killed, 2), env=ENV | {"NCP_TEST_SCORER_SLEEP": "1.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "round-001" / "generate" / "samples" / "samples-00000.parquet"
    deadline = time.time() + 300
    while not marker.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "round-000" / "done.json").is_file() and not (killed / "round-001" / "done.json").exists()
    mtime = (killed / "round-000" / "done.json").stat().st_mtime_ns
    r = subprocess.run(onpolicy_cmd(killed, 2), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (killed / "round-000" / "done.json").stat().st_mtime_ns == mtime
    a = load_file(str(whole / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=0, atol=1e-6)

    # other settings in the same folder are refused; more rounds continue it
    r = subprocess.run(onpolicy_cmd(killed, 2, "--images-per-prompt", "3"), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "images_per_prompt: 2 -> 3" in r.stderr


def test_fewer_pairs_than_a_batch_is_named(tiny_sd15, tmp_path):
    from fixtures import cli_args
    from ncp.data.batch import DataError
    from ncp.train import parse_args, train

    prompts = prompts_file(tmp_path, 2)
    run(tmp_path / "gen", gen_settings(tiny_sd15, prompts), Runtime(threads=1))  # 2 pairs
    args = cli_args(tiny_sd15, f"{tmp_path / 'gen' / 'pairs'}/*.parquet", tmp_path / "run", "train.max_steps=1",
                    "data.batch_size=4", "data.backend=rust")
    with pytest.raises(DataError, match="no full batch: fewer items than data.batch_size=4"):
        train(parse_args(args)[0])


def test_generate_scores_with_a_weighted_clip_model_and_the_judge(tiny_sd15, tmp_path):
    """A random-weight CLIP folder (PickScore-style) and the judge, weighed, in the scoring process: the written
    reward is the weighted sum of the parts written beside it, and the CLIP part is what CLIPScorer gives."""
    from test_evaluate import tiny_clip

    from ncp.scoring import CLIPScorer

    clip = tiny_clip(tmp_path / "clip")
    prompts = prompts_file(tmp_path, 2)
    spec = f"pickscore:{clip}@0.25,judge@2"
    run(tmp_path / "gen", gen_settings(tiny_sd15, prompts, scorers=spec), Runtime(threads=1), pairs="margin:0")
    rows = pq.read_table(tmp_path / "gen" / "samples").to_pylist()
    from ncp.sampling import generate, load_pipeline

    # the same images again, before any JPEG: the seeds written beside each row redraw it
    images = generate(load_pipeline(tiny_sd15), [r["prompt"] for r in rows], [r["seed"] for r in rows], 2, 2.0)
    direct = CLIPScorer(str(clip), "pickscore")(images, [r["prompt"] for r in rows])
    for r, d in zip(rows, direct):
        parts = json.loads(r["scores"])
        assert set(parts) == {f"pickscore:{clip.name}", "judge"}
        assert r["score"] == pytest.approx(0.25 * parts[f"pickscore:{clip.name}"] + 2 * parts["judge"])
        assert parts[f"pickscore:{clip.name}"] == pytest.approx(d, abs=1e-3)


def test_rounds_of_unpaired_kto_labels(tmp_path):
    """--unpaired gives each round KTO's desirable / undesirable images instead of pairs (data.format=unpaired)."""
    out = tmp_path / "kto"
    cmd = [a for a in onpolicy_cmd(out, 2, "--unpaired", "quantile:0.34") if a != "objective.name=dpo"]
    r = subprocess.run(cmd + ["objective.name=kto"], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(2):
        done = json.loads((out / f"round-{i:03d}" / "done.json").read_text())
        assert done["unpaired"] == {"rule": "quantile:0.34", "desirable": 2, "undesirable": 2, "dropped": 2}
        cfg = json.loads((out / f"round-{i:03d}" / "train" / "step-000002" / "config.json").read_text())
        assert cfg["data"]["format"] == "unpaired" and cfg["objective"]["name"] == "kto"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.cuda
def test_generate_on_the_gpu_scores_like_the_cpu(tiny_sd15, tmp_path):
    """fp32 on the GPU: the same seeds (CPU noise) give the same images up to the GPU's rounding."""
    prompts = prompts_file(tmp_path, 2)
    run(tmp_path / "cpu", gen_settings(tiny_sd15, prompts), Runtime(threads=1), pairs="none")
    run(tmp_path / "gpu", gen_settings(tiny_sd15, prompts), Runtime(device="cuda"), pairs="none")
    a = pq.read_table(tmp_path / "cpu" / "samples").to_pylist()
    b = pq.read_table(tmp_path / "gpu" / "samples").to_pylist()
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["score"] == pytest.approx(rb["score"], abs=5e-3)


def test_judge_part_is_checked_in_one_place():
    """A spec and a JudgeScorer built by hand refuse an unknown part with the same message; known ones pass."""
    from ncp import scoring

    for build in (lambda: scoring.JudgeScorer("beauty"), lambda: scoring.JudgeScorer.check_part("beauty")):
        with pytest.raises(ValueError, match=r"judge part 'beauty': known parts are score, alignment, quality"):
            build()
    assert scoring.JudgeScorer("alignment").name == "judge.alignment"
    assert scoring.JudgeScorer.check_part("quality") == "quality"

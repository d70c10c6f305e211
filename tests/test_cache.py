"""The latent cache (`python -m ncp.cache`, `ncp.data.cache`) on tiny models built from configs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

ncp_dataloader = pytest.importorskip("ncp_dataloader", reason="the Rust loader wheel is not installed")

from fixtures import build_tiny_sd15, random_pairs, write_pickapic_parquet  # noqa: E402
from ncp.data.cache import (FORMAT, CachedPairSource, CacheTargetError, CorruptCacheError,  # noqa: E402
                            StaleCacheError, build_cache, check_cache, main, read_index, verify_files)
from ncp.data.rust import RustPairSource  # noqa: E402
from ncp.models import encode_prompts, load_models  # noqa: E402
from ncp.trainer import batch_latents  # noqa: E402

RES = 32


def _encoders(model):
    """The VAE and text encoder(s) as the cache writer loads them."""
    return load_models(str(model), "auto", torch.device("cpu"), torch.float32, with_unet=False)


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return str(tiny_sd15)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = random_pairs(14, size=36, seed=3, ties=2)
    for i, r in enumerate(rows):
        r["caption"] = f"caption {i % 5}"  # repeated captions: embedded once each
    return str(write_pickapic_parquet(d / "train.parquet", rows))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, sd15, shard):
    return build_cache(sd15, [shard], tmp_path_factory.mktemp("cache") / "c", RES, flip=True, batch_size=5,
                       shard_size=4)


def test_index_and_layout(cache, shard):
    index = read_index(cache)
    assert index["num_pairs"] == index["num_valid"] == 12  # 14 rows, 2 ties
    assert index["flips"] == 2 and index["num_captions"] == 5
    assert len(index["pair_shards"]) == 3 and index["latent_shape"] == [4, RES // 2, RES // 2]
    assert index["key"]["resolution"] == RES and index["key"]["crop"] == "center" and index["key"]["flip"] is True
    assert index["format"] == FORMAT == "ncp-latent-cache/2"
    # every other file of the folder has its size and xxh3-64 in the index
    assert sorted(index["files"]) == sorted(p.name for p in cache.iterdir() if p.name != "index.json")
    assert all(e["size"] == (cache / n).stat().st_size and len(e["xxh3"]) == 16 for n, e in index["files"].items())


def test_cache_batches_equal_pixel_batches_encoded(cache, sd15, shard):
    """Same pairs, flips and dropped prompts as the Rust loader; same posterior and embeddings, so the
    same latent sample for the same generator, hence the same loss."""
    kw = dict(batch_size=4, seed=7, empty_prompt_prob=0.4)
    cached = CachedPairSource(cache, **kw, random_flip=True)
    pixels = RustPairSource([shard], RES, random_flip=True, random_crop=False, **kw)
    models = _encoders(sd15)
    n_dropped = 0
    for epoch in range(2):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        pairs = list(zip(cached, pixels))
        assert len(pairs) == 3
        for c, p in pairs:
            assert torch.equal(c.indices, p.indices) and c.captions == p.captions
            assert torch.equal(c.original_sizes, p.original_sizes) and torch.equal(c.crop_top_left, p.crop_top_left)
            g1, g2 = torch.Generator().manual_seed(epoch), torch.Generator().manual_seed(epoch)
            torch.testing.assert_close(batch_latents(c, models, g1), batch_latents(p, models, g2),
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(c.prompt_embeds, encode_prompts(models, p.captions).hidden_states,
                                       atol=1e-5, rtol=1e-4)
            n_dropped += sum(cap == "" for cap in c.captions)
    assert n_dropped > 0


def test_flipped_latents_are_the_mirror_images(cache, sd15):
    src = CachedPairSource(cache, batch_size=12, random_flip=False)
    (b,) = list(src)
    assert b.latents.shape == (24, 2, 4, RES // 2, RES // 2) and b.winners is None
    flipped = CachedPairSource(cache, batch_size=12, random_flip=True, seed=1)
    (f,) = list(flipped)
    flips, _ = ncp_dataloader.augment_draws(1, 0, f.indices.tolist(), True, 0.0)
    assert flips.any() and not flips.all()


def test_resume_mid_epoch(cache):
    a = CachedPairSource(cache, batch_size=3, seed=2, empty_prompt_prob=0.5)
    want = list(a)
    b = CachedPairSource(cache, batch_size=3, seed=2, empty_prompt_prob=0.5)
    it = iter(b)
    head = [next(it)]
    state = b.state()
    c = CachedPairSource(cache, batch_size=3, seed=2, empty_prompt_prob=0.5)
    c.resume(state)
    got = head + list(c)
    assert [x.indices.tolist() for x in got] == [x.indices.tolist() for x in want]
    assert all(torch.equal(x.latents, y.latents) and x.captions == y.captions for x, y in zip(got, want))


def test_stale_cache_is_detected_and_named(cache, sd15, shard, tmp_path):
    check_cache(cache, model=sd15, sources=[shard], resolution=RES, flip=True, dtype="float32", deep=True)
    with pytest.raises(StaleCacheError, match="resolution: cache has 32, the run has 64"):
        check_cache(cache, resolution=64)
    with pytest.raises(StaleCacheError, match="resolution"):
        CachedPairSource(cache, batch_size=2, resolution=64)
    other = str(build_tiny_sd15(tmp_path / "other", seed=1))
    with pytest.raises(StaleCacheError, match=r"vae\.weights_sha256"):
        check_cache(cache, model=other)
    # one image changed: the file size tells, and the deep check names the pair
    rows = random_pairs(14, size=36, seed=3, ties=2)
    for i, r in enumerate(rows):
        r["caption"] = f"caption {i % 5}"
    rows[5]["jpg_1"] = rows[6]["jpg_1"]
    changed = write_pickapic_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(StaleCacheError, match=r"(?s)sources: cache has.*pair \d+ .*images changed"):
        check_cache(cache, sources=[str(changed)], deep=True)
    with pytest.raises(StaleCacheError, match="no index.json"):
        check_cache(tmp_path)


def test_corrupt_pairs_are_skipped_in_the_cache(tmp_path, sd15):
    rows = random_pairs(8, size=36, seed=5, ties=0)
    rows[2]["jpg_0"] = rows[2]["jpg_0"][:100]
    path = str(write_pickapic_parquet(tmp_path / "bad.parquet", rows))
    out = build_cache(sd15, [path], tmp_path / "c", RES, batch_size=3)
    index = read_index(out)
    assert index["num_pairs"] == 8 and index["num_valid"] == 7
    assert "bad.parquet row 2" in index["skipped"][0]
    src = CachedPairSource(out, batch_size=8, drop_last=False)
    (b,) = list(src)
    assert sorted(b.indices.tolist()) == [0, 1, 3, 4, 5, 6, 7] and src.stats()["skipped"] == 1


def test_cli_build_and_check(tmp_path, sd15, shard, capsys):
    out = str(tmp_path / "cli")
    assert main(["--model", sd15, "--sources", shard, "--out", out, "--resolution", str(RES)]) == 0
    assert main(["--model", sd15, "--sources", shard, "--out", out, "--resolution", str(RES), "--check"]) == 0
    assert main(["--model", sd15, "--sources", shard, "--out", out, "--resolution", "16", "--check"]) == 1
    assert "resolution" in capsys.readouterr().err


def test_sdxl_cache_has_pooled_embeddings(tmp_path, shard, tiny_sdxl):
    model = str(tiny_sdxl)
    out = build_cache(model, [shard], tmp_path / "c", RES, batch_size=6)
    src = CachedPairSource(out, batch_size=4, random_flip=False)
    b = next(iter(src))
    models = _encoders(model)
    cond = encode_prompts(models, b.captions)
    torch.testing.assert_close(b.prompt_embeds, cond.hidden_states, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.pooled_prompt_embeds, cond.pooled, atol=1e-5, rtol=1e-4)
    assert read_index(out)["key"]["model_kind"] == "sdxl"
    np.testing.assert_array_equal(b.original_sizes.numpy(), [[36, 44]] * 4)


def test_training_from_the_cache_gives_the_pixel_losses(tmp_path, sd15, tiny_parquet):
    """`ncp.train` on data.backend=rust (pixels, VAE each step) and on data.cache_dir: same losses."""
    from ncp.train import main as train_main

    cache_dir = build_cache(sd15, [str(tiny_parquet)], tmp_path / "cache", RES, flip=True, batch_size=4)
    common = ["--config=default", f"model.path={sd15}", f"data.sources=[{tiny_parquet}]", f"data.resolution={RES}", "data.batch_size=2",
              "data.absolute_winners=false", "data.num_workers=1", "data.empty_prompt_prob=0.5", "lora.rank=4", "train.max_steps=4",
              "objective.name=ncp-dpo", "objective.beta=5000", "optim.lr=1e-3", "optim.warmup_steps=1",
              "logging.progress=false",
              "logging.tensorboard=false", "train.report=false"]
    runs = {}
    for name, extra in (("pixels", ["data.backend=rust"]), ("cache", [f"data.cache_dir={cache_dir}"])):
        out = tmp_path / name
        assert train_main([*common, *extra, f"train.output_dir={out}"]) == 0
        runs[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["pixels"]) == 4
    np.testing.assert_allclose(runs["cache"], runs["pixels"], rtol=1e-4, atol=1e-6)


def test_training_refuses_a_mismatched_cache(tmp_path, sd15, tiny_parquet, capsys):
    """A cache built at another resolution is named as stale by `ncp.train`, never used."""
    from ncp.train import main as train_main

    cache_dir = build_cache(sd15, [str(tiny_parquet)], tmp_path / "cache", RES, flip=False, batch_size=4)
    args = ["--config=default", f"model.path={sd15}", f"data.sources=[{tiny_parquet}]", f"data.resolution={RES * 2}",
            "data.batch_size=2", "data.absolute_winners=false", f"data.cache_dir={cache_dir}", "lora.rank=4", "train.max_steps=1",
            "logging.progress=false", "train.report=false", f"train.output_dir={tmp_path}/o"]
    assert train_main(args) == 2
    assert "resolution" in capsys.readouterr().err


# ---------------------------------------------------------------- integrity: hashes, atomic rebuild


def _damaged(cache, tmp_path, name, damage):
    """A copy of ``cache`` whose file ``name`` was changed by ``damage(bytearray) -> bytes``."""
    copy = tmp_path / "damaged"
    shutil.copytree(cache, copy)
    path = copy / name
    path.write_bytes(damage(bytearray(path.read_bytes())))
    return copy


def _flip_byte(data: bytearray) -> bytes:
    data[len(data) // 2] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize("name, damage, message", [
    ("pairs-00001.safetensors", _flip_byte, "has other bytes than when it was written"),
    ("embeds-00000.safetensors", lambda d: bytes(d[:len(d) - 100]), r"has \d+ bytes, index.json says \d+ \(truncated"),
    ("pairs-00000.safetensors", lambda d: b"\xff" * 8 + bytes(d[8:]), "has other bytes"),
    ("captions.json", lambda d: bytes(d).replace(b"caption 1", b"caption 7"), "has other bytes"),
])
def test_a_damaged_file_is_named_on_open_and_by_check(cache, shard, sd15, tmp_path, capsys, name, damage, message):
    """A flipped byte, a truncated shard, a bad header, a changed caption: opening the cache (as training does)
    and ``--check`` raise one line naming the file."""
    copy = _damaged(cache, tmp_path, name, damage)
    with pytest.raises(CorruptCacheError, match=f"latent cache file {copy / name} {message}") as err:
        CachedPairSource(copy, batch_size=2)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(CorruptCacheError, match=name):
        verify_files(copy, read_index(copy))
    args = ["--model", sd15, "--sources", shard, "--out", str(copy), "--resolution", str(RES), "--flip", "--check"]
    assert main(args) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and name in err_lines[0] and err_lines[0].startswith("error: latent cache file")


def test_a_bad_header_is_named_even_with_a_matching_hash(cache, tmp_path):
    """The reader's own header parse names the file too (a header whose length or offsets do not fit)."""
    from ncp.data.cache.read import _map

    path = _damaged(cache, tmp_path, "pairs-00000.safetensors", lambda d: (10**9).to_bytes(8, "little") + d[8:])
    with pytest.raises(CorruptCacheError, match=r"pairs-00000.safetensors: bad safetensors header \(header length"):
        _map(path / "pairs-00000.safetensors")
    path.joinpath("x.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, 3]}    ')
    with pytest.raises(CorruptCacheError, match="x.safetensors: bad safetensors header"):
        _map(path / "x.safetensors")


def test_an_old_format_or_unreadable_index_is_refused(cache, tmp_path):
    from ncp.data.cache.key import is_cache

    copy = tmp_path / "old"
    shutil.copytree(cache, copy)
    index = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**index, "format": "ncp-latent-cache/1"}))
    with pytest.raises(StaleCacheError, match=r"format 'ncp-latent-cache/1', this ncp reads 'ncp-latent-cache/2'.*"
                                              r"rebuild it with `python -m ncp.cache \.\.\. --overwrite`"):
        CachedPairSource(copy, batch_size=2)
    assert is_cache(copy)  # so --overwrite may replace it
    (copy / "index.json").write_text('{"format": "ncp-latent-cache/2", "key": ')
    with pytest.raises(CorruptCacheError, match=r"latent cache index .*index.json cannot be read"):
        read_index(copy)


def test_a_killed_rebuild_leaves_the_old_cache(tmp_path, sd15, shard, monkeypatch):
    """A rebuild that dies mid-way (an exception after the first shard) leaves the old cache whole and in use,
    and no temporary folder; a killed one's temporary folder (its pid gone) is removed by the next build."""
    from ncp.data.cache import write

    out = build_cache(sd15, [shard], tmp_path / "c", RES, batch_size=5, shard_size=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def dies_on_the_second_batch(vae, pixels):
        calls.append(1)
        if len(calls) == 2:
            assert list(tmp_path.glob(".c.tmp-*/pairs-00000.safetensors"))  # half a cache is on disk
            raise KeyboardInterrupt
        return real(vae, pixels)

    real = write._posterior
    monkeypatch.setattr(write, "_posterior", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_cache(sd15, [shard], out, 16, batch_size=5, shard_size=4, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    verify_files(out, read_index(out))
    assert len(list(CachedPairSource(out, batch_size=4))) == 3

    stale = tmp_path / ".c.tmp-4194305"  # above Linux's largest pid: a writer that no longer runs
    (stale / "pairs-00000.safetensors").parent.mkdir()
    (stale / "pairs-00000.safetensors").write_bytes(b"half")
    rebuilt = build_cache(sd15, [shard], out, 16, batch_size=5, shard_size=4, overwrite=True)
    assert read_index(rebuilt)["key"]["resolution"] == 16 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_rebuild_needs_overwrite_and_replaces_caches_only(tmp_path, sd15, shard, capsys):
    args = ["--model", sd15, "--sources", shard, "--resolution", "16", "--shard-size", "8"]
    out = tmp_path / "c"
    assert main([*args, "--out", str(out)]) == 0  # a new folder
    first = read_index(out)
    assert main([*args, "--out", str(out)]) == 2
    assert "holds a latent cache; pass --overwrite to rebuild it" in capsys.readouterr().err
    assert read_index(out) == first
    assert main([*args, "--out", str(out), "--overwrite", "--flip"]) == 0
    assert read_index(out)["flips"] == 2
    (tmp_path / "empty").mkdir()
    assert main([*args, "--out", str(tmp_path / "empty")]) == 0  # an empty folder needs no --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(other), *extra]) == 2
        assert "holds no latent cache" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(CacheTargetError, match="is a file"):
        build_cache(sd15, [shard], other / "notes.txt", 16)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_training_names_a_corrupt_cache_in_one_line(cache, tmp_path, sd15, shard, capsys):
    """`ncp.train` on a cache with a flipped byte: exit 2, one line naming the shard, no step taken."""
    from ncp.train import main as train_main

    copy = _damaged(cache, tmp_path, "pairs-00002.safetensors", _flip_byte)
    args = ["--config=default", f"model.path={sd15}", f"data.sources=[{shard}]", f"data.resolution={RES}", "data.batch_size=2",
            "data.absolute_winners=false", f"data.cache_dir={copy}", "lora.rank=4", "train.max_steps=1",
            "logging.progress=false", "logging.tensorboard=false", "train.report=false",
            f"train.output_dir={tmp_path}/o"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error")]  # beside it: progress bars of model loading
    assert line.startswith(f"error: latent cache file {copy / 'pairs-00002.safetensors'} has other bytes")
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()

"""Unpaired binary feedback (data.format=unpaired): rows of (caption, image, label) through the Rust loader,
the torch + PIL backend and the latent cache, on the one source contract; and KTO training on them.

The data are written here: parquet files and a JSONL file of real JPEG and PNG images, the labels in every
accepted form (booleans, 0/1, "desirable"/"undesirable") and in forms that are refused.
"""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fixtures import cli_args, jpeg_bytes, overrides_of
from ncp.config import ConfigError, load_config
from ncp.data.batch import DataError, UnpairedBatch
from ncp.data.options import LoaderOptions
from ncp.data.items import image_uid
from ncp.data.contract import STATE_KEYS, PairSource, endless, rank_share
from ncp.data.sources import build_source
from ncp.train import main

ncp_dataloader = pytest.importorskip("ncp_dataloader", reason="the Rust loader wheel is not installed")

RES = 16
N = 11  # rows: 3 batches of 3 per epoch with drop_last
LABELS = [True, False, True, True, False, True, False, False, True, True, False]
FORMS = {  # the same labels in each accepted form, as parquet columns
    "bool": pa.array(LABELS, pa.bool_()),
    "int": pa.array([int(x) for x in LABELS], pa.int64()),
    "float": pa.array([float(x) for x in LABELS], pa.float64()),
    "string": pa.array(["desirable" if x else "undesirable" for x in LABELS], pa.string()),
    # pandas' `category` dtype is written as a dictionary-encoded column
    "category": pa.array(["desirable" if x else "undesirable" for x in LABELS], pa.string()).dictionary_encode(),
    "int-category": pa.array([int(x) for x in LABELS], pa.int64()).dictionary_encode(),
}


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def images(n: int, seed: int = 0) -> list[bytes]:
    """n random images of varied sizes, JPEG and PNG alternately."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rgb = rng.integers(0, 256, (20 + 2 * (i % 3), 24 + 3 * (i % 4), 3), dtype=np.uint8)
        out.append(jpeg_bytes(rgb) if i % 2 == 0 else png_bytes(rgb))
    return out


def write_unpaired_parquet(path: Path, labels: pa.Array, names: dict[str, str] | None = None,
                           row_group_size: int = 4, seed: int = 0) -> str:
    names = {"caption": "caption", "image": "image", "label": "label", **(names or {})}
    table = pa.table({names["caption"]: pa.array([f"picture {i}" for i in range(len(labels))]),
                      names["image"]: pa.array(images(len(labels), seed), pa.binary()),
                      names["label"]: labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def write_unpaired_jsonl(folder: Path, labels: list, keys: dict[str, str] | None = None) -> str:
    """A JSONL file of {caption, image, label} with the images beside it (a sub-folder, relative paths)."""
    keys = {"caption": "caption", "image": "image", "label": "label", **(keys or {})}
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (data, label) in enumerate(zip(images(len(labels), seed=1), labels)):
        name = f"img/{i}.{'jpg' if i % 2 == 0 else 'png'}"
        (folder / name).write_bytes(data)
        lines.append(json.dumps({keys["caption"]: f"picture {i}", keys["image"]: name, keys["label"]: label}))
        if i == 4:
            lines.append("")  # blank lines are skipped, lines keep their numbers
    path = folder / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_unpaired_parquet(tmp_path_factory.mktemp("u") / "u.parquet", FORMS["string"])


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    forms = {True: [True, 1, "desirable", 1.0], False: [False, 0, "undesirable", 0.0]}
    mixed = [forms[x][i % 4] for i, x in enumerate(LABELS)]
    return write_unpaired_jsonl(tmp_path_factory.mktemp("j"), mixed)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_sd15, shard):
    from ncp.data.cache import build_cache

    return build_cache(str(tiny_sd15), [shard], tmp_path_factory.mktemp("cache") / "c", RES, batch_size=4,
                       data_format="unpaired")


def source(backend: str, sources: list[str], **kw) -> PairSource:
    """A source of unpaired rows: rust, torch, or the latent cache (``cache_dir=`` given)."""
    kw = {"batch_size": 3, "seed": 3, "num_workers": 0, **kw}
    options = LoaderOptions(sources=tuple(sources), resolution=RES, format="unpaired", backend=backend, **kw)
    return build_source(options)


BACKENDS = ["rust", "torch", "cache"]


@pytest.fixture
def make(request, shard):
    def build(backend: str, **kw) -> PairSource:
        if backend == "cache":
            kw["cache_dir"] = str(request.getfixturevalue("cache_dir"))
            backend = "rust"
        return source(backend, [shard], **kw)
    return build


def everything(src: PairSource) -> dict[int, tuple]:
    """index -> (caption, label, pixels) over one epoch of batch size 1."""
    out = {}
    for b in src:
        assert isinstance(b, UnpairedBatch) and b.images is not None and b.images.dtype == torch.uint8
        for j, i in enumerate(b.indices.tolist()):
            out[i] = (b.captions[j], bool(b.desirable[j]), b.images[j].numpy().astype(int),
                      tuple(b.original_sizes[j].tolist()))
    return out


# ---------------------------------------------------------------- labels and the two pixel backends


@pytest.mark.parametrize("form", sorted(FORMS))
def test_rust_and_torch_yield_the_same_items(tmp_path, form):
    path = write_unpaired_parquet(tmp_path / "u.parquet", FORMS[form])
    got = {b: everything(source(b, [path], batch_size=1, random_flip=False)) for b in ("rust", "torch")}
    assert sorted(got["rust"]) == sorted(got["torch"]) == list(range(N))
    for i in range(N):
        (rc, rl, rp, rs), (tc, tl, tp, ts) = got["rust"][i], got["torch"][i]
        assert (rc, rl, rs) == (tc, tl, ts) == (f"picture {i}", LABELS[i], ts)
        d = np.abs(rp - tp)  # JPEG decoders differ by a little (most at the edge of a noise image); PNGs by the
        # resize's rounding only
        assert d.mean() <= 1.0 and d.max() <= (16 if i % 2 == 0 else 1), (i, d.mean(), d.max())


def test_jsonl_rows_with_mixed_labels_and_renamed_keys(tmp_path, jsonl):
    keys = {"caption": "prompt", "image": "file", "label": "good"}
    renamed = write_unpaired_jsonl(tmp_path, [[True, 0, "desirable", 1, "undesirable", False][i % 6]
                                              for i in range(N)], keys)
    want = [[True, False, True, True, False, False][i % 6] for i in range(N)]
    for path, columns, labels in ((jsonl, {}, LABELS), (renamed, keys, want)):
        got = {b: everything(source(b, [path], batch_size=1, random_flip=False, columns=columns))
               for b in ("rust", "torch")}
        assert [got["rust"][i][1] for i in range(N)] == [got["torch"][i][1] for i in range(N)] == labels
        for i in range(N):
            assert got["rust"][i][0] == got["torch"][i][0] == f"picture {i}"
            assert np.abs(got["rust"][i][2] - got["torch"][i][2]).mean() <= 1.0


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("bad, shown", [(pa.array([1, 0, 1, 2] + [0] * 7, pa.int64()), "label 2 is not"),
                                        (pa.array([0.5] + [1.0] * 10, pa.float64()), "label 0.5 is not"),
                                        (pa.array(["desirable"] * 3 + ["good"] + ["undesirable"] * 7),
                                         'label "good" is not'),
                                        (pa.array([True] * 3 + [None] + [False] * 7, pa.bool_()), "label null is not"),
                                        (pa.array(["desirable"] * 3 + ["good"] + ["undesirable"] * 7).dictionary_encode(),
                                         'label "good" is not')],
                         ids=["int", "float", "string", "null", "category"])
def test_a_bad_label_names_file_row_column_and_value(tmp_path, backend, bad, shown):
    path = write_unpaired_parquet(tmp_path / "bad.parquet", bad, names={"label": "feedback"})
    row = 0 if "0.5" in shown else 3
    with pytest.raises(DataError) as err:
        source(backend, [path], columns={"label": "feedback"})
    assert str(err.value).startswith(f"{path} row {row} column 'feedback': {shown} desirable/undesirable")


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_jsonl_errors_name_file_line_and_key(tmp_path, backend):
    path = Path(write_unpaired_jsonl(tmp_path, [True, "yes", False]))
    with pytest.raises(DataError, match=rf"^{path} line 2 key 'label': label \"yes\" is not desirable"):
        source(backend, [str(path)])
    path.write_text(json.dumps({"caption": "c", "image": "img/0.jpg"}) + "\n")
    with pytest.raises(DataError, match=rf"column 'label' \(logical 'label'\) not found in {path} line 1"):
        source(backend, [str(path)])


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_missing_and_unknown_columns_are_named(tmp_path, backend):
    path = write_unpaired_parquet(tmp_path / "u.parquet", FORMS["bool"], names={"image": "png"})
    with pytest.raises(DataError, match=r"image"):
        source(backend, [path])
    assert len(source(backend, [path], columns={"image": "png"})) == 3
    with pytest.raises(DataError, match=r"jpg_0.*caption, image, label"):
        source(backend, [path], columns={"jpg_0": "png"})
    with pytest.raises(DataError, match="absolute_winners"):
        source(backend, [path], columns={"image": "png"}, absolute_winners=True)


def test_image_uid_is_the_rust_loaders(tmp_path):
    """The fallback uid of an image (no uid columns) is one string in both backends, nulls included."""
    for data in [*images(4), b"", b"not an image", None]:
        assert image_uid(data) == ncp_dataloader.image_uid(data)
    assert image_uid(b"abc") == "xxh3:78af5f94892f3950"  # xxh3-64 of b"abc"


# ---------------------------------------------------------------- the source contract, every backend


def ids(batch) -> list[int]:
    return batch.indices.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_resume_and_ranks(make, backend):
    src = make(backend)
    assert isinstance(src, PairSource) and len(src) == 3
    data, walk = endless(src), []
    for _ in range(9):  # the epoch a batch comes from: the state before it is taken
        walk.append((src.state()["epoch"], ids(next(data))))
    assert [e for e, _ in walk] == [0] * 3 + [1] * 3 + [2] * 3
    assert src.state() == {"epoch": 3, "sample_in_epoch": 0, "seed": 3, "world_size": 1, "rank": 0,
                           "batch_size": 3}
    epochs = [sum((b for _, b in walk[3 * e:3 * e + 3]), []) for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs) and epochs[0] != epochs[1]
    stats = src.stats()
    assert (stats["format"], stats["desirable"], stats["undesirable"], stats["skipped"]) == ("unpaired", 6, 5, 0)

    first = make(backend)
    head = [ids(b) for b in itertools.islice(endless(first), 4)]  # mid-epoch 1
    state = first.state()
    assert set(state) == set(STATE_KEYS) and (state["epoch"], state["sample_in_epoch"]) == (1, 3)
    resumed = make(backend)
    resumed.resume(dict(state))
    assert head + [ids(b) for b in itertools.islice(endless(resumed), 5)] == [b for _, b in walk]

    perm = np.array(sum((ids(b) for b in make(backend, batch_size=1)), []))  # epoch 0, all 11 rows
    shares = []
    for rank in range(2):
        mine = sum((ids(b) for b in make(backend, rank=rank, world_size=2, batch_size=2)), [])
        assert mine == rank_share(perm, rank, 2)[:4].tolist()
        shares.append(set(mine))
    assert not shares[0] & shares[1]


# ---------------------------------------------------------------- the latent cache


def test_cache_round_trip(cache_dir, tiny_sd15, shard):
    from ncp.data.cache import CachedPairSource, StaleCacheError, check_cache, read_index
    from ncp.data.rust import RustPairSource
    from ncp.models import load_models
    from ncp.data.batch import vae_posterior

    index = read_index(cache_dir)
    assert (index["num_pairs"], index["num_valid"], index["key"]["data_format"]) == (N, N, "unpaired")
    cached = CachedPairSource(cache_dir, batch_size=4, seed=5, random_flip=False)
    pixels = RustPairSource([shard], RES, batch_size=4, seed=5, random_flip=False, format="unpaired")
    vae = load_models(str(tiny_sd15), "auto", torch.device("cpu"), torch.float32, with_unet=False).vae
    for c, p in zip(cached, pixels):
        assert isinstance(c, UnpairedBatch) and c.images is None
        assert ids(c) == ids(p) and c.captions == p.captions and torch.equal(c.desirable, p.desirable)
        assert c.latents.shape[:2] == (len(c), 2) and c.prompt_embeds.shape[0] == len(c)
        with torch.no_grad():
            mean, logvar = vae_posterior(vae, p.images)
        torch.testing.assert_close(c.latents[:, 0], mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c.latents[:, 1], logvar, atol=1e-4, rtol=1e-4)
    check_cache(cache_dir, data_format="unpaired", sources=[shard], deep=True)
    with pytest.raises(StaleCacheError, match="data_format: cache has 'unpaired', the run has 'pairs'"):
        check_cache(cache_dir, data_format="pairs")


# ---------------------------------------------------------------- the trainer


def test_a_paired_objective_on_unpaired_data_is_a_config_error(tmp_path, tiny_sd15, shard):
    for name in ("dpo", "ncp-cpo", "mapo", "sft"):
        with pytest.raises(ConfigError, match=rf"objective.name={name} compares the two images of a pair.*kto"):
            load_config(None, overrides_of(cli_args(tiny_sd15, shard, tmp_path, "data.format=unpaired", f"objective.name={name}")))
    assert main(cli_args(tiny_sd15, shard, tmp_path, "data.format=unpaired", "objective.name=dpo")) == 2


@pytest.mark.parametrize("objective, backend", [("kto", "rust"), ("ncp-kto", "torch")])
def test_cli_trains_kto_on_unpaired_feedback(tiny_sd15, shard, tmp_path, objective, backend):
    out = tmp_path / "run"
    args = cli_args(tiny_sd15, shard, out, "data.format=unpaired", f"objective.name={objective}",
                    f"data.backend={backend}", "data.batch_size=3", "train.max_steps=3", "train.checkpoint_every=2",
                    "optim.lr=1e-3", "objective.beta_kto=5000")
    assert main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in lines)
    assert "rewards/kto_reference_point" in lines[0] and "err/reference_winner" in lines[0]
    state = json.loads((out / "step-000002" / "state.json").read_text())["data"]
    assert (state["epoch"], state["sample_in_epoch"]) == (0, 6)  # 3 images a step
    assert (out / "lora").is_dir()

"""The source contract, run through every backend (Rust loader, torch + PIL, latent cache).

The source owns the epoch counter: the trainer's endless batches walk epochs
0, 1, 2 (a trainer that bumped the epoch itself after the Rust loader had
already moved on walked 0, 2, 4). A resume at an epoch boundary and mid-epoch
continues the same sequence; ranks take disjoint pairs by the same rule.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from fixtures import random_pairs, write_pickapic_parquet
from ncp.data.batch import DataError
from ncp.data.contract import STATE_KEYS, PairSource, endless, rank_share

RES, BATCH = 16, 3
BACKENDS = ["rust", "torch", "cache"]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """13 rows, one tie: 12 pairs, 4 batches of 3 per epoch."""
    return str(write_pickapic_parquet(tmp_path_factory.mktemp("src") / "s.parquet",
                                      random_pairs(13, size=20, seed=4), row_group_size=5))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_sd15, shard):
    from ncp.data.cache import build_cache

    return build_cache(str(tiny_sd15), [shard], tmp_path_factory.mktemp("cache") / "c", RES, batch_size=6)


@pytest.fixture
def make(request, shard, tiny_sd15):
    """make(backend, **kw) -> a fresh source of the shard (seed 3, batches of 3 unless kw says otherwise)."""
    def build(backend: str, **kw) -> PairSource:
        kw = {"batch_size": BATCH, "seed": 3, **kw}
        if backend == "rust":
            from ncp.data.rust import RustPairSource

            return RustPairSource([shard], RES, random_flip=True, **kw)
        if backend == "torch":
            from ncp.data.torch_source import ItemDataset, TorchPairSource

            return TorchPairSource(ItemDataset([shard], RES, seed=kw["seed"]), **kw)
        from ncp.data.cache import CachedPairSource

        return CachedPairSource(request.getfixturevalue("cache_dir"), **kw)
    return build


def ids(batch) -> list[int]:
    return batch.indices.tolist()


def one_epoch(src: PairSource, epoch: int) -> list[list[int]]:
    src.set_epoch(epoch)
    return [ids(b) for b in src]


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_walks_epochs_0_1_2(make, backend):
    src = make(backend)
    assert isinstance(src, PairSource)
    n = len(src)
    assert n == 4
    epochs_before, got = [], []
    data = endless(src)
    for _ in range(3 * n):
        epochs_before.append(src.state()["epoch"])
        got.append(ids(next(data)))
    assert epochs_before == [0] * n + [1] * n + [2] * n
    assert src.state() == {"epoch": 3, "sample_in_epoch": 0, "seed": 3, "world_size": 1, "rank": 0,
                           "batch_size": BATCH}
    ref = make(backend)
    want = [b for e in range(3) for b in one_epoch(ref, e)]
    assert got == want
    assert [sorted(sum(got[e * n:(e + 1) * n], [])) for e in range(3)] == [list(range(12))] * 3
    assert got[:n] != got[n:2 * n]  # another permutation each epoch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", [4, 6], ids=["epoch-boundary", "mid-epoch"])
def test_resume_continues_the_same_sequence(make, backend, stop):
    full = [ids(b) for b in itertools.islice(endless(make(backend)), 10)]
    first = make(backend)
    head = [ids(b) for b in itertools.islice(endless(first), stop)]
    state = first.state()
    assert set(state) == set(STATE_KEYS)
    assert (state["epoch"], state["sample_in_epoch"]) == ((1, 0) if stop == 4 else (1, 2 * BATCH))
    resumed = make(backend)
    resumed.resume(dict(state))
    tail = [ids(b) for b in itertools.islice(endless(resumed), 10 - stop)]
    assert head + tail == full


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_refuses_another_order(make, backend):
    src = make(backend)
    state = src.state()
    for key, value in (("seed", 4), ("world_size", 2), ("batch_size", 2)):
        with pytest.raises(DataError, match=key):
            make(backend).resume({**state, key: value})
    with pytest.raises(DataError, match="multiple of batch_size"):
        make(backend).resume({**state, "sample_in_epoch": 1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_take_every_world_size_th_pair_of_the_permutation(make, backend):
    whole = make(backend, batch_size=1)
    perm = np.array(sum(one_epoch(whole, 2), []))  # the epoch-2 permutation, one pair a batch
    assert sorted(perm.tolist()) == list(range(12))
    shares = []
    for rank in range(3):
        src = make(backend, rank=rank, world_size=3, batch_size=2)
        assert len(src) == 2 and src.state()["rank"] == rank
        mine = sum(one_epoch(src, 2), [])
        assert mine == rank_share(perm, rank, 3)[:4].tolist()
        shares.append(set(mine))
    assert not (shares[0] & shares[1] or shares[0] & shares[2] or shares[1] & shares[2])

"""`ncp.data.expand.expand_sources` gives the Rust loader's answers on the same odd inputs."""
from __future__ import annotations

import pytest

import ncp_dataloader

from ncp.data.batch import DataError
from ncp.data.expand import expand_sources
from ncp.paths import bundle_path


@pytest.fixture
def tree(tmp_path, monkeypatch):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    for name in ("b.parquet", "a.parquet", ".hidden.parquet", "x[1].parquet", "x1.parquet", "notes.txt",
                 "UPPER.PARQUET", "pairs.jsonl", "sub/c.parquet"):
        (d / name).write_bytes(b"PAR1")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))  # read by both at call time
    return tmp_path


CASES = [
    ["data"],                      # a folder: its *.parquet, hidden ones too, sorted; not sub/ nor .PARQUET
    ["data/*.parquet"],            # a glob, hidden files included
    ["data/?.parquet", "data/a.parquet"],  # order kept, duplicates kept
    ["data/x[1].parquet"],         # an existing file is literal, though it looks like a glob
    ["data/x[0-9].parquet"],       # a glob that only matches x1.parquet
    ["~/data/a.parquet", "~/data/s*"],  # the home folder
    ["data/missing.parquet"],      # passed on for the reader to name
    ["data/pairs.jsonl"],
    ["data/*/c.parquet"],
]
FAILING = [[], ["data/*.nothing"], ["empty"], ["~/empty"]]


def rooted(tree, sources):
    return [s if s.startswith("~") else str(tree / s) for s in sources]


@pytest.mark.parametrize("sources", CASES, ids=[" ".join(c) for c in CASES])
def test_same_files_as_the_rust_loader(tree, sources):
    srcs = rooted(tree, sources)
    assert expand_sources(srcs) == ncp_dataloader.expand_sources(srcs)


def test_folder_rule_by_hand(tree):
    got = [p.removeprefix(str(tree / "data") + "/") for p in expand_sources([str(tree / "data")])]
    assert got == [".hidden.parquet", "a.parquet", "b.parquet", "x1.parquet", "x[1].parquet"]
    assert expand_sources([str(tree / "data/x[1].parquet")]) == [str(tree / "data/x[1].parquet")]


@pytest.mark.parametrize("sources", FAILING, ids=[" ".join(c) or "nothing" for c in FAILING])
def test_same_refusals_as_the_rust_loader(tree, sources):
    srcs = rooted(tree, sources)
    with pytest.raises(DataError):
        expand_sources(srcs)
    with pytest.raises((OSError, ValueError)):
        ncp_dataloader.expand_sources(srcs)


def test_bundle_and_jsonl_rules(tree):
    assert expand_sources("bundle") == sorted(str(p) for p in bundle_path("data").glob("*.parquet"))
    with pytest.raises(DataError, match="JSONL source must be the only source"):
        expand_sources([str(tree / "data/pairs.jsonl"), str(tree / "data/a.parquet")])

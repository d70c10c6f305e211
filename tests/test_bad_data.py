"""Bad training data is one named error (file, row or line, column or key), never a traceback: each case in
the backend it was found in, and what ``python -m ncp.train`` prints (exit 2, one line)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ncp_dataloader", reason="the Rust loader wheel is not installed")

from fixtures import cli_args, random_pairs, write_pickapic_parquet  # noqa: E402
from ncp.data import DataError  # noqa: E402
from ncp.data.rust import RustPairSource  # noqa: E402
from ncp.data.torch_source import ItemDataset  # noqa: E402
from ncp.train import main as train_main  # noqa: E402


def _int_jpg_0(path, uids: bool):
    """Pick-a-Pic rows whose ``jpg_0`` column holds integers (with or without the uid columns: without them,
    the loader reads the images while indexing, to hash them)."""
    rows = random_pairs(6, ties=0)
    table = {"caption": pa.array([r["caption"] for r in rows]), "jpg_0": pa.array(list(range(6)), pa.int64()),
             "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
             "label_0": pa.array([r["label_0"] for r in rows]), "label_1": pa.array([r["label_1"] for r in rows])}
    if uids:
        table |= {"image_0_uid": pa.array([f"a{i}" for i in range(6)]),
                  "image_1_uid": pa.array([f"b{i}" for i in range(6)])}
    pq.write_table(pa.table(table), path)
    return path


@pytest.mark.parametrize("uids", [True, False])
def test_an_int_image_column_is_named_by_the_rust_backend(tmp_path, uids):
    path = _int_jpg_0(tmp_path / "ints.parquet", uids)
    with pytest.raises(DataError, match=rf"column 'jpg_0' of {path} has type Int64, expected binary") as err:
        list(RustPairSource([str(path)], 32, 2))
    assert "\n" not in str(err.value)


def _jsonl(tmp_path, caption_line: bytes):
    """A JSONL of two pairs whose second line is ``caption_line`` (winner w.png, loser l.png beside it)."""
    from PIL import Image

    for name in ("w.png", "l.png"):
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / name)
    good = json.dumps({"caption": "fine", "winner": "w.png", "loser": "l.png"}).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(good + b"\n" + caption_line + b"\n")
    return path


@pytest.mark.parametrize("backend", ["torch", "rust"])
def test_a_jsonl_caption_that_is_not_utf8_is_named(tmp_path, backend):
    """A Latin-1 byte in a caption: the file, line, byte and column, the same in both backends."""
    path = _jsonl(tmp_path, b'{"caption": "caf\xe9", "winner": "w.png", "loser": "l.png"}')
    with pytest.raises(DataError, match=rf"^{path} line 2: not UTF-8 \(byte 0xe9 at column 17\)$"):
        ItemDataset([str(path)], 32) if backend == "torch" else RustPairSource([str(path)], 32, 1)


@pytest.mark.parametrize("backend", ["torch", "rust"])
def test_a_jsonl_caption_that_is_not_a_string_is_named(tmp_path, backend):
    """The same message in both backends."""
    path = _jsonl(tmp_path, b'{"caption": 3, "winner": "w.png", "loser": "l.png"}')
    with pytest.raises(DataError, match=rf"^{path} line 2 key 'caption': expected a string, got 3$"):
        ItemDataset([str(path)], 32) if backend == "torch" else RustPairSource([str(path)], 32, 1)


@pytest.mark.parametrize("backend", ["torch", "rust"])
@pytest.mark.parametrize("line, message", [
    (b'{"caption": "x", "winner": "w.png"}',
     "column 'loser' \\(logical 'loser'\\) not found in {path} line 2; available columns: caption, winner$"),
    (b'["caption", "winner", "loser"]', "column 'caption' \\(logical 'caption'\\) not found in {path} line 2; "
                                        "available columns: $"),
    (b'{"caption": "x", ', "cannot read {path}: line 2: invalid JSON: "),
], ids=["missing-key", "not-an-object", "invalid-json"])
def test_a_bad_jsonl_pair_line_is_named_alike(tmp_path, backend, line, message):
    """A JSONL pair line without a key, not an object, or not JSON: the same message in both backends (the
    JSON parser's own words after "invalid JSON" differ)."""
    path = _jsonl(tmp_path, line)
    with pytest.raises(DataError, match="^" + message.format(path=path)):
        ItemDataset([str(path)], 32) if backend == "torch" else RustPairSource([str(path)], 32, 1)


@pytest.fixture
def corrupt(tmp_path):
    """Six pairs, the image 0 of row 1 cut in half."""
    rows = random_pairs(6, ties=0)
    rows[1]["jpg_0"] = rows[1]["jpg_0"][: len(rows[1]["jpg_0"]) // 2]
    return write_pickapic_parquet(tmp_path / "corrupt.parquet", rows)


@pytest.mark.parametrize("backend, workers", [("rust", 1), ("torch", 0), ("torch", 2)])
def test_strict_training_on_a_corrupt_image_exits_with_one_line(tmp_path, tiny_sd15, corrupt, capsys, backend,
                                                                workers):
    """``data.strict=true``: exit 2 and one line naming the file and row; no traceback, also when the image
    was read in a DataLoader worker process."""
    args = cli_args(tiny_sd15, corrupt, tmp_path / "run", f"data.backend={backend}", f"data.num_workers={workers}",
                    "data.strict=true", "data.batch_size=6", "train.max_steps=2")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert f"{corrupt} row 1" in line and "Traceback" not in err


def test_training_on_an_int_image_column_exits_with_one_line(tmp_path, tiny_sd15, capsys):
    path = _int_jpg_0(tmp_path / "ints.parquet", uids=True)
    assert train_main(cli_args(tiny_sd15, path, tmp_path / "run", "data.backend=rust", "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"error: unsupported: column 'jpg_0' of {path} has type Int64, expected binary"]
    assert "Traceback" not in err


def _error_lines(stderr: str) -> list[str]:
    """The lines of ``python -m ncp.train``'s error (beside them on stderr: progress bars of model loading)."""
    return [line for line in stderr.splitlines() if line.startswith("error")]

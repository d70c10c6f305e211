"""Pair selection, the PyTorch baseline loader's transforms and order, and bad-input errors."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import jpeg_bytes, random_pairs, write_pickapic_parquet
from ncp.data.items import select_pairs
from ncp.data.torch_source import DataError, ItemDataset, TorchPairSource, crop_box, epoch_order


def _cols(rows):
    """rows: (caption, winner uid or None for a tie, uid0, uid1)."""
    cols = {k: [] for k in ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")}
    for caption, win, u0, u1 in rows:
        cols["caption"].append(caption)
        cols["image_0_uid"].append(u0)
        cols["image_1_uid"].append(u1)
        cols["label_0"].append(0.5 if win is None else float(win == u0))
        cols["label_1"].append(0.5 if win is None else float(win == u1))
    return cols


ROWS = [
    ("c", "A", "A", "B"),   # 0: A wins
    ("c", "A", "C", "A"),   # 1: A wins again (as image 1): A is an absolute winner
    ("c", "D", "D", "B"),   # 2: D wins once ...
    ("c", None, "D", "E"),  # 3: ... and ties: D is out
    ("c", "F", "F", "G"),   # 4: F wins only once
    ("c2", "A", "A", "B"),  # 5: A under another caption wins once: out
]


def test_select_pairs_by_hand():
    refs = select_pairs([_cols(ROWS)], drop_ties=True)
    assert [(r.row, r.winner_is_0) for r in refs] == [(0, True), (1, False), (2, True), (4, True), (5, True)]
    assert [r.row for r in select_pairs([_cols(ROWS)], drop_ties=False)] == [0, 1, 2, 3, 4, 5]
    assert [r.row for r in select_pairs([_cols(ROWS)], absolute_winners=True)] == [0, 1]


def test_absolute_winner_that_lost_once_is_dropped():
    rows = ROWS + [("c", "B", "B", "A")]  # 6: a contradictory pair: A lost to B
    assert select_pairs([_cols(rows)], absolute_winners=True) == []


def test_crop_box_integer_rules():
    assert crop_box((48, 40), 32, None) == (38, 32, 0, 3)  # 48 * 32 / 40 = 38.4 -> 38, centre left (38-32)//2
    assert crop_box((40, 48), 32, None) == (32, 38, 3, 0)
    assert crop_box((40, 48), 32, (0.999, 0.5)) == (32, 38, 6, 0)  # floor(0.999 * 7) = 6
    assert crop_box((32, 32), 32, (0.7, 0.7)) == (32, 32, 0, 0)


def test_dataset_pixels_winner_first_and_shared_flip(tmp_path):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2))
    rows = [{"caption": "x", "jpg_0": jpeg_bytes(a), "jpg_1": jpeg_bytes(b), "label_0": 0.0, "label_1": 1.0}]
    path = write_pickapic_parquet(tmp_path / "d.parquet", rows)
    ds = ItemDataset([str(path)], 32, random_flip=True, seed=3)
    flips = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        s = ds[0]
        flips.append(np.random.default_rng([3, epoch, 0]).random() < 0.5)
        for img, data in ((s.images[0], rows[0]["jpg_1"]), (s.images[1], rows[0]["jpg_0"])):  # label_1 won
            ref = Image.open(io.BytesIO(data)).convert("RGB").resize((38, 32), Image.BILINEAR).crop((3, 0, 35, 32))
            if flips[-1]:
                ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            assert np.array_equal(img, np.asarray(ref).transpose(2, 0, 1))
        assert s.original_size == (40, 48) and s.crop_top_left == (0, 3)
    assert any(flips) and not all(flips)


def test_order_is_disjoint_and_complete_over_ranks():
    parts = [epoch_order(10, 0, 1, r, 3) for r in range(3)]
    joined = np.concatenate(parts)
    assert len(joined) == 9 and len(set(joined.tolist())) == 9
    assert not np.array_equal(epoch_order(10, 0, 1, 0, 1), epoch_order(10, 0, 2, 0, 1))


def test_source_resumes_mid_epoch(tiny_parquet):
    ds = ItemDataset([str(tiny_parquet)], 32)
    full = TorchPairSource(ds, batch_size=2, seed=5)
    order = [b.indices.tolist() for b in full]
    assert len(order) == len(full) == 5  # 11 pairs (one tie dropped) // 2
    part = TorchPairSource(ds, batch_size=2, seed=5)
    it = iter(part)
    next(it), next(it)
    state = part.state()
    resumed = TorchPairSource(ds, batch_size=2, seed=5)
    resumed.resume(state)
    assert [b.indices.tolist() for b in resumed] == order[2:]


def test_missing_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"1"], "label_0": [1.0], "label_1": [0.0]}), path)
    with pytest.raises(DataError, match=r"bad.parquet lacks column\(s\) \['jpg_1'\]"):
        ItemDataset([str(path)], 32)
    with pytest.raises(DataError, match="matches no file"):
        ItemDataset([str(tmp_path / "nothing-*.parquet")], 32)


def test_renamed_columns(tmp_path):
    import pyarrow.parquet as pq

    path = write_pickapic_parquet(tmp_path / "d.parquet", random_pairs(3, ties=0))
    table = pq.read_table(path).rename_columns(["prompt", "a", "b", "la", "lb", "ua", "ub", "has_label"])
    pq.write_table(table, path)
    ds = ItemDataset([str(path)], 32, columns={"caption": "prompt", "jpg_0": "a", "jpg_1": "b", "label_0": "la",
                                                   "label_1": "lb", "image_0_uid": "ua", "image_1_uid": "ub"})
    assert len(ds) == 3 and ds[0].caption.startswith("a picture")


def test_corrupt_image_is_skipped_and_reported(tmp_path, caplog):
    rows = random_pairs(4, ties=0)
    rows[2]["jpg_0"] = rows[2]["jpg_0"][:100]  # truncated JPEG
    path = write_pickapic_parquet(tmp_path / "c.parquet", rows)
    ds = ItemDataset([str(path)], 32)
    assert ds[2] is None
    assert "c.parquet row 2" in caplog.text
    source = TorchPairSource(ds, batch_size=4)
    batches = list(source)
    assert len(batches[0]) == 3 and source.stats()["skipped"] == 1
    strict = ItemDataset([str(path)], 32, strict=True)
    with pytest.raises(DataError, match="corrupt image in .*c.parquet row 2"):
        strict[2]


def test_jsonl_source(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("w.png", "l.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "pairs.jsonl").write_text('{"caption": "hi", "winner": "w.png", "loser": "l.png"}\n')
    ds = ItemDataset([str(tmp_path / "pairs.jsonl")], 32, random_flip=False)
    s = ds[0]
    assert s.caption == "hi"
    assert np.array_equal(s.images[0], np.asarray(Image.open(tmp_path / "w.png")).transpose(2, 0, 1))
    (tmp_path / "bad.jsonl").write_text('{"caption": "hi", "winner": "w.png"}\n')
    with pytest.raises(DataError, match=r"column 'loser' \(logical 'loser'\) not found in .*bad.jsonl line 1"):
        ItemDataset([str(tmp_path / "bad.jsonl")], 32)


def test_an_item_is_r_images_with_r_labels():
    """R = 2: a PairBatch (winner first); R = 1: an UnpairedBatch; a pair labelled loser first is refused."""
    from ncp.data.batch import PairBatch, UnpairedBatch, item_batch, pair_labels
    from ncp.data.items import Item

    px = [torch.full((3, 3, 4, 4), k, dtype=torch.uint8) for k in range(2)]
    fields = dict(captions=["a", "b", "c"])
    pairs = item_batch(pair_labels(3), images=px, **fields)
    assert isinstance(pairs, PairBatch) and pairs.roles == 2 and torch.equal(pairs.pixels(), torch.cat(px))
    desirable = torch.tensor([True, False, True])
    unpaired = item_batch(desirable[:, None], images=px[:1], **fields)
    assert isinstance(unpaired, UnpairedBatch) and unpaired.roles == 1 and torch.equal(unpaired.desirable, desirable)
    latents = item_batch(pair_labels(3), latents=torch.zeros(6, 2, 4, 2, 2), **fields)
    assert latents.winners is None and latents.latents.shape[0] == 6
    with pytest.raises(ValueError, match="winner first"):
        item_batch(pair_labels(3).flip(1), images=px, **fields)
    with pytest.raises(ValueError, match="2 labels per item but 1 images"):
        item_batch(pair_labels(3), images=px[:1], **fields)
    assert Item(0, 0, "c", ("jpg_0", "jpg_1"), (False, True)).role_order() == (1, 0)
    assert Item(0, 0, "c", ("image",), (False,)).role_order() == (0,)

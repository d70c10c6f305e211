"""ncp.files: the hash of a file, and folders put in place whole (the latent cache's and the merged export's)."""
from __future__ import annotations

import os

import pytest
import xxhash

import ncp.files
from ncp.files import file_digest, remove_stale_temps, replace_folder, temp_sibling, written_whole


def test_file_digest_is_the_xxh3_of_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(ncp.files, "_CHUNK", 1000)  # several reads
    data = os.urandom(4567)
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f") == file_digest(tmp_path / "f", fsync=True) == xxhash.xxh3_64(data).hexdigest()


def _folder(path, text):
    path.mkdir()
    (path / "f").write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_folder(tmp_path, monkeypatch, exchange):
    """Onto a missing, an empty and a full folder; where the file system cannot swap two folders, by two
    renames. Nothing is left beside the target."""
    if not exchange:
        monkeypatch.setattr(ncp.files, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    replace_folder(_folder(tmp_path / "a", "a"), final)
    assert (final / "f").read_text() == "a"
    replace_folder(_folder(tmp_path / "b", "b"), final)
    assert (final / "f").read_text() == "b"
    (final / "f").unlink()
    replace_folder(_folder(tmp_path / "c", "c"), final)
    assert (final / "f").read_text() == "c" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporary_folders_are_removed(tmp_path):
    final = tmp_path / "out"
    mine = temp_sibling(final)
    assert mine.name == f".out.tmp-{os.getpid()}"
    dead = tmp_path / ".out.tmp-4194305"  # above Linux's largest pid
    alive = tmp_path / f".out.tmp-{os.getppid()}"
    other = tmp_path / ".other.tmp-4194305"
    for p in (mine, dead, alive, other):
        p.mkdir()
    remove_stale_temps(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, alive.name, other.name])


def test_written_whole_puts_the_folder_in_place_only_at_the_end(tmp_path):
    final = _folder(tmp_path / "out", "old")
    with pytest.raises(KeyboardInterrupt), written_whole(final) as tmp:
        (tmp / "f").write_text("half")
        raise KeyboardInterrupt
    assert (final / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with written_whole(final) as tmp:
        (tmp / "f").write_text("new")
        assert (final / "f").read_text() == "old"
    assert (final / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

"""Atomic, resumable checkpoints in ``step-000100/`` folders.

A checkpoint holds the LoRA (diffusers format), the optimizer and LR scheduler,
the RNG states, the data order and the config. It is written to a temporary
folder and renamed into place, so a crash never leaves a half-written
``step-*`` folder; ``manifest.json`` is written last: the size and xxh3-64 of
every other file. Resuming verifies it (:func:`verify_checkpoint`), and
``--resume latest`` / ``auto`` fall back to the newest intact checkpoint,
saying which ones they skipped and why.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"step-{step:06d}"


def step_folders(output_dir: Path) -> list[Path]:
    """Every ``step-*`` folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with ``state.json``), oldest first."""
    return [p for p in step_folders(output_dir) if (p / "state.json").is_file()]


class CheckpointError(OSError):
    """A checkpoint that cannot be used; the message names the file and why."""


def file_hash(path: Path) -> str:
    """The xxh3-64 of a file's bytes, 16 hex digits."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and xxh3-64 of every other file of ``folder``."""
    files = {f.name: {"size": f.stat().st_size, "xxh3_64": file_hash(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def verify_checkpoint(folder: Path) -> None:
    """Check every file against ``manifest.json``; a :class:`CheckpointError` names the first that fails.
    A checkpoint written before manifests existed is accepted unverified (with a warning)."""
    manifest = folder / MANIFEST
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{folder / 'state.json'} is missing (not a complete checkpoint)")
    if not manifest.is_file():
        logger.warning("%s has no %s (written by an older ncp): its files are not verified", folder, MANIFEST)
        return
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest} is unreadable ({err})") from err
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            raise CheckpointError(f"{path} is {what}: {size} bytes, {MANIFEST} says {want['size']}")
        if file_hash(path) != want["xxh3_64"]:
            raise CheckpointError(f"{path} does not match its xxh3 in {MANIFEST} (corrupt or altered)")


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """'latest', 'auto' or an explicit folder -> a verified checkpoint folder (an error names the file that
    fails). 'latest' and 'auto' take the newest intact checkpoint, logging each newer one they skip and why;
    'auto' is None (start afresh) when there is no checkpoint at all: for jobs that a scheduler restarts."""
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        verify_checkpoint(path)
        return path
    found = step_folders(output_dir)
    if not found:
        if resume == "auto":
            return None
        raise FileNotFoundError(f"--resume latest: no checkpoint (step-*/) in {output_dir}")
    skipped: dict[str, CheckpointError] = {}
    for folder in reversed(found):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            logger.warning("--resume %s: skipping %s: %s", resume, folder.name, err)
            skipped[folder.name] = err
            continue
        if skipped:
            logger.warning("--resume %s: resuming from %s, the newest intact checkpoint (skipped %s)", resume,
                           folder.name, ", ".join(skipped))
        return folder
    raise CheckpointError(f"--resume {resume}: no intact checkpoint in {output_dir}: "
                          + "; ".join(f"{name}: {err}" for name, err in skipped.items()))


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file; unreadable JSON is a :class:`CheckpointError` naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})") from err


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain data (what ``torch.load(weights_only=True)`` reads back)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, write_lora, optimizer, lr_scheduler, data_state: dict,
                    config: dict, keep: int) -> Path:
    """Write ``step-XXXXXX/`` atomically; ``write_lora(folder)`` writes the adapter. Keep the last ``keep``."""
    final = step_dir(output_dir, step)
    tmp = output_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write_lora(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "state.json").write_text(json.dumps({"step": step, "data": data_state}, indent=2))
        write_manifest(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run of the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt`` read without running code: tensors and plain data only (``weights_only``), so a
    checkpoint folder from elsewhere cannot execute anything when resumed; anything else is refused by name."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain data, which could run code "
            f"when loaded (a checkpoint of another program or an altered one; ncp's own hold none). "
            f"{str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, OSError) as err:  # a truncated or damaged zip archive
        raise CheckpointError(f"{path} is unreadable ({str(err).splitlines()[0]})") from err


def load_trainer_state(folder: Path, optimizer, lr_scheduler) -> dict:
    """Restore optimizer, scheduler and RNG; return state.json ({step, data})."""
    blob = read_trainer_state(folder / "trainer_state.pt")
    optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    set_rng_state(blob["rng"])
    return read_json(folder / "state.json")

"""Atomic, resumable checkpoints in ``step-000100/`` folders.

A checkpoint holds the LoRA (diffusers format), the optimizer and LR scheduler,
the RNG states, the data order and the config. It is written to a temporary
folder and renamed into place, so a crash never leaves a half-written
``step-*`` folder; ``state.json`` is written last.
"""
from __future__ import annotations

import json
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

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


class CheckpointError(OSError):
    """A checkpoint that cannot be used; the message names the file and why."""


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """'latest', 'auto' or an explicit folder -> a complete checkpoint folder (an error names what is missing).
    'auto' is 'latest' when a checkpoint exists and None (start afresh) when none does: for jobs that a
    scheduler restarts."""
    if resume in ("latest", "auto"):
        found = list_checkpoints(output_dir)
        if not found:
            if resume == "auto":
                return None
            raise FileNotFoundError(f"--resume latest: no checkpoint (step-*/state.json) in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no state.json)")
    return path


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


def load_trainer_state(folder: Path, optimizer, lr_scheduler) -> dict:
    """Restore optimizer, scheduler and RNG; return state.json ({step, data})."""
    blob = read_trainer_state(folder / "trainer_state.pt")
    optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((folder / "state.json").read_text())

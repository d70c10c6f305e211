"""Atomic, resumable checkpoints in ``step-000100/`` folders.

A checkpoint holds the LoRA (diffusers format), the optimizer and LR scheduler,
the RNG states, the data order and the config. It is written to a temporary
folder and renamed into place, so a crash never leaves a half-written
``step-*`` folder; ``state.json`` is written last.
"""
from __future__ import annotations

import json
import os
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


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """'latest' or an explicit folder -> a complete checkpoint folder (an error names what is missing)."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint (step-*/state.json) in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no state.json)")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def load_trainer_state(folder: Path, optimizer, lr_scheduler) -> dict:
    """Restore optimizer, scheduler and RNG; return state.json ({step, data})."""
    blob = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((folder / "state.json").read_text())

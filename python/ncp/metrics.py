"""Metrics: one JSON object per optimizer step in ``metrics.jsonl``, TensorBoard when installed, a progress bar.

A run that starts at step S (a resume) first drops what an earlier run logged after S, in ``metrics.jsonl``
and in TensorBoard (``purge_step``): each step is logged once, however often the run was stopped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ncp.validation import read_grid

logger = logging.getLogger(__name__)


def logged_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line; None for a line that a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (and none that a kill cut short); rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (logged := logged_step(line)) is not None and logged <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
        logger.info("%s: dropped %d line(s) logged after step %d by an earlier run", path, len(lines) - len(kept),
                    step)


class MetricsLogger:
    def __init__(self, output_dir: Path, total_steps: int, initial_step: int, enabled: bool,
                 progress: bool, tensorboard: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                        disable=not (enabled and progress), dynamic_ncols=True)
        self.file = None
        if enabled:
            truncate_metrics(output_dir / "metrics.jsonl", initial_step)
            self.file = open(output_dir / "metrics.jsonl", "a")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=initial_step + 1)
            except ImportError:
                logger.info("TensorBoard is not installed: metrics go to metrics.jsonl only")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def advance(self, step: int, metrics: dict[str, Any]) -> None:
        shown = {"loss": metrics.get("loss"), "acc": metrics.get("rewards/accuracy"),
                 "pairs/s": metrics.get("perf/pairs_per_s")}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(step - self.bar.n)

    def image(self, step: int, tag: str, path: Path) -> None:
        """An image written to ``path`` (a validation grid): to TensorBoard, and a line under the progress bar."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_image(tag, read_grid(path), step, dataformats="HWC")
        if self.bar.disable:
            logger.info("step %d: %s %s", step, tag, path)
        else:
            self.bar.write(f"step {step}: {tag} {path}")

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

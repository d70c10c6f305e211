"""The optimizer and learning-rate schedule of LoRA training."""
from __future__ import annotations

import logging

import torch

from ncp.config import OptimConfig

logger = logging.getLogger(__name__)


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device):
    """8-bit AdamW (bitsandbytes) on CUDA, torch AdamW otherwise; constant LR after a linear warmup.

    The warmup reaches ``lr * (s + 1) / warmup_steps`` at step s (never 0, so the
    first step already trains), then stays at ``lr``.
    """
    use_8bit = cfg.use_8bit == "on" or (cfg.use_8bit == "auto" and device.type == "cuda")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optim.use_8bit needs bitsandbytes (pip install bitsandbytes); "
                              "or set optim.use_8bit=off") from err
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        reason = "8-bit AdamW needs CUDA" if device.type != "cuda" else "optim.use_8bit=off"
        logger.info("optimizer: torch AdamW (%s)", reason)
        optimizer = torch.optim.AdamW(params, **kwargs)
    warmup = max(1, cfg.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, schedule

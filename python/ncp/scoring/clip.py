"""PickScore / HPSv2-style preference scores of a local CLIP model folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ncp.models import quiet_loading


class CLIPScorer:
    """PickScore-style ``logit_scale * cos(image, text)`` (``kind="pickscore"``) or HPSv2-style
    ``cos(image, text)`` (``kind="hps"``) of a ``CLIPModel`` + ``CLIPProcessor`` saved in ``path``."""

    def __init__(self, path: str, kind: str = "pickscore", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        self.name = f"{kind}:{Path(path).name}"
        self.kind = kind
        with quiet_loading():
            self.model = CLIPModel.from_pretrained(path).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc=self.name, leave=False):
            ims, ps = images[i: i + self.batch_size], prompts[i: i + self.batch_size]
            inputs = self.processor(text=ps, images=[im for im in ims], return_tensors="pt", padding=True,
                                    truncation=True)
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                               attention_mask=inputs.get("attention_mask"))
            img, txt = _features(img), _features(txt)
            cos = (torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(txt, dim=-1)).sum(-1)
            scale = self.model.logit_scale.exp() if self.kind == "pickscore" else 1.0
            out.append((scale * cos).float().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _features(x) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output object (5)."""
    if isinstance(x, torch.Tensor):
        return x
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        if getattr(x, key, None) is not None:
            return getattr(x, key)
    return x[0]

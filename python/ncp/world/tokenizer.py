"""A CLIP byte-level BPE tokenizer whose vocabulary the world defines.

The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one token per learned merge, then
``<|startoftext|>`` and ``<|endoftext|>``. Merges are learned by plain BPE on
the world's words until every word is one token, so any caption of the grammar
encodes to one token per word, and any other text still encodes (to bytes).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from ncp.scoring.scenes import world_vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first, ties by name) until every word is one symbol."""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        pairs = Counter((a, b) for s in seqs.values() for a, b in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(words or world_vocabulary())
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(max_length: int = 24, words: list[str] | None = None) -> CLIPTokenizer:
    """The world's CLIPTokenizer (``model_max_length`` = the text encoder's positions)."""
    vocab, merges = vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)


def save_tokenizer(tok: CLIPTokenizer, out_dir: str | Path) -> None:
    """``save_pretrained`` plus CLIP's classic vocab.json / merges.txt (older loaders read those)."""
    out = Path(out_dir)
    tok.save_pretrained(out)
    vocab, merges = vocab_and_merges()
    if not (out / "vocab.json").exists():
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    if not (out / "merges.txt").exists():
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

"""Prompts: TNEWS titles as classification prompts, or synthetic texts of a fixed token length."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path


def classification_prompt(sentence: str, labels: Sequence[str]) -> str:
    return "请将下面的新闻标题分类到以下类别之一：" + "，".join(labels) + f"。\n新闻标题：{sentence}\n类别："


def load_tnews(path: Path, n: int, seed: int) -> list[str]:
    """`n` TNEWS titles (sampled with `seed`, repeated if n > dataset) as classification prompts."""
    lines = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    labels_path = Path(path).with_name("labels.json")
    if labels_path.exists():
        labels = [
            json.loads(x)["label_desc"] for x in labels_path.read_text(encoding="utf-8").splitlines() if x.strip()
        ]
    else:
        labels = sorted({x["label_desc"] for x in lines})
    rng = random.Random(seed)
    return [classification_prompt(rng.choice(lines)["sentence"], labels) for _ in range(n)]


def synthetic_prompts(tokenizer_json: Path | None, input_len: int, n: int, seed: int) -> list[str]:
    """`n` random texts of `input_len` tokens each (exact when the tokenizer round-trips)."""
    rng = random.Random(seed)
    tok = None
    if tokenizer_json and Path(tokenizer_json).exists():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception:
            tok = None
    if tok is None:  # no tokenizer: ~1 token per common English word
        words = ["alpha", "beta", "gamma", "delta", "omega", "news", "sports", "market", "city", "game"]
        return [" ".join(rng.choice(words) for _ in range(input_len)) for _ in range(n)]
    special = {t for t in tok.get_vocab(with_added_tokens=True).values()} - set(
        tok.get_vocab(with_added_tokens=False).values()
    )
    vocab = [i for i in range(tok.get_vocab_size(with_added_tokens=False)) if i not in special]
    prompts = []
    for _ in range(n):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        text = tok.decode(ids)
        for _ in range(8):
            ids2 = tok.encode(text, add_special_tokens=False).ids
            if len(ids2) == input_len:
                break
            if len(ids2) > input_len:
                ids2 = ids2[:input_len]
            else:
                ids2 = ids2 + [rng.choice(vocab) for _ in range(input_len - len(ids2))]
            text = tok.decode(ids2)
        prompts.append(text)
    return prompts

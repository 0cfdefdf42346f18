"""News classification as chat: the label set and the ONE prompt format.

Shared by the server (``POST /v1/classify``), the training scripts (``scripts/train_lora.py``,
``scripts/build_tiny_model.py``) and the evaluation script, so a model is always asked exactly
the way it was trained. Nothing here is server-specific and nothing imports Ray or torch.

Prompt format (ChatML shown; the model's own chat template renders it)::

    system:    Classify the news headline. Answer with its category label only.
    user:      <the text, stripped>
    assistant: <exactly one label name, e.g. news_finance>

The label set is not listed in the prompt: a fine-tuned model knows it, and the service picks
the answer among the allowed labels (label scoring / constrained decoding), so the answer is
always valid whatever the model. (A long label list in every prompt also slowed the tiny
model's training down a lot and cost it accuracy.)

Labels: the ``label_desc`` values of the TNEWS ``labels.json`` (15 classes, file order). A
model folder may carry its own ``labels.json`` (``models/tiny-qwen3/labels.json``), since a
deployed pod has no ``../shared``; :func:`labels_for_model` prefers it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LABELS_FILE = REPO_ROOT.parent / "shared" / "data" / "tnews" / "labels.json"
DEFAULT_DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "tnews" / "test.json"
LABELS_FILENAME = "labels.json"

# Extra variables for the model's chat template when rendering the prompt: Qwen3's own
# template then opens the answer with an empty think block instead of thinking first.
# Templates that do not use them ignore them.
CHAT_TEMPLATE_KWARGS: dict[str, Any] = {"enable_thinking": False}

# The held-out slice of the shared TNEWS file: never trained on (tokenizer, pre-training and
# adapters use the other rows); the evaluation default.
HELDOUT_LAST_N = 1000
HELDOUT_RULE = f"last {HELDOUT_LAST_N} lines of the file (in file order); training uses the lines before them"

SYSTEM_PROMPT = "Classify the news headline. Answer with its category label only."


# ---------------------------------------------------------------------------- labels


def parse_labels(text: str) -> list[str]:
    """Label names from a labels file's text. Accepted forms:

    - a JSON list of names: ``["news_story", ...]``;
    - a JSON list of objects, or JSON lines (the TNEWS ``labels.json``), each with
      ``label_desc`` (or ``name`` / ``label``);
    - a JSON object ``{"labels": [...]}`` holding either of the above.
    """
    text = text.strip()
    if not text:
        raise ValueError("labels file is empty")
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError:
        doc = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(doc, dict):
        doc = doc.get("labels", [doc] if ("label_desc" in doc or "name" in doc) else None)
    if not isinstance(doc, list):
        raise ValueError("labels file must hold a list of labels")
    labels: list[str] = []
    for item in doc:
        if isinstance(item, dict):
            item = item.get("label_desc", item.get("name", item.get("label")))
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"bad label entry: {item!r}")
        labels.append(item.strip())
    if len(set(labels)) != len(labels):
        raise ValueError("duplicate labels")
    if not labels:
        raise ValueError("no labels")
    return labels


def load_labels(source: str | Path | None = None) -> list[str]:
    """The label names. ``source``: a labels file, a folder holding ``labels.json`` (e.g. a
    model folder), or None for the shared TNEWS ``labels.json`` next to the repo."""
    path = Path(source) if source is not None else DEFAULT_LABELS_FILE
    if path.is_dir():
        path = path / LABELS_FILENAME
    return parse_labels(path.read_text(encoding="utf-8"))


def labels_for_model(model_dir: str | Path | None) -> list[str]:
    """The model folder's own ``labels.json`` when it has one, else the shared TNEWS labels."""
    if model_dir is not None and (Path(model_dir) / LABELS_FILENAME).is_file():
        return load_labels(Path(model_dir) / LABELS_FILENAME)
    return load_labels(None)


def write_labels(labels: Sequence[str], dest: str | Path) -> Path:
    """Write ``labels`` as a JSON list to ``dest`` (a file, or a folder → ``labels.json``)."""
    path = Path(dest)
    if path.is_dir():
        path = path / LABELS_FILENAME
    path.write_text(json.dumps(list(labels), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- prompt


def build_messages(text: str) -> list[dict[str, str]]:
    """The chat messages that ask for ``text``'s label; the model's answer (the assistant
    turn, after the chat template's generation prompt) is exactly one label name."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": text.strip()},
    ]


def build_training_messages(text: str, label: str) -> list[dict[str, str]]:
    """:func:`build_messages` plus the assistant's answer (the label)."""
    return build_messages(text) + [{"role": "assistant", "content": label}]


def parse_answer(answer: str, labels: Sequence[str]) -> str | None:
    """The label a free-text answer names: exact match after stripping, else the first label
    the answer starts with, else None (an invalid answer)."""
    a = answer.strip()
    if a in labels:
        return a
    for label in sorted(labels, key=len, reverse=True):
        if a.startswith(label):
            return label
    return None


# ---------------------------------------------------------------------------- data


def example_text(row: dict[str, Any]) -> str:
    """The text of a labelled row: ``sentence`` (TNEWS), ``text`` or ``input``."""
    for key in ("sentence", "text", "input"):
        if isinstance(row.get(key), str):
            return row[key]
    raise KeyError("row has no sentence/text/input field")


def example_label(row: dict[str, Any]) -> str:
    """The label name of a labelled row: ``label_desc`` (TNEWS), else ``label``."""
    if isinstance(row.get("label_desc"), str):
        return row["label_desc"]
    if isinstance(row.get("label"), str):
        return row["label"]
    raise KeyError("row has no label_desc/label field")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout_split(
    rows: Sequence[dict[str, Any]], n: int = HELDOUT_LAST_N
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) of the shared TNEWS file: see :data:`HELDOUT_RULE`."""
    rows = list(rows)
    if len(rows) <= n:
        raise ValueError(f"need more than {n} rows to hold out {n}")
    return rows[:-n], rows[-n:]


def load_split(data: str | Path | None, limit: int | None, split: str) -> tuple[list[dict[str, Any]], str]:
    """Rows of a labelled JSON-lines file and a description of where they came from. Without a
    file: the shared TNEWS file's `split`, "train" (all but the held-out slice) or "heldout"."""
    if data is None:
        train, held = heldout_split(read_jsonl(DEFAULT_DATA_FILE))
        rows = held if split == "heldout" else train
        what = "held-out slice" if split == "heldout" else "minus held-out"
        source = f"{DEFAULT_DATA_FILE} {what} ({HELDOUT_RULE})"
    else:
        rows = read_jsonl(data)
        source = str(data)
    if limit:
        rows = rows[:limit]
        source += f", first {limit}"
    return rows, source


def iter_examples(rows: Iterable[dict[str, Any]]) -> Iterable[tuple[str, str]]:
    for row in rows:
        yield example_text(row), example_label(row)


# --------------------------------------------------------------------------- label scoring


def common_prefix_len(seqs: Sequence[Sequence[Any]]) -> int:
    """How many leading items all sequences share."""
    if not seqs:
        return 0
    n = min(len(x) for x in seqs)
    for k in range(n):
        if len({x[k] for x in seqs}) != 1:
            return k
    return n


def label_scoring_tokens(label_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """What label scoring must score: (tokens every label starts with, each label's remaining
    tokens). Shared leading tokens ("news", "_" for TNEWS) add the same log-probability to every
    label, which the softmax over labels cancels, so they join the prompt; at least one token
    of each label stays scored. The shared trailing end-of-turn token only tells a label from a
    longer one it begins, so with no such pair it is left out."""
    labels = [list(ids) for ids in label_ids]
    if all(len(ids) >= 2 for ids in labels) and len({ids[-1] for ids in labels}) == 1:
        trimmed = [ids[:-1] for ids in labels]
        if not any(a is not b and b[: len(a)] == a for a in trimmed for b in trimmed):
            labels = trimmed
    shared = min(common_prefix_len(labels), min(map(len, labels)) - 1)
    return labels[0][:shared], [ids[shared:] for ids in labels]

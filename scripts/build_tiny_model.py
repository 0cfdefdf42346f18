"""Build the embedded default model offline and deterministically: a tiny news classifier.

Writes, under ``models/`` (git-ignored), from the shared TNEWS file minus its held-out slice
(``classification.HELDOUT_RULE``: the last 1,000 lines, never trained on):

- ``models/tiny-qwen3``: a small Qwen3-architecture causal LM with a byte-level BPE tokenizer
  trained on the TNEWS titles and keywords, the Qwen special tokens and a ChatML chat
  template; pre-trained from a seeded random init on a mixture of language modelling on the
  news text (title + keywords) and the chat classification task (the prompt of
  ``deployments/classification.py`` → label name, with keyword lists as extra inputs). Also
  ``labels.json`` (the 15 TNEWS class names) and ``heldout.json`` (the held-out rule, the data
  fingerprint and the accuracies measured at build time);
- ``models/tiny-qwen3-lora``: a peft LoRA adapter (all projections) that continues the
  classification training on top of the base: better accuracy, and visibly different output.

Nothing is downloaded. Everything is seeded; on one machine a rebuild gives the same files.
Takes a couple of CPU minutes on 2 cores; skips work that is already done unless ``--force``.
The result is written to a temporary folder and moved into place at the end, so readers of
``models/`` never see a half-written model.

    python scripts/build_tiny_model.py [--data ../shared/data/tnews/test.json] [--out models] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from deployments import classification as clf  # noqa: E402

DEFAULT_DATA = clf.DEFAULT_DATA_FILE
DEFAULT_LABELS = clf.DEFAULT_LABELS_FILE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>"]  # Qwen3 adds these as normal (non-special) added tokens

# ChatML, as Qwen uses it. `content` is always a string here: the tokenizer deployment
# flattens OpenAI content parts before rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Model shape and training recipe (`--set key=value` overrides one, for experiments).
RECIPE: dict[str, Any] = dict(
    seed=0,
    threads=2,                 # torch CPU threads (fixed: part of the reproducibility)
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,               # vLLM's CPU attention supports 32/64/80/96/112/128/…
    initializer_range=0.02,
    # stage 1: the base (LM on the news text mixed with the classification chat)
    base_steps=600,
    base_lr=5e-3,
    base_cls_frac=0.5,         # share of steps that are classification batches
    base_schedule="mix",       # mix: random interleaving; lm_first: the LM steps come first
    vo_init="default",         # v_proj/o_proj init: default, a std (float), or identity (needs kv heads = heads)
    mlp_out_init="default",    # default, or zero: MLP down_proj starts at zero (the block starts as identity)
    q_norm_init=1.0,           # initial q_norm weight (attention temperature; 0: uniform attention)
    embed_init="random",       # random, or lsa: token embeddings from a PPMI-SVD of co-occurrences
    lsa_scale=1.0,             # lsa: embedding std relative to initializer_range
    lm_batch=16,
    lm_len=128,
    cls_batch=32,
    cls_lm_weight=0.0,         # LM loss on the user text of classification examples (weight)
    keyword_inputs=True,       # also train on "keywords → label" examples
    # stage 2: the LoRA adapter (classification)
    lora_steps=300,
    lora_lr=5e-3,
    lora_batch=32,
    lora_r=16,
    lora_alpha=32,
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    eval_every=0,              # >0: print held-out accuracy every N steps (experiments)
    eval_n=1000,               # held-out rows scored at the end of the build
)


def model_config(recipe: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vocab_size=recipe["vocab_size"],
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"],
        head_dim=recipe["head_dim"],
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        initializer_range=recipe["initializer_range"],
    )


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_corpus(rows: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Training text of the tokenizer: titles and keywords (training rows only) plus the
    classification prompt and label names, so that those are a few tokens each."""
    texts = []
    for row in rows:
        texts.append(row["sentence"])
        if row.get("keywords"):
            texts.append(row["keywords"].replace(",", " "))
    texts += [clf.SYSTEM_PROMPT, " ".join(labels), "system user assistant"] * 100
    return texts


def build_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Fixed order, fixed data: the trained merges are the same on every machine.
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=max_len,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= vocab_size, (len(fast), vocab_size)
    return fast


# ---------------------------------------------------------------------------- training


class LMBatcher:
    """Random windows of the packed news text (title, newline, keywords, <|endoftext|>)."""

    def __init__(self, tokenizer, rows: list[dict[str, Any]], batch: int, length: int, seed: int):
        eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        stream: list[int] = []
        for row in rows:
            text = row["sentence"] + ("\n" + row["keywords"] if row.get("keywords") else "")
            stream += tokenizer.encode(text, add_special_tokens=False) + [eod]
        self.stream, self.batch, self.length = stream, batch, length
        self.rng = random.Random(seed)

    def loss(self, model):
        import torch
        import torch.nn.functional as F

        starts = [self.rng.randrange(0, len(self.stream) - self.length - 1) for _ in range(self.batch)]
        ids = torch.tensor([self.stream[s: s + self.length + 1] for s in starts])
        hidden = model.get_decoder()(input_ids=ids[:, :-1]).last_hidden_state
        logits = model.get_output_embeddings()(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def init_lsa_embeddings(model, tokenizer, rows, recipe) -> None:
    """Classical distributional semantics as a head start: each token's embedding is its row of
    a truncated SVD of the positive PMI matrix of token co-occurrences within a news item
    (title + keywords, training rows only). Tokens never seen keep their random init."""
    import torch

    V = model.config.vocab_size
    dim = model.config.hidden_size
    pairs = []
    for row in rows:
        text = row["sentence"] + " " + (row.get("keywords") or "").replace(",", " ")
        u = torch.tensor(sorted(set(tokenizer.encode(text, add_special_tokens=False))), dtype=torch.long)
        pairs.append((u[:, None] * V + u[None, :]).flatten())
    C = torch.bincount(torch.cat(pairs), minlength=V * V).double().view(V, V)
    C.fill_diagonal_(0)
    seen = C.sum(1) > 0
    total = C.sum()
    pi = C.sum(1) / total
    pj = C.sum(0) ** 0.75
    pj = pj / pj.sum()
    pmi = torch.log((C / total).clamp_min(1e-30) / (pi[:, None] * pj[None, :]).clamp_min(1e-30))
    ppmi = torch.where(C > 0, pmi.clamp_min(0), torch.zeros_like(pmi)).float()
    torch.manual_seed(recipe["seed"] + 5)
    U, S, _ = torch.svd_lowrank(ppmi, q=dim, niter=4)
    emb = U * S.sqrt()
    emb = emb / emb[seen].std() * recipe["initializer_range"] * recipe["lsa_scale"]
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[seen] = emb[seen].to(w.dtype)


def classification_pairs(rows: list[dict[str, Any]], keyword_inputs: bool) -> list[tuple[str, str]]:
    pairs = [(row["sentence"], row["label_desc"]) for row in rows]
    if keyword_inputs:
        pairs += [(row["keywords"].replace(",", " "), row["label_desc"]) for row in rows if row.get("keywords")]
    return pairs


def build_base(tokenizer, rows, recipe, log, evaluator=None):
    """Stage 1: the base model, pre-trained on the LM/classification mixture."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import train_lora as tl

    torch.manual_seed(recipe["seed"])
    cfg = Qwen3Config(
        **model_config(recipe),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if recipe["q_norm_init"] != 1.0:
                attn.q_norm.weight.fill_(recipe["q_norm_init"])
            if recipe["vo_init"] == "identity":
                assert attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1] == cfg.hidden_size
                attn.v_proj.weight.copy_(torch.eye(cfg.hidden_size))
                attn.o_proj.weight.copy_(torch.eye(cfg.hidden_size))
            elif recipe["vo_init"] != "default":
                attn.v_proj.weight.normal_(0.0, float(recipe["vo_init"]))
                attn.o_proj.weight.normal_(0.0, float(recipe["vo_init"]))
            if recipe["mlp_out_init"] == "zero":
                layer.mlp.down_proj.weight.zero_()
    if recipe["embed_init"] == "lsa":
        init_lsa_embeddings(model, tokenizer, rows, recipe)
    lm = LMBatcher(tokenizer, rows, recipe["lm_batch"], recipe["lm_len"], recipe["seed"] + 1)
    examples = tl.build_examples(tokenizer, classification_pairs(rows, recipe["keyword_inputs"]))
    cls = tl.ExampleBatcher(examples, recipe["cls_batch"], tl.pad_id(tokenizer), recipe["seed"] + 2,
                            lm_weight=recipe["cls_lm_weight"])
    pick = random.Random(recipe["seed"] + 3)
    tasks = ["cls" if pick.random() < recipe["base_cls_frac"] else "lm" for _ in range(recipe["base_steps"])]
    if recipe["base_schedule"] == "lm_first":
        tasks.sort(key=lambda t: t == "cls")

    def loss_at(step: int):
        return cls.loss(model) if tasks[step] == "cls" else lm.loss(model)

    stats = tl.train_loop(model, list(model.parameters()), recipe["base_steps"], loss_at, lr=recipe["base_lr"],
                          weight_decay=0.01, progress=log.progress, desc="base", callback=evaluator and evaluator(model))
    stats["params"] = sum(p.numel() for p in model.parameters())
    stats["lm_tokens"] = len(lm.stream)
    stats["cls_examples"] = len(examples)
    return model, stats


def build_adapter(base_dir: Path, tokenizer, rows, recipe, log, evaluator=None):
    """Stage 2: the LoRA classification adapter on the saved base."""
    import torch
    from transformers import AutoModelForCausalLM

    import train_lora as tl

    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = tl.TrainConfig(max_steps=recipe["lora_steps"], batch_size=recipe["lora_batch"], lr=recipe["lora_lr"],
                         seed=recipe["seed"] + 4, progress=log.progress, desc="lora")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, tl.lora_config(recipe["lora_r"], recipe["lora_alpha"], 0.0, recipe["lora_targets"]))
    examples = tl.build_examples(tokenizer, classification_pairs(rows, recipe["keyword_inputs"]))
    stats = tl.train_examples(model, examples, cfg, tl.pad_id(tokenizer),
                              callback=evaluator(model) if evaluator else None)
    stats["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, stats


# ---------------------------------------------------------------------------- build


class Log:
    def __init__(self, progress: bool):
        self.progress = progress
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(data: Path, labels: Path, recipe: dict[str, Any]) -> str:
    """Changes when the data, the labels, the recipe or the code that trains change."""
    h = hashlib.sha256()
    for p in (data, labels, Path(__file__), REPO / "scripts" / "train_lora.py",
              REPO / "deployments" / "classification.py"):
        h.update(p.read_bytes())
    h.update(json.dumps([recipe, SPECIAL_TOKENS, ADDED_TOKENS, CHAT_TEMPLATE], sort_keys=True).encode())
    return h.hexdigest()[:16]


def replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, replacing it: two renames, so ``dest`` is missing for an
    instant only and never half-written."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
    src.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(data: Path, labels_file: Path, out: Path, recipe: dict[str, Any], log: Log, fp: str) -> dict[str, Any]:
    import torch

    import train_lora as tl

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(recipe["threads"])
    random.seed(recipe["seed"])
    rows = clf.read_jsonl(data)
    train_rows, held_rows = clf.heldout_split(rows)
    labels = clf.load_labels(labels_file)
    unknown = sorted({r["label_desc"] for r in rows} - set(labels))
    if unknown:
        raise ValueError(f"labels in {data} missing from {labels_file}: {unknown}")
    held_pairs = [(r["sentence"], r["label_desc"]) for r in held_rows][: recipe["eval_n"]]

    def evaluator(model):
        def cb(step):
            if recipe["eval_every"] and (step + 1) % recipe["eval_every"] == 0:
                acc = tl.accuracy(model, tokenizer, held_pairs[:500], labels)
                model.train()
                log(f"  step {step + 1}: held-out accuracy (500) {acc:.3f}")
        return cb

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        base_dir, lora_dir = tmp / "tiny-qwen3", tmp / "tiny-qwen3-lora"
        tokenizer = build_tokenizer(tokenizer_corpus(train_rows, labels), recipe["vocab_size"], 2048)
        log(f"tokenizer: {len(tokenizer)} tokens")
        model, base_stats = build_base(tokenizer, train_rows, recipe, log, evaluator if recipe["eval_every"] else None)
        log(f"base: {base_stats['params']:,} parameters, {base_stats['steps']} steps in {base_stats['seconds']} s, "
            f"loss {base_stats['final_loss']}")
        from transformers import GenerationConfig

        model.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
        GenerationConfig(
            eos_token_id=[model.config.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
            pad_token_id=model.config.pad_token_id,
        ).save_pretrained(base_dir)
        clf.write_labels(labels, base_dir / clf.LABELS_FILENAME)
        base_acc = tl.accuracy(model, tokenizer, held_pairs, labels)
        log(f"base held-out accuracy (transformers, label scoring, {len(held_pairs)} rows): {base_acc:.4f}")
        del model

        adapter, lora_stats = build_adapter(base_dir, tokenizer, train_rows, recipe, log,
                                            evaluator if recipe["eval_every"] else None)
        lora_acc = tl.accuracy(adapter, tokenizer, held_pairs, labels)
        log(f"adapter: {lora_stats['steps']} steps in {lora_stats['seconds']} s, loss {lora_stats['final_loss']}; "
            f"held-out accuracy {lora_acc:.4f}")
        accuracy = {"method": "transformers, log-probability of each label as the answer, argmax",
                    "rows": len(held_pairs), "base": round(base_acc, 4), "base+adapter": round(lora_acc, 4)}
        tl.save_adapter(adapter, lora_dir, labels, {
            "base": "models/tiny-qwen3", "data": f"{data.name} minus held-out ({clf.HELDOUT_RULE})",
            "lora": {"r": recipe["lora_r"], "alpha": recipe["lora_alpha"], "dropout": 0.0,
                     "targets": recipe["lora_targets"]},
            "train": lora_stats, "prompt": clf.SYSTEM_PROMPT, "heldout_accuracy": accuracy,
        })
        heldout = {
            "data": "../shared/data/tnews/test.json",
            "data_sha256": file_sha256(data),
            "rule": clf.HELDOUT_RULE,
            "n": len(held_rows),
            "heldout_lines": [len(train_rows) + 1, len(rows)],
            "train_lines": [1, len(train_rows)],
            "never_trained_on": "tokenizer, base pre-training and adapter use the train lines only",
            "accuracy": accuracy,
            "fingerprint": fp,
            "recipe": recipe,
            "base_training": base_stats,
        }
        (base_dir / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n", encoding="utf-8")
        for d in (base_dir, lora_dir):
            d.chmod(0o755)
        replace_dir(base_dir, out / "tiny-qwen3")
        replace_dir(lora_dir, out / "tiny-qwen3-lora")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return accuracy


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in RECIPE:
            raise SystemExit(f"--set: unknown recipe key {key!r} (known: {', '.join(RECIPE)})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TNEWS JSON-lines file")
    ap.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="TNEWS labels.json")
    ap.add_argument("--out", type=Path, default=REPO / "models", help="output folder")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value (experiments), e.g. --set base_steps=300")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    for p in (args.data, args.labels):
        if not p.is_file():
            print(f"error: file not found: {p}", file=sys.stderr)
            return 2
    recipe = {**RECIPE, **parse_set(args.set)}
    base, lora = args.out / "tiny-qwen3", args.out / "tiny-qwen3-lora"
    stamp = args.out / ".tiny-qwen3.fingerprint"
    fp = fingerprint(args.data, args.labels, recipe)
    if not args.force and stamp.is_file() and stamp.read_text() == fp and base.is_dir() and lora.is_dir():
        print(f"embedded model up to date in {args.out} ({fp})")
        return 0
    log = Log(progress=not args.no_progress and sys.stderr.isatty())
    log(f"building the embedded model in {args.out} (a few CPU minutes)")
    accuracy = build(args.data, args.labels, args.out, recipe, log, fp)
    stamp.write_text(fp)
    log(f"built {base} and {lora} ({fp}); held-out accuracy base {accuracy['base']:.3f}, "
        f"base+adapter {accuracy['base+adapter']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

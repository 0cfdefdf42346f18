"""Fine-tune a LoRA adapter for news classification as chat (prompt → label name).

The prompt is the one of ``deployments/classification.py`` (the server asks exactly the same
way); the loss is on the assistant's answer only (the label name and the end-of-turn token).
Writes a peft adapter folder vLLM can load (``adapter_config.json`` +
``adapter_model.safetensors``), plus ``labels.json`` and ``training.json`` (arguments, data,
final loss, held-out accuracy when evaluated).

    # the embedded tiny model, a quick adapter (CPU, seconds to minutes)
    python scripts/train_lora.py --base models/tiny-qwen3 --out adapters/tnews-tiny --preset tiny --epochs 1
    # the user's recipe for an 8B base (GPU): r=64, alpha=128, dropout 0.05, all projections
    python scripts/train_lora.py --base /models/Qwen3-8B --out adapters/tnews-8b --epochs 2 --batch-size 8

Data: a JSON-lines file with ``sentence``/``text`` and ``label_desc``/``label`` (default: the
shared TNEWS split minus its held-out slice, see ``classification.heldout_split``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from deployments import classification as clf
from deployments.chat_encoding import ChatEncoder

REPO = Path(__file__).resolve().parents[1]

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, dict[str, Any]] = {
    # The user's adapter on Qwen3-8B.
    "8b": dict(r=64, alpha=128, dropout=0.05, targets=ALL_TARGETS, lr=2e-4, batch_size=8),
    # The embedded tiny model (hidden 128): what scripts/build_tiny_model.py trains (600 steps).
    "tiny": dict(r=32, alpha=64, dropout=0.0, targets=ALL_TARGETS, lr=5e-3, batch_size=32),
}


# ---------------------------------------------------------------------------- tokenization


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat (with the classification template variables) exactly as the service's
    tokenizer deployment makes them: the one chat encoding, `deployments/chat_encoding.py`."""
    return ChatEncoder.of(tokenizer).encode(messages, add_generation_prompt, clf.CHAT_TEMPLATE_KWARGS)


def end_of_turn_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
        return tid
    return tokenizer.eos_token_id


def answer_ids(tokenizer, messages: list[dict[str, str]], label: str) -> list[int]:
    """The tokens the model must produce after the generation prompt: whatever the chat template
    puts before the answer (e.g. an empty think block), the label, the end-of-turn token."""
    kwargs = dict(clf.CHAT_TEMPLATE_KWARGS)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": label}], tokenize=False, add_generation_prompt=False, **kwargs
    )
    eot = end_of_turn_id(tokenizer)
    if full.startswith(prompt) and label in full[len(prompt) :]:
        tail = full[len(prompt) :]
        head, _, _ = tail.partition(label)
        ids = (tokenizer.encode(head, add_special_tokens=False) if head else []) + tokenizer.encode(
            label, add_special_tokens=False
        )
    else:
        ids = tokenizer.encode(label, add_special_tokens=False)
    return ids + [eot]


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]
    label: str


def build_examples(tokenizer, pairs: Iterable[tuple[str, str]]) -> list[Example]:
    """(text, label) pairs → examples: the prompt the service sends the engine for the text
    (`ChatEncoder.classification_prompt`), the answer the model must produce."""
    encoder = ChatEncoder.of(tokenizer)
    out = []
    for text, label in pairs:
        prompt = encoder.classification_prompt(text)
        out.append(Example(prompt, answer_ids(tokenizer, clf.build_messages(text), label), label))
    return out


# ---------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0  # of the answer tokens' cross-entropy
    seed: int = 0
    shared_prefix: bool = True  # run the common prompt prefix once per batch
    progress: bool = True
    desc: str = "train"


def _lr_lambda(total: int, warmup_frac: float, min_frac: float) -> Callable[[int], float]:
    warm = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not enabled:

        class _Null:
            def update(self, n=1):
                pass

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)


def answer_loss(
    model,
    batch: list[Example],
    prefix: list[int],
    pad_id: int,
    device,
    lm_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens. With a shared ``prefix`` the prefix runs once
    (batch 1) and its KV cache is repeated over the batch; gradients flow through it.
    ``lm_weight`` > 0 adds that much of the language-modelling loss on the prompt tokens after
    the prefix (the user's text): a denser signal for a model trained from scratch."""
    import torch
    import torch.nn.functional as F

    P = len(prefix)
    rows = [(ex.prompt[P:], ex.answer) for ex in batch]
    L = max(len(p) + len(a) for p, a in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    tgt = torch.full((B, L), -100, dtype=torch.long)
    lm_tgt = torch.full((B, L), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        s = p + a
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        # position t predicts token t+1: the answer tokens are predicted from len(p)-1 …
        tgt[i, len(p) - 1 : len(s) - 1] = torch.tensor(a)
        if lm_weight and len(p) > 1:
            lm_tgt[i, : len(p) - 1] = torch.tensor(p[1:])
    ids, mask, tgt = ids.to(device), mask.to(device), tgt.to(device)
    decoder = model.get_decoder()
    if P:
        from transformers import DynamicCache

        pre = decoder(
            input_ids=torch.tensor([prefix], device=device),
            use_cache=True,
            past_key_values=DynamicCache(config=model.config),
        )
        cache = pre.past_key_values
        cache.batch_repeat_interleave(B)
        full_mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=device), mask], dim=1)
        hidden = decoder(
            input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=True
        ).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    head = model.get_output_embeddings()
    sel = tgt != -100
    loss = F.cross_entropy(head(hidden[sel]).float(), tgt[sel], label_smoothing=label_smoothing)
    if lm_weight:
        lm_tgt = lm_tgt.to(device)
        lsel = lm_tgt != -100
        if lsel.any():
            loss = loss + lm_weight * F.cross_entropy(head(hidden[lsel]).float(), lm_tgt[lsel])
    return loss


def train_loop(
    model,
    params: list,
    total: int,
    loss_at: Callable[[int], torch.Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.05,
    min_lr_frac: float = 0.1,
    grad_clip: float = 1.0,
    progress: bool = True,
    desc: str = "train",
    callback: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay; ``loss_at(step)`` returns the step's loss.
    ``callback(step)`` runs after each optimiser step (evaluation hooks)."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup_frac, min_lr_frac))
    model.train()
    bar = _progress(total, desc, progress)
    t0, ema, losses = time.monotonic(), None, []
    for step in range(total):
        loss = loss_at(step)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        v = float(loss.detach())
        losses.append(v)
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        if callback is not None:
            callback(step)
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"steps": total, "seconds": round(time.monotonic() - t0, 2), "final_loss": round(sum(tail) / len(tail), 4)}


class ExampleBatcher:
    """Shuffled batches of examples (reshuffled each epoch, seeded) and their answer loss,
    with the examples' common prompt prefix run once per batch."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shared_prefix: bool = True,
        lm_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ):
        self.lm_weight, self.label_smoothing = lm_weight, label_smoothing
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []
        prompts = [ex.prompt for ex in examples]
        prefix = list(prompts[0][: clf.common_prefix_len(prompts)]) if shared_prefix else []
        # keep at least one prompt token per example (it predicts the first answer token)
        prefix = prefix[: min(len(prefix), min(len(ex.prompt) for ex in examples) - 1)]
        self.prefix = prefix if len(prefix) >= 8 else []

    def next_batch(self) -> list[Example]:
        if len(self.order) < self.batch_size:
            perm = list(range(len(self.examples)))
            self.rng.shuffle(perm)
            self.order += perm
        batch = [self.examples[i] for i in self.order[: self.batch_size]]
        del self.order[: self.batch_size]
        return batch

    def loss(self, model) -> torch.Tensor:
        device = next(model.parameters()).device
        return answer_loss(
            model, self.next_batch(), self.prefix, self.pad_id, device, self.lm_weight, self.label_smoothing
        )


def train_examples(
    model,
    examples: list[Example],
    cfg: TrainConfig,
    pad_id: int,
    params: list | None = None,
    callback: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (plain or peft: only trainable parameters are optimised) on ``examples``
    with answer-only loss. Returns stats."""
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    batcher = ExampleBatcher(
        examples, cfg.batch_size, pad_id, cfg.seed, cfg.shared_prefix, label_smoothing=cfg.label_smoothing
    )
    steps_per_epoch = max(1, math.ceil(len(examples) / cfg.batch_size))
    total = cfg.max_steps if cfg.max_steps else max(1, round(cfg.epochs * steps_per_epoch))
    stats = train_loop(
        model,
        params,
        total,
        lambda step: batcher.loss(model),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_frac=cfg.warmup_frac,
        min_lr_frac=cfg.min_lr_frac,
        grad_clip=cfg.grad_clip,
        progress=cfg.progress,
        desc=cfg.desc,
        callback=callback,
    )
    stats["shared_prefix_tokens"] = len(batcher.prefix)
    return stats


# ---------------------------------------------------------------------------- evaluation


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode(label, add_special_tokens=False) for label in labels]


def _right_padded(seqs: Sequence[Sequence[int]], pad: int):
    """(input ids, attention mask), right-padded to the longest sequence."""
    import torch

    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, seq in enumerate(seqs):
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
    return ids, mask


def score_labels(
    model, tokenizer, texts: Sequence[str], labels: Sequence[str], batch_size: int = 64
) -> list[list[float]]:
    """Per text, the log-probability of each label as the assistant's answer (label tokens
    followed by the end-of-turn token; when every label differs from the others in one token
    after their common prefix, that token alone decides and is scored). Transformers-side, for
    evaluation; the service does the same through vLLM."""
    import torch

    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    lab = label_token_ids(tokenizer, labels)
    msgs0 = clf.build_messages("x")
    # the template's pre-answer text (e.g. an empty think block) is part of every answer
    head = answer_ids(tokenizer, msgs0, labels[0])[: -(len(lab[0]) + 1)]
    cp = clf.common_prefix_len(lab)
    fast = all(len(x) == cp + 1 for x in lab) and len({x[cp] for x in lab}) == len(lab)
    eot = end_of_turn_id(tokenizer)
    out: list[list[float]] = []
    encoder = ChatEncoder.of(tokenizer)
    prompts = [encoder.classification_prompt(t) + head for t in texts]
    model.eval()
    with torch.no_grad():
        if fast:
            seqs = [p + lab[0][:cp] for p in prompts]
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                ids, mask = _right_padded(chunk, pad)
                h = model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
                last = h[torch.arange(len(chunk), device=dev), mask.sum(1).to(dev) - 1]
                logp = torch.log_softmax(model.get_output_embeddings()(last).float(), -1)
                out += logp[:, [x[cp] for x in lab]].tolist()
            return out
        for p in prompts:  # general case: one sequence per label
            ids, mask = _right_padded([p + x + [eot] for x in lab], pad)
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logp = torch.log_softmax(logits, -1)
            row = []
            for j, x in enumerate(lab):
                pos = range(len(p) - 1, len(p) + len(x))
                toks = x + [eot]
                row.append(float(sum(logp[j, q, t] for q, t in zip(pos, toks))))
            out.append(row)
    return out


def accuracy(model, tokenizer, pairs: Sequence[tuple[str, str]], labels: Sequence[str]) -> float:
    if not pairs:
        return float("nan")
    scores = score_labels(model, tokenizer, [t for t, _ in pairs], labels)
    hits = sum(labels[max(range(len(labels)), key=row.__getitem__)] == y for row, (_, y) in zip(scores, pairs))
    return hits / len(pairs)


# ---------------------------------------------------------------------------- LoRA


def lora_config(r: int, alpha: float, dropout: float, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none", task_type="CAUSAL_LM"
    )


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def train_lora(
    base_model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str],
    cfg: TrainConfig,
    callback: Callable[[int], object] | None = None,
):
    """Wrap ``base_model`` (a transformers causal LM) in a fresh LoRA adapter and train it on
    ``pairs`` (text, label). Returns (peft model, stats)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    model = get_peft_model(base_model, lora_config(r, alpha, dropout, targets))
    examples = build_examples(tokenizer, pairs)
    stats = train_examples(model, examples, cfg, pad_id(tokenizer), callback=callback)
    stats["examples"] = len(examples)
    stats["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, stats


def save_adapter(model, out: Path, labels: Sequence[str], info: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    readme = out / "README.md"  # peft's model-card template; ours is training.json
    if readme.is_file():
        readme.unlink()
    clf.write_labels(labels, out / clf.LABELS_FILENAME)
    (out / "training.json").write_text(json.dumps(info, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- CLI


def load_pairs(data: Path | None, limit: int | None, keyword_inputs: bool = False) -> tuple[list[tuple[str, str]], str]:
    """(text, label) pairs and a description of where they came from. Default: the shared TNEWS
    file minus its held-out slice."""
    rows, source = clf.load_split(data, limit, "train")
    pairs = list(clf.iter_examples(rows))
    if keyword_inputs:
        pairs += [(r["keywords"].replace(",", " "), clf.example_label(r)) for r in rows if r.get("keywords")]
        source += ", plus keyword lists as inputs"
    return pairs, source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--base", type=Path, default=REPO / "models" / "tiny-qwen3", help="base model folder")
    ap.add_argument("--out", type=Path, required=True, help="adapter output folder")
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled JSON-lines file (default: shared TNEWS minus the held-out slice)",
    )
    ap.add_argument(
        "--labels",
        default=None,
        help="labels file or folder (default: the base's labels.json, else shared TNEWS labels)",
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="8b",
        help="defaults for r/alpha/dropout/targets/lr/batch-size (8b: the user's recipe)",
    )
    ap.add_argument("--r", type=int, default=None, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha")
    ap.add_argument("--dropout", type=float, default=None, help="LoRA dropout")
    ap.add_argument("--targets", default=None, help="comma-separated target modules")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    ap.add_argument(
        "--keyword-inputs",
        action="store_true",
        help="also train on 'keyword list → label' examples (rows with TNEWS `keywords`)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--eval-heldout",
        type=int,
        default=0,
        help="after training, report accuracy on the first N held-out rows (0: skip)",
    )
    ap.add_argument("--no-shared-prefix", action="store_true", help="do not batch the common prompt prefix")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    r = args.r if args.r is not None else preset["r"]
    alpha = args.alpha if args.alpha is not None else preset["alpha"]
    dropout = args.dropout if args.dropout is not None else preset["dropout"]
    targets = args.targets.split(",") if args.targets else preset["targets"]
    cfg = TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size or preset["batch_size"],
        lr=args.lr or preset["lr"],
        seed=args.seed,
        shared_prefix=not args.no_shared_prefix,
        progress=not args.no_progress,
        desc="lora",
    )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {
        "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    labels = clf.load_labels(args.labels) if args.labels else clf.labels_for_model(args.base)
    pairs, source = load_pairs(args.data, args.limit, args.keyword_inputs)
    unknown = sorted({y for _, y in pairs} - set(labels))
    if unknown:
        print(f"error: labels not in the label set: {unknown[:5]}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
    print(f"training LoRA r={r} alpha={alpha} dropout={dropout} on {len(pairs)} examples ({source})", flush=True)
    model, stats = train_lora(base, tokenizer, pairs, r=r, alpha=alpha, dropout=dropout, targets=targets, cfg=cfg)
    info: dict[str, Any] = {
        "base": str(args.base),
        "data": source,
        "labels": len(labels),
        "lora": {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)},
        "train": {**asdict(cfg), **stats},
        "prompt": clf.SYSTEM_PROMPT,
    }
    if args.eval_heldout:
        _, held = clf.heldout_split(clf.read_jsonl(clf.DEFAULT_DATA_FILE))
        held_pairs = list(clf.iter_examples(held))[: args.eval_heldout]
        acc = accuracy(model, tokenizer, held_pairs, labels)
        info["heldout_accuracy"] = {"n": len(held_pairs), "accuracy": round(acc, 4)}
        print(f"held-out accuracy (transformers, label scoring): {acc:.3f} on {len(held_pairs)}")
    save_adapter(model, args.out, labels, info)
    print(f"adapter written to {args.out} ({stats['steps']} steps, {stats['seconds']} s, loss {stats['final_loss']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

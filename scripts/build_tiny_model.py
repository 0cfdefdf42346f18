"""Build the embedded default model offline and deterministically.

Writes, under ``models/`` (git-ignored):

- ``models/tiny-qwen3``: a ~1 M-parameter Qwen3-architecture causal LM (random init, seeded)
  with a byte-level BPE tokenizer trained on the TNEWS titles, the Qwen special tokens and a
  ChatML chat template;
- ``models/tiny-qwen3-lora``: a tiny peft LoRA adapter for it (non-zero B so that it changes
  the model's output).

Nothing is downloaded. Runs in seconds on a laptop CPU; skips work that is already done
unless ``--force`` is given.

    python scripts/build_tiny_model.py [--data ../shared/data/tnews/test.json] [--out models]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tnews" / "test.json"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>"]  # Qwen3 adds these as normal (non-special) added tokens
VOCAB_SIZE = 4096
SEED = 0

# ChatML, as Qwen uses it. `content` is always a string here: the tokenizer deployment
# flattens OpenAI content parts before rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_CONFIG = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def read_texts(data: Path) -> list[str]:
    texts = []
    with data.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            texts.append(row["sentence"])
            if row.get("keywords"):
                texts.append(row["keywords"].replace(",", " "))
    return texts


def build_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
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
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen3Config(
        **{k: v for k, v in MODEL_CONFIG.items() if k not in ("architectures", "model_type")},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    assert len(tokenizer) <= cfg.vocab_size, (len(tokenizer), cfg.vocab_size)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        eos_token_id=[cfg.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=cfg.pad_token_id,
    ).save_pretrained(out)


def build_lora(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED + 1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # non-zero B: the adapter visibly changes the output
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out, safe_serialization=True)


def fingerprint(data: Path) -> str:
    h = hashlib.sha256(data.read_bytes())
    h.update(json.dumps([MODEL_CONFIG, SPECIAL_TOKENS, ADDED_TOKENS, CHAT_TEMPLATE, SEED]).encode())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TNEWS JSON-lines file")
    ap.add_argument("--out", type=Path, default=REPO / "models", help="output folder")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)

    if not args.data.is_file():
        print(f"error: data file not found: {args.data}", file=sys.stderr)
        return 2
    base, lora = args.out / "tiny-qwen3", args.out / "tiny-qwen3-lora"
    stamp = args.out / ".tiny-qwen3.fingerprint"
    fp = fingerprint(args.data)
    if not args.force and stamp.is_file() and stamp.read_text() == fp and base.is_dir() and lora.is_dir():
        print(f"embedded model up to date in {args.out} ({fp})")
        return 0
    for p in (base, lora):
        shutil.rmtree(p, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(read_texts(args.data), base)
    build_model(tokenizer, base)
    build_lora(base, lora)
    stamp.write_text(fp)
    print(f"built {base} and {lora} ({fp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

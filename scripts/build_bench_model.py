"""Build a benchmark model whose prefill costs what a real one's does (issue 28): a
Qwen3-architecture causal LM with seeded random weights, generated here (nothing is
downloaded), with the embedded model's tokenizer and chat template, so that every prompt our
benchmarks send tokenizes the same way on both. Used only by benchmarks (cache-aware routing:
a prefix-cache hit must show in TTFT, which the embedded 1 M-parameter model's ~free prefill
cannot); never by the service's defaults or its tests.

The default size (hidden 384, 4 layers, MLP 1024, 6 heads of 64, 2 KV heads: ~7 M parameters
besides the embeddings) makes a 1,000-token prefill take a few hundred milliseconds on one core
of the development machine; `--measure` times it with transformers on one thread and writes the
figure to `bench_model.json` beside the weights. Its outputs are noise: it is for timing only.

    .venv/bin/python scripts/build_bench_model.py --out models/bench-qwen3 --measure
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FROM = REPO / "models" / "tiny-qwen3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build(
    out: Path,
    hidden: int = 384,
    layers: int = 4,
    intermediate: int = 1024,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 64,
    max_len: int = 4096,
    seed: int = 0,
) -> dict:
    """Write the model to `out` (replacing it) and return its description."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    base = json.loads((TOKENIZER_FROM / "config.json").read_text())
    config = Qwen3Config(
        vocab_size=base["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
        rope_parameters=base.get("rope_parameters"),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_FROM / name).exists():
            shutil.copy2(TOKENIZER_FROM / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    info = {
        "purpose": "benchmarks only: random weights (seeded), timing-realistic prefill",
        "seed": seed,
        "parameters": params,
        "parameters_without_embeddings": params - embed,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size")},
    }
    (out / "bench_model.json").write_text(json.dumps(info, indent=1))
    return info


def measure_prefill(path: Path, tokens: int = 1000, repeats: int = 3) -> float:
    """Seconds of one `tokens`-token prefill on one thread (transformers, the median of `repeats`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    times = []
    with torch.no_grad():
        model(ids[:, :16])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "bench-qwen3")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="time a 1,000-token prefill on one thread")
    args = ap.parse_args(argv)
    info = build(
        args.out, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.head_dim, seed=args.seed
    )
    print(
        f"{args.out}: {info['parameters'] / 1e6:.1f} M parameters ({info['parameters_without_embeddings'] / 1e6:.1f} M besides the embeddings)"
    )
    if args.measure:
        s = measure_prefill(args.out)
        info["prefill_1000_tokens_one_thread_s"] = round(s, 4)
        (args.out / "bench_model.json").write_text(json.dumps(info, indent=1))
        print(f"1,000-token prefill on one thread: {1000 * s:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

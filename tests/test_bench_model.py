"""The benchmark model builder (scripts/build_bench_model.py, issue 28): a small build of it
loads, carries the embedded model's tokenizer and special ids, and describes itself."""

from __future__ import annotations

import json

from scripts.build_bench_model import TOKENIZER_FROM, build, measure_prefill


def test_a_small_bench_model_builds_loads_and_shares_the_tokenizer(tmp_path):
    out = tmp_path / "bench"
    info = build(out, hidden=64, layers=1, intermediate=128, heads=2, kv_heads=1, head_dim=32, max_len=512)
    assert (TOKENIZER_FROM / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").exists() and (out / "model.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    base = json.loads((TOKENIZER_FROM / "config.json").read_text())
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == base[key], key
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["num_hidden_layers"] == 1
    assert json.loads((out / "bench_model.json").read_text())["parameters"] == info["parameters"] > 0
    assert measure_prefill(out, tokens=64, repeats=1) > 0  # loads and runs a forward pass

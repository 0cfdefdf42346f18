"""Model-side tooling without Ray: the classification prompt and labels, train_lora.py,
merge_lora.py and the metrics of eval_classifier.py (all on CPU, seconds each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODEL_DIR, REPO

from deployments import classification as clf

TNEWS_LABELS = [
    "news_story",
    "news_culture",
    "news_entertainment",
    "news_sports",
    "news_finance",
    "news_house",
    "news_car",
    "news_edu",
    "news_tech",
    "news_military",
    "news_travel",
    "news_world",
    "news_stock",
    "news_agriculture",
    "news_game",
]


# ---------------------------------------------------------------------------- classification.py


def test_labels_default_and_formats(tmp_path: Path):
    assert clf.load_labels() == TNEWS_LABELS  # the shared labels.json (JSON lines)
    (tmp_path / "a.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "b.json").write_text(json.dumps({"labels": [{"label_desc": "p"}, {"name": "q"}]}))
    assert clf.load_labels(tmp_path / "a.json") == ["x", "y"]
    assert clf.load_labels(tmp_path / "b.json") == ["p", "q"]
    clf.write_labels(["m", "n"], tmp_path)  # a folder → labels.json
    assert clf.load_labels(tmp_path) == ["m", "n"]
    assert clf.labels_for_model(tmp_path) == ["m", "n"]
    assert clf.labels_for_model(tmp_path / "nothing-here") == TNEWS_LABELS
    for bad in ("[]", '["a", "a"]', '{"x": 1}', "[1]"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError):
            clf.load_labels(tmp_path / "bad.json")


def test_embedded_model_carries_its_labels():
    if not MODEL_DIR.is_dir():
        pytest.fail("embedded model missing: run scripts/setup.sh (make test does)")
    assert clf.load_labels(MODEL_DIR) == TNEWS_LABELS
    held = json.loads((MODEL_DIR / "heldout.json").read_text())
    assert held["rule"] == clf.HELDOUT_RULE and held["n"] == clf.HELDOUT_LAST_N


def test_prompt_format():
    msgs = clf.build_messages("  央行宣布降息25个基点 ")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == clf.SYSTEM_PROMPT
    assert msgs[1]["content"] == "央行宣布降息25个基点"
    assert clf.build_messages("t") == msgs[:1] + [{"role": "user", "content": "t"}]
    train = clf.build_training_messages("t", "news_car")
    assert train[-1] == {"role": "assistant", "content": "news_car"}
    assert clf.parse_answer(" news_car\n", TNEWS_LABELS) == "news_car"
    assert clf.parse_answer("news_stock market", TNEWS_LABELS) == "news_stock"
    assert clf.parse_answer("finance", TNEWS_LABELS) is None


def test_heldout_split_is_the_last_lines():
    rows = clf.read_jsonl(clf.DEFAULT_DATA_FILE)
    train, held = clf.heldout_split(rows)
    assert len(held) == clf.HELDOUT_LAST_N and held == rows[-clf.HELDOUT_LAST_N :]
    assert train + held == rows


# ---------------------------------------------------------------------------- eval metrics


def test_metrics_by_hand():
    from scripts.eval_classifier import compute_metrics, format_text, html_report

    labels = ["a", "b", "c"]
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", None, "zzz"]
    m = compute_metrics(gold, pred, labels)
    assert m["n"] == 6 and m["invalid"] == 2
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]]
    pa, pb, pc = (m["per_class"][x] for x in labels)
    assert (pa["precision"], pa["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (pb["precision"], pb["recall"]) == (0.5, 0.5)
    assert (pc["precision"], pc["recall"], pc["f1"]) == (0.0, 0.0, 0.0)
    f1a = 2 * 1 * (2 / 3) / (1 + 2 / 3)
    assert m["macro_f1"] == pytest.approx((f1a + 0.5 + 0.0) / 3)
    text = format_text(m)
    assert "accuracy: 0.5000" in text and "invalid labels: 2" in text
    page = html_report(m, {"model": "x"}, [{"index": 2, "text": "<t>", "gold": "a", "pred": "b"}])
    assert "50.00%" in page and "&lt;t&gt;" in page and "(invalid)" in page
    perfect = compute_metrics(["a", "b"], ["a", "b"], labels)
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0  # c: no support, no predictions
    with pytest.raises(ValueError):
        compute_metrics(["q"], ["a"], labels)


def test_eval_script_against_a_fake_server(tmp_path: Path, monkeypatch):
    """The client side of both modes, with the HTTP layer replaced (no server needed)."""
    from scripts import eval_classifier as ev

    calls = []

    def fake_post(self, path, body):
        calls.append((path, body))
        if path == "/v1/classify":
            return {
                "object": "list",
                "model": "m",
                "data": [
                    {"index": i, "label": "news_car", "scores": {"news_car": 1.0}} for i, _ in enumerate(body["input"])
                ],
            }
        return {"choices": [{"message": {"content": "news_car"}}]}

    monkeypatch.setattr(ev.Client, "post", fake_post)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"sentence": f"t{i}", "label_desc": "news_car" if i % 2 else "news_edu"}, ensure_ascii=False)
            for i in range(5)
        )
    )
    for mode in ("classify", "chat"):
        rep = tmp_path / f"{mode}.html"
        assert (
            ev.main(
                [
                    "--data",
                    str(data),
                    "--mode",
                    mode,
                    "--batch-size",
                    "2",
                    "--report",
                    str(rep),
                    "--no-progress",
                    "--model",
                    "tiny-qwen3-lora",
                ]
            )
            == 0
        )
        out = json.loads(rep.with_suffix(".json").read_text())
        assert out["metrics"]["accuracy"] == pytest.approx(2 / 5)
    classify = [b for p, b in calls if p == "/v1/classify"]
    assert [len(b["input"]) for b in classify] == [2, 2, 1] and classify[0]["model"] == "tiny-qwen3-lora"
    chat = [b for p, b in calls if p == "/v1/chat/completions"]
    assert len(chat) == 5 and chat[0]["temperature"] == 0
    assert chat[0]["messages"] == clf.build_messages("t0")


# ---------------------------------------------------------------------------- train → merge


def test_train_lora_writes_a_loadable_adapter(trained_adapter: Path):
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "training.json"} <= {
        p.name for p in trained_adapter.iterdir()
    }
    cfg = PeftConfig.from_pretrained(trained_adapter)
    assert (cfg.r, cfg.lora_alpha, cfg.peft_type.value) == (8, 16, "LORA")
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(trained_adapter / "adapter_model.safetensors")
    assert any("lora_B" in k for k in weights) and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it was trained
    info = json.loads((trained_adapter / "training.json").read_text())
    assert info["train"]["steps"] == 4 and info["lora"]["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    PeftModel.from_pretrained(base, trained_adapter)


def test_train_lora_presets():
    from scripts import train_lora

    assert train_lora.PRESETS["8b"]["r"] == 64 and train_lora.PRESETS["8b"]["alpha"] == 128
    assert train_lora.PRESETS["8b"]["dropout"] == 0.05
    assert train_lora.PRESETS["8b"]["targets"] == train_lora.ALL_TARGETS


def test_merged_model_matches_base_plus_adapter(trained_adapter: Path, tmp_path: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts import merge_lora, train_lora

    merged_dir = tmp_path / "merged"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "merge_lora.py"),
            "--base",
            str(MODEL_DIR),
            "--adapter",
            str(trained_adapter),
            "--out",
            str(merged_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert merge_lora  # importable
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "labels.json"} <= names

    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    plain = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    with_adapter = PeftModel.from_pretrained(base, trained_adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    texts = ["央行宣布降息25个基点", "詹姆斯带领湖人队赢得总冠军", "新款电动汽车正式上市"]
    differs = False
    for text in texts:
        ids = torch.tensor([train_lora.encode_chat(tok, clf.build_messages(text))])
        with torch.no_grad():
            a = with_adapter.generate(ids, max_new_tokens=8, do_sample=False)
            b = merged.generate(ids, max_new_tokens=8, do_sample=False)
            la = with_adapter(input_ids=ids).logits
            lb = merged(input_ids=ids).logits
            lp = plain(input_ids=ids).logits
        assert_same_greedy(with_adapter, a[0].tolist(), b[0].tolist(), ids.shape[1])
        assert torch.allclose(la, lb, atol=1e-4)
        differs |= not torch.allclose(la, lp, atol=1e-3)
    assert differs, "the adapter does not change the model"


def assert_same_greedy(model, a: list[int], b: list[int], prompt_len: int, atol: float = 1e-3) -> None:
    """Two greedy continuations of one prompt by models with (near) equal logits are the same
    tokens, up to a near-tie: where they first part, `model`'s logits for the two choices are
    within `atol` (a tie broken differently by float rounding, whatever the weights)."""
    import torch

    if a == b:
        return
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert prompt_len <= at < min(len(a), len(b)), (a, b)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([a[:at]])).logits[0, -1]
    gap = abs(float(logits[a[at]] - logits[b[at]]))
    assert gap <= atol, (
        f"greedy continuations part at token {at - prompt_len} with a logit gap of {gap:.2e}: {a} vs {b}"
    )

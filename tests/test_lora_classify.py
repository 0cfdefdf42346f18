"""LoRA adapters (config-declared and loaded at run time) and POST /v1/classify, end to end."""

from __future__ import annotations

import httpx
import pytest

from conftest import LORA_DIR, REPO as REPO_ROOT

BASE = "tiny-qwen3"
ADAPTER = "news-lora"


def greedy(client, model: str, text: str = "央行宣布降息25个基点") -> tuple[str, str]:
    r = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": text}],
                                       extra_body={"ignore_eos": True})
    return r.model, r.choices[0].message.content


def test_models_list_base_and_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    assert BASE in cards and ADAPTER in cards
    assert cards[ADAPTER].model_extra.get("parent") == BASE


def test_adapter_changes_greedy_output(client):
    base_model, base_text = greedy(client, BASE)
    lora_model, lora_text = greedy(client, ADAPTER)
    assert base_model == BASE and lora_model == ADAPTER
    assert base_text != lora_text
    # deterministic: the same adapter twice gives the same text
    assert greedy(client, ADAPTER)[1] == lora_text


def test_adapter_streaming(client):
    chunks = list(client.chat.completions.create(
        model=ADAPTER, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "央行宣布降息25个基点"}], extra_body={"ignore_eos": True}))
    assert {c.model for c in chunks} == {ADAPTER}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(client, ADAPTER)[1][: len(text)]


def test_load_use_unload(base_url, client):
    name = "runtime-lora"
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(LORA_DIR)}, timeout=60)
    assert r.status_code == 200, r.text
    assert name in [m.id for m in client.models.list().data]
    assert greedy(client, name) == (name, greedy(client, ADAPTER)[1])  # same weights
    # loading the same name again is refused
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(LORA_DIR)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_exists"
    r = httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                   json={"model": name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    assert r.status_code == 404


@pytest.mark.parametrize("body,param", [
    ({"lora_name": "bad", "lora_path": "/nonexistent/adapter"}, "lora_path"),
    ({"lora_name": "bad", "lora_path": "models/tiny-qwen3"}, "lora_path"),  # a model, not an adapter
    ({"lora_name": "has space", "lora_path": str(LORA_DIR)}, "lora_name"),
    ({"lora_name": BASE, "lora_path": str(LORA_DIR)}, "lora_name"),
])
def test_load_bad_adapter_is_400(base_url, client, body, param):
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert greedy(client, BASE)[1]  # still serving


def test_load_only_safetensors_from_inside_the_adapter_roots(base_url, client, tmp_path_factory):
    """docs/security.md S3: the session app's `lora.adapter_roots` are models/ and pytest's
    temporary folder. A symlink or `..` out of them, and pickled weights inside them, get 400s
    naming `lora_path` that show the path as sent and nothing else of the server's."""
    import os
    import shutil

    root = tmp_path_factory.mktemp("roots")
    pickled = root / "pickled"
    shutil.copytree(LORA_DIR, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    (root / "escape").symlink_to("/etc")
    (root / "shipped").symlink_to(LORA_DIR)  # a link that stays inside a root (models/) is fine
    up = os.path.relpath("/etc", root)
    for lora_path, code in [(str(root / "escape"), "lora_path_not_allowed"),
                            (f"{root}/{up}", "lora_path_not_allowed"),
                            ("models/../../..", "lora_path_not_allowed"),
                            (str(pickled), "lora_weights_not_safetensors")]:
        r = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "probe", "lora_path": lora_path},
                       timeout=60)
        assert r.status_code == 400, (lora_path, r.text)
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("lora_path", code), (lora_path, err)
        assert repr(lora_path) in err["message"] and str(REPO_ROOT) not in err["message"], err
    assert "probe" not in [m.id for m in client.models.list().data]
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(root / "shipped")},
                   timeout=60)
    assert r.status_code == 200, r.text
    try:
        assert greedy(client, "linked") == ("linked", greedy(client, ADAPTER)[1])
    finally:
        httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "linked"}, timeout=60)


def test_classify_single_and_batch(base_url):
    from deployments.classification import load_labels

    labels = load_labels(None)
    for model in (BASE, ADAPTER):
        r = httpx.post(f"{base_url}/v1/classify", timeout=120,
                       json={"model": model, "input": "央行宣布降息25个基点"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == model
        (item,) = body["data"]
        assert item["index"] == 0 and item["label"] in labels
        assert set(item["scores"]) == set(labels)
        assert abs(sum(item["scores"].values()) - 1) < 1e-6
        assert item["label"] == max(item["scores"], key=item["scores"].get)
        assert body["usage"]["prompt_tokens"] > 0
    texts = ["央行宣布降息25个基点", "湖人队击败勇士", "新款电动汽车发布", "高考志愿填报指南"]
    r = httpx.post(f"{base_url}/v1/classify", timeout=120, json={"input": texts, "labels": labels[:5]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3]
    assert all(d["label"] in labels[:5] and set(d["scores"]) == set(labels[:5]) for d in data)


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input[0]"),
    ({"input": ["ok", "  "]}, "input[1]"),
    ({"input": []}, "input"),
    ({"input": ["x"] * 33}, "input"),
    ({"input": "x", "labels": ["news_finance", "not_a_label"]}, "labels"),
    ({"input": "x", "labels": ["news_finance"]}, "labels"),
    ({"input": 5}, "input"),
    ({"input": "x", "model": "nope"}, "model"),
])
def test_classify_bad_input(base_url, body, param):
    r = httpx.post(f"{base_url}/v1/classify", json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


# ---------------------------------------------------------------------------- the trained default


def test_classify_default_model_is_the_trained_adapter(base_url):
    """As in configs/serve_config.yaml: a request without `model` is classified by the
    adapter trained on TNEWS (scripts/build_tiny_model.py), and sensibly so."""
    finance = ["央行宣布降息25个基点", "央行降准0.5个百分点释放长期资金", "A股三大指数集体收涨，券商股领涨",
               "银行理财收益率持续下降"]
    sports = ["詹姆斯带领湖人队赢得总冠军", "国足1比0击败对手晋级", "梅西梅开二度巴萨大胜"]
    r = httpx.post(f"{base_url}/v1/classify", timeout=120, json={"input": finance + sports})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == ADAPTER
    labels = [row["label"] for row in body["data"]]
    # a 0.9 M-parameter model at ~43 % held-out accuracy: most, not all, of a class's clear cases
    assert sum(label in ("news_finance", "news_stock") for label in labels[:len(finance)]) >= 3, labels
    assert labels[len(finance):] == ["news_sports"] * len(sports), labels


def test_classify_heldout_accuracy(base_url):
    """Held-out rows (never trained on): the adapter is far above chance (1/15) and above the
    base model; every label valid. The full 1,000-row figure: scripts/eval_classifier.py."""
    from deployments import classification as clf

    _, held = clf.heldout_split(clf.read_jsonl(clf.DEFAULT_DATA_FILE))
    rows = held[:128]
    labels = clf.load_labels(None)
    accuracy = {}
    for model in (BASE, ADAPTER):
        hits = 0
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            r = httpx.post(f"{base_url}/v1/classify", timeout=300,
                           json={"model": model, "input": [clf.example_text(x) for x in chunk]})
            assert r.status_code == 200, r.text
            preds = [d["label"] for d in r.json()["data"]]
            assert set(preds) <= set(labels)
            hits += sum(p == clf.example_label(x) for p, x in zip(preds, chunk))
        accuracy[model] = hits / len(rows)
    assert accuracy[ADAPTER] >= 0.30, accuracy
    assert accuracy[ADAPTER] > accuracy[BASE] + 0.1, accuracy


def test_adapter_from_train_lora_is_served(base_url, trained_adapter):
    """scripts/train_lora.py's output loads at run time, and the service's label
    probabilities with it are those transformers computes with base + that adapter."""
    import math

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import MODEL_DIR
    from deployments import classification as clf
    from scripts import train_lora

    name, texts = "trained-lora", ["央行宣布降息25个基点", "新款电动汽车正式上市", "詹姆斯带领湖人队赢得总冠军"]
    labels = clf.load_labels(None)
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(trained_adapter)},
                   timeout=60)
    assert r.status_code == 200, r.text
    try:
        r = httpx.post(f"{base_url}/v1/classify", timeout=120, json={"model": name, "input": texts})
        assert r.status_code == 200 and r.json()["model"] == name, r.text
        served = [[d["scores"][label] for label in labels] for d in r.json()["data"]]
        r = httpx.post(f"{base_url}/v1/classify", timeout=120, json={"model": BASE, "input": texts})
        base = [[d["scores"][label] for label in labels] for d in r.json()["data"]]
    finally:
        httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32),
                                   trained_adapter).eval()
    expected = []
    for row in train_lora.score_labels(hf, tok, texts, labels):
        top = max(row)
        exp = [math.exp(v - top) for v in row]
        expected.append([e / sum(exp) for e in exp])
    # vLLM computes in bfloat16 on CPU (dtype auto), transformers in float32: a few % apart
    for got, want, plain in zip(served, expected, base):
        assert max(abs(g - w) for g, w in zip(got, want)) < 0.02, (got, want)
    assert max(abs(g - b) for got, plain in zip(served, base) for g, b in zip(got, plain)) > 0.1  # adapter applied

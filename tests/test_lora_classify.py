"""LoRA adapters (config-declared and loaded at run time) and POST /v1/classify, end to end."""

from __future__ import annotations

import httpx
import pytest
from conftest import ADMIN, LORA_DIR
from conftest import REPO as REPO_ROOT

BASE = "tiny-qwen3"
ADAPTER = "news-lora"


def greedy(client, model: str, text: str = "央行宣布降息25个基点") -> tuple[str, str]:
    r = client.chat.completions.create(
        model=model,
        max_tokens=16,
        temperature=0,
        messages=[{"role": "user", "content": text}],
        extra_body={"ignore_eos": True},
    )
    return r.model, r.choices[0].message.content


def test_models_list_base_and_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    assert BASE in cards and ADAPTER in cards
    assert cards[ADAPTER].model_extra.get("parent") == BASE


def scored(client, model: str, text: str = "央行宣布降息25个基点") -> tuple[str, list[tuple[str, float]]]:
    """A greedy answer's text and its (token, logprob) pairs."""
    r = client.chat.completions.create(
        model=model,
        max_tokens=16,
        temperature=0,
        logprobs=True,
        messages=[{"role": "user", "content": text}],
        extra_body={"ignore_eos": True},
    )
    assert r.model == model
    return r.choices[0].message.content, [(t.token, t.logprob) for t in r.choices[0].logprobs.content]


def test_adapter_changes_the_model(client):
    """The adapter is applied: the answer's tokens or their log-probabilities differ from the
    base model's (the greedy text alone may coincide, whatever the weights); the same adapter
    twice gives the same answer."""
    base = scored(client, BASE)
    lora = scored(client, ADAPTER)
    assert base != lora, f"the adapter changes nothing: {base}"
    assert scored(client, ADAPTER)[0] == lora[0] == greedy(client, ADAPTER)[1]


def test_adapter_streaming(client):
    chunks = list(
        client.chat.completions.create(
            model=ADAPTER,
            max_tokens=8,
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": "央行宣布降息25个基点"}],
            extra_body={"ignore_eos": True},
        )
    )
    assert {c.model for c in chunks} == {ADAPTER}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(client, ADAPTER)[1][: len(text)]


def test_load_use_unload(base_url, client):
    name = "runtime-lora"
    r = httpx.post(
        f"{base_url}/v1/load_lora_adapter",
        headers=ADMIN,
        json={"lora_name": name, "lora_path": str(LORA_DIR)},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert name in [m.id for m in client.models.list().data]
    assert greedy(client, name) == (name, greedy(client, ADAPTER)[1])  # same weights
    # loading the same name again is refused
    r = httpx.post(
        f"{base_url}/v1/load_lora_adapter",
        headers=ADMIN,
        json={"lora_name": name, "lora_path": str(LORA_DIR)},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_exists"
    r = httpx.post(f"{base_url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": name}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={"model": name, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{base_url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": name}, timeout=60)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "body,param",
    [
        ({"lora_name": "bad", "lora_path": "/nonexistent/adapter"}, "lora_path"),
        ({"lora_name": "bad", "lora_path": "models/tiny-qwen3"}, "lora_path"),  # a model, not an adapter
        ({"lora_name": "has space", "lora_path": str(LORA_DIR)}, "lora_name"),
        ({"lora_name": BASE, "lora_path": str(LORA_DIR)}, "lora_name"),
    ],
)
def test_load_bad_adapter_is_400(base_url, client, body, param):
    r = httpx.post(f"{base_url}/v1/load_lora_adapter", headers=ADMIN, json=body, timeout=60)
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
    for lora_path, code in [
        (str(root / "escape"), "lora_path_not_allowed"),
        (f"{root}/{up}", "lora_path_not_allowed"),
        ("models/../../..", "lora_path_not_allowed"),
        (str(pickled), "lora_weights_not_safetensors"),
    ]:
        r = httpx.post(
            f"{base_url}/v1/load_lora_adapter",
            headers=ADMIN,
            json={"lora_name": "probe", "lora_path": lora_path},
            timeout=60,
        )
        assert r.status_code == 400, (lora_path, r.text)
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("lora_path", code), (lora_path, err)
        assert repr(lora_path) in err["message"] and str(REPO_ROOT) not in err["message"], err
    assert "probe" not in [m.id for m in client.models.list().data]
    r = httpx.post(
        f"{base_url}/v1/load_lora_adapter",
        headers=ADMIN,
        json={"lora_name": "linked", "lora_path": str(root / "shipped")},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    try:
        assert greedy(client, "linked") == ("linked", greedy(client, ADAPTER)[1])
    finally:
        httpx.post(f"{base_url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "linked"}, timeout=60)


def test_classify_single_and_batch(base_url):
    from deployments.classification import load_labels

    labels = load_labels(None)
    for model in (BASE, ADAPTER):
        r = httpx.post(f"{base_url}/v1/classify", timeout=120, json={"model": model, "input": "央行宣布降息25个基点"})
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


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": ""}, "input[0]"),
        ({"input": ["ok", "  "]}, "input[1]"),
        ({"input": []}, "input"),
        ({"input": ["x"] * 33}, "input"),
        ({"input": "x", "labels": ["news_finance", "not_a_label"]}, "labels"),
        ({"input": "x", "labels": ["news_finance"]}, "labels"),
        ({"input": 5}, "input"),
        ({"input": "x", "model": "nope"}, "model"),
    ],
)
def test_classify_bad_input(base_url, body, param):
    r = httpx.post(f"{base_url}/v1/classify", json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


# ---------------------------------------------------------------------------- the trained default


# vLLM computes in bfloat16 on CPU (dtype auto), transformers in float32: label probabilities
# up to PROB_TOL apart (seen: 0.011 on 128 held-out rows). The label is compared where
# transformers' top two are more than CLEAR_MARGIN apart (not a near-tie).
PROB_TOL = 0.03
CLEAR_MARGIN = 2 * PROB_TOL


def transformers_probs(texts: list[str], labels: list[str], adapter=None) -> list[list[float]]:
    """Per text, each label's probability as the answer, from transformers on the same model
    folder (+ `adapter`): what /v1/classify must answer on these weights, whatever they are."""
    import math

    import torch
    from conftest import MODEL_DIR
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts import train_lora

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    out = []
    for row in train_lora.score_labels(model.eval(), tok, texts, labels):
        top = max(row)
        exp = [math.exp(v - top) for v in row]
        out.append([e / sum(exp) for e in exp])
    return out


def served_probs(
    base_url: str, texts: list[str], labels: list[str], model: str | None
) -> tuple[str, list[list[float]]]:
    """(the model that answered, per text each label's probability) from /v1/classify."""
    rows, answered = [], set()
    for i in range(0, len(texts), 32):
        body = {"input": texts[i : i + 32]} | ({"model": model} if model else {})
        r = httpx.post(f"{base_url}/v1/classify", timeout=300, json=body)
        assert r.status_code == 200, r.text
        answered.add(r.json()["model"])
        for d in r.json()["data"]:
            assert d["label"] in labels and d["label"] == max(d["scores"], key=d["scores"].get), d
            rows.append([d["scores"][label] for label in labels])
    assert len(answered) == 1, answered
    return answered.pop(), rows


def assert_same_classifier(served: list[list[float]], want: list[list[float]], labels: list[str], what: str) -> None:
    """The service's probabilities are transformers' (within bfloat16 rounding), and so is the
    label wherever transformers' choice is clear."""
    worst = max(abs(g - w) for got, exp in zip(served, want) for g, w in zip(got, exp))
    print(f"\n[{what}] largest probability difference to transformers: {worst:.4f}")
    for i, (got, exp) in enumerate(zip(served, want)):
        assert max(abs(g - w) for g, w in zip(got, exp)) < PROB_TOL, (what, i, got, exp)
        first, second = sorted(exp, reverse=True)[:2]
        if first - second > CLEAR_MARGIN:
            assert got.index(max(got)) == exp.index(first), (what, i, labels[got.index(max(got))], got, exp)


def test_classify_default_model_is_the_trained_adapter(base_url):
    """As in configs/serve_config.yaml: a request without `model` is classified by the
    adapter trained on TNEWS (models/tiny-qwen3-lora), as transformers classifies with it."""
    from deployments.classification import load_labels

    texts = [
        "央行宣布降息25个基点",
        "央行降准0.5个百分点释放长期资金",
        "A股三大指数集体收涨，券商股领涨",
        "银行理财收益率持续下降",
        "詹姆斯带领湖人队赢得总冠军",
        "国足1比0击败对手晋级",
        "梅西梅开二度巴萨大胜",
    ]
    labels = load_labels(None)
    model, default = served_probs(base_url, texts, labels, None)
    assert model == ADAPTER
    named = served_probs(base_url, texts, labels, ADAPTER)[1]
    assert max(abs(a - b) for x, y in zip(default, named) for a, b in zip(x, y)) < 1e-3, (default, named)
    with_adapter = transformers_probs(texts, labels, LORA_DIR)
    assert_same_classifier(default, with_adapter, labels, "default model vs transformers base + adapter")
    # ... and not the base model's answer: the adapter is applied (transformers says how much it moves)
    plain = transformers_probs(texts, labels)
    moved = max(abs(a - b) for x, y in zip(with_adapter, plain) for a, b in zip(x, y))
    assert moved > 4 * PROB_TOL, f"the shipped adapter hardly changes the base model ({moved:.3f})"
    assert max(abs(a - b) for x, y in zip(default, plain) for a, b in zip(x, y)) > moved - 2 * PROB_TOL


def test_classify_heldout_accuracy(base_url):
    """Held-out rows (never trained on): the service classifies them as transformers does with
    the same weights (base and base + adapter), so its accuracy is the one scripts/eval_classifier.py
    and the build record (heldout.json) measure with transformers; every label valid."""
    from deployments import classification as clf

    _, held = clf.heldout_split(clf.read_jsonl(clf.DEFAULT_DATA_FILE))
    rows = held[:128]
    texts, gold = [clf.example_text(x) for x in rows], [clf.example_label(x) for x in rows]
    labels = clf.load_labels(None)
    accuracy = {}
    for model, adapter in ((BASE, None), (ADAPTER, LORA_DIR)):
        served = served_probs(base_url, texts, labels, model)[1]
        want = transformers_probs(texts, labels, adapter)
        assert_same_classifier(served, want, labels, f"{model}: 128 held-out rows")
        accuracy[model] = {
            name: sum(labels[p.index(max(p))] == g for p, g in zip(probs, gold)) / len(rows)
            for name, probs in (("service", served), ("transformers", want))
        }
    print(f"\nheld-out accuracy on {len(rows)} rows: {accuracy}")


def test_adapter_from_train_lora_is_served(base_url, trained_adapter):
    """scripts/train_lora.py's output loads at run time, and the service's label
    probabilities with it are those transformers computes with base + that adapter."""
    from deployments import classification as clf

    name, texts = "trained-lora", ["央行宣布降息25个基点", "新款电动汽车正式上市", "詹姆斯带领湖人队赢得总冠军"]
    labels = clf.load_labels(None)
    r = httpx.post(
        f"{base_url}/v1/load_lora_adapter",
        headers=ADMIN,
        json={"lora_name": name, "lora_path": str(trained_adapter)},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    try:
        model, served = served_probs(base_url, texts, labels, name)
        assert model == name
        base = served_probs(base_url, texts, labels, BASE)[1]
    finally:
        httpx.post(f"{base_url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": name}, timeout=60)
    expected = transformers_probs(texts, labels, trained_adapter)
    plain = transformers_probs(texts, labels)
    assert_same_classifier(served, expected, labels, "trained adapter vs transformers")
    assert_same_classifier(base, plain, labels, "base vs transformers")
    # the adapter is applied: as far from the base's answer as transformers says it moves it
    moved = max(abs(a - b) for x, y in zip(expected, plain) for a, b in zip(x, y))
    assert moved > 4 * PROB_TOL, f"train_lora.py's adapter hardly changes the base model ({moved:.3f})"
    assert max(abs(a - b) for x, y in zip(served, base) for a, b in zip(x, y)) > moved - 2 * PROB_TOL

"""The batch classifier (batch/classify.py): rows in = rows out + rejects on a malformed
file, durable per-shard output written by the workers (atomic files, interruption, a resume that
redoes nothing written), the same labels as the service's /v1/classify code, the batch output
evaluated as the HTTP path is; and its RayJob manifest (schema, drift)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crd_schema import strict

from batch import dataio
from deployments import classification as clf

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1"}
N_GOOD = 24


def _held_out(n: int) -> list[dict]:
    return clf.heldout_split(clf.read_jsonl(clf.DEFAULT_DATA_FILE))[1][:n]


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batch.classify", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Malformed records (line, expected reason), mixed among the good ones; the file ends with a
# truncated line.
BAD = [
    (b'{"id": "b1", "sentence": ""}\n', "empty_text"),
    (b'{"id": "b2", "sentence": "   "}\n', "empty_text"),
    (b"this is not json\n", "malformed_json"),
    (b'{"id": "b3", "sentence": "\xff\xfe broken bytes"}\n', "bad_encoding"),
    (b'{"id": "b4", "sentence": "\\ud800 lone surrogate"}\n', "bad_encoding"),
    (b'["a", "list"]\n', "not_an_object"),
    (b'{"id": "b5", "title": "wrong field"}\n', "missing_text"),
    (b'{"id": "b6", "sentence": 42}\n', "text_not_a_string"),
    (json.dumps({"id": "b7", "sentence": "x" * 2500}).encode() + b"\n", "too_long"),
]
TRUNCATED = b'{"id": "b8", "sentence": "cut sho'


def _write_mixed(path: Path) -> list[dict]:
    good = [
        {"id": f"g{i}", "sentence": r["sentence"], "label_desc": r["label_desc"]}
        for i, r in enumerate(_held_out(N_GOOD))
    ]
    lines = [json.dumps(g, ensure_ascii=False).encode() + b"\n" for g in good]
    for k, (line, _) in enumerate(BAD):  # spread the bad rows among the good ones
        lines.insert(2 * k + 1, line)
    lines.insert(5, b"\n")  # a blank line is not a record
    path.write_bytes(b"".join(lines) + TRUNCATED)
    return good


# ---------------------------------------------------------------------------- parsing (no engine)


def test_shards_cover_every_record_and_rejects_have_reasons(tmp_path):
    src = tmp_path / "in.jsonl"
    good = _write_mixed(src)
    fs, files, fmt = dataio.list_inputs(str(src))
    for shard_rows in (1, 4, 7, 1000):
        shards = dataio.plan_file(fs, files[0], fmt, 0, shard_rows, "")
        assert sum(s.n_rows for s in shards) == len(good) + len(BAD) + 1
        parsed = [dataio.parse_shard(fs, s, "sentence", "id", 2000) for s in shards]
        ids = [rid for p in parsed for _, rid, _ in p.rows]
        assert ids == [g["id"] for g in good]
        reasons = sorted(r["reason"] for p in parsed for r in p.rejects)
        assert reasons == sorted([r for _, r in BAD] + ["truncated"])
        assert all(r["detail"] and r["row"] for p in parsed for r in p.rejects)


def test_csv_records_quoted_newlines_and_bad_rows(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(
        '\ufeffid,title\n1,hello\n2,"two\nlines"\n3,a,b\n4,\n5,\xff\n6,"open\n'.encode().replace(
            "\xff".encode(), b"\xff"
        )
    )
    fs, files, fmt = dataio.list_inputs(str(src))
    shards = dataio.plan_file(fs, files[0], fmt, 0, 2, "")
    parsed = [dataio.parse_shard(fs, s, "title", "id", 2000) for s in shards]
    assert [(rid, text) for p in parsed for _, rid, text in p.rows] == [("1", "hello"), ("2", "two\nlines")]
    assert [r["reason"] for p in parsed for r in p.rejects] == [
        "malformed_csv",
        "empty_text",
        "bad_encoding",
        "malformed_csv",
    ]


def test_output_writes_are_atomic_and_leftovers_ignored(tmp_path):
    """A shard's files land whole (temporary name, then rename), the marker last; what an
    interrupted write leaves behind is invisible to readers and removed once a run is over."""
    fs, (out,) = dataio.filesystem(str(tmp_path / "out"))
    shard = dataio.Shard(key="0000-000000", path="in.jsonl", fmt="jsonl", start_row=1, n_rows=2)
    rows = [{"id": 1, "label": "a", "scores": {"a": 0.75, "b": 0.25}}]
    rejects = [{"source": "in.jsonl", "row": 2, "id": 2, "reason": "empty_text", "detail": "", "raw": ""}]
    stats = {"key": shard.key, "rows_in": 2, "rows_out": 1, "rejects": 1}
    dataio.write_shard(fs, out, shard, rows, rejects, ["a", "b"], stats)
    root = tmp_path / "out"
    assert sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()) == [
        "done/0000-000000.json",
        "parts/0000-000000.jsonl",
        "rejects/0000-000000.jsonl",
    ]
    marker = (root / "done" / "0000-000000.json").stat().st_mtime_ns
    assert all(marker >= (root / sub / "0000-000000.jsonl").stat().st_mtime_ns for sub in ("parts", "rejects"))
    # an interrupted write: a half-written temporary file in each folder (and the old naming)
    for sub, name in (
        ("parts", ".0000-000001.jsonl.0123abcd.tmp"),
        ("rejects", ".0000-000001.jsonl.99.tmp"),
        ("done", ".0000-000001.json.77.tmp"),
        ("parts", "0000-000002.jsonl.tmp"),
    ):
        (root / sub / name).write_bytes(b'{"id": 3, "lab')
    assert dataio.done_shards(fs, out) == {shard.key: stats}
    assert dataio.done_marker(fs, out, shard.key) == stats and dataio.done_marker(fs, out, "0000-000001") is None
    assert dataio.read_output(str(root)) == (rows, rejects)
    assert dataio.remove_temp(fs, out) == 4
    assert len([f for f in root.rglob("*") if f.is_file()]) == 3


def test_worker_does_not_redo_a_written_shard(tmp_path):
    """`process` writes the shard before it returns, and a shard already marked done (a task
    Ray retries, a second run) is returned from its marker without classifying it again."""
    from types import SimpleNamespace

    from batch.worker import ShardClassifier, check_output_visible

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"sentence": f"text {i}"}) + "\n" for i in range(6)))
    fs, files, fmt = dataio.list_inputs(str(src))
    shards = dataio.plan_file(fs, files[0], fmt, 0, 3, "")
    calls = []

    def classify(texts):
        calls.append(len(texts))
        return [{"label": "a", "scores": {"a": 1.0, "b": 0.0}} for _ in texts]

    out = str(tmp_path / "out")
    worker = SimpleNamespace(
        out=out,
        text_field="sentence",
        id_field=None,
        labels=["a", "b"],
        classify=classify,
        config=SimpleNamespace(classification=SimpleNamespace(max_input_chars=2000)),
    )
    first = ShardClassifier.process(worker, shards[0].to_json())
    assert calls == [3] and not first.get("skipped") and dataio.done_marker(fs, out, shards[0].key) == first
    again = ShardClassifier.process(worker, shards[0].to_json())
    assert calls == [3] and again == {**first, "skipped": True}
    ShardClassifier.process(worker, shards[1].to_json())
    assert calls == [3, 3] and [x["id"] for x in dataio.read_output(out)[0]] == list(range(1, 7))

    # workers write the output themselves: one that does not see the driver's job there refuses
    job = {"inputs": "x"}
    with pytest.raises(RuntimeError, match="shared by every node"):
        check_output_visible(out, job)
    dataio.put(fs, f"{out}/_job.json", json.dumps(job).encode())
    check_output_visible(out, job)
    with pytest.raises(RuntimeError, match="another job"):
        check_output_visible(out, {"inputs": "y"})


def test_merged_adapter_config(tmp_path, monkeypatch):
    """--merge-adapter: the engine gets the adapter merged into the base, without LoRA."""
    from batch.classify import DEFAULT_CONFIG, service_config
    from batch.worker import merged_adapter

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with merged_adapter(service_config(DEFAULT_CONFIG), "news-lora") as cfg:
        src = Path(cfg.model.resolved_source())
        assert src.is_relative_to(tmp_path) and (src / "config.json").is_file() and (src / "labels.json").is_file()
        assert cfg.model.model_id == "news-lora" and not cfg.lora.engine_enabled()

    def merges() -> list[Path]:
        return list(tmp_path.glob("classify-batch-*"))

    assert not src.exists() and not merges()  # nothing left behind (16 GB for an 8B)
    with pytest.raises(RuntimeError), merged_adapter(service_config(DEFAULT_CONFIG), "news-lora"):
        raise RuntimeError("the engine did not start")
    assert not merges()


# ---------------------------------------------------------------------------- the job (real engine)


@pytest.fixture(scope="module")
def mixed_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    good = _write_mixed(d / "in.jsonl")
    r = _cli(
        str(d / "in.jsonl"),
        "--out",
        str(d / "out"),
        "--text-field",
        "sentence",
        "--id-field",
        "id",
        "--shard-rows",
        "10",
        "--no-progress",
        "--pool",
        "actors",
    )  # Ray Data: the other tests
    return d, good, r


def test_malformed_file_good_rows_labelled_bad_rows_rejected(mixed_job):
    d, good, r = mixed_job
    assert r.returncode == 2, r.stderr[-3000:]  # finished, with rejects
    rows, rejects = dataio.read_output(str(d / "out"))
    assert sorted(x["id"] for x in rows) == sorted(g["id"] for g in good)
    labels = clf.load_labels(REPO / "models" / "tiny-qwen3")
    for x in rows:
        assert x["label"] in labels and set(x["scores"]) == set(labels)
        assert abs(sum(x["scores"].values()) - 1) < 1e-6 and x["label"] == max(x["scores"], key=x["scores"].get)
    assert sorted(x["reason"] for x in rejects) == sorted([r for _, r in BAD] + ["truncated"])
    summary = json.loads((d / "out" / "_summary.json").read_text())
    assert summary["rows_in"] == len(good) + len(BAD) + 1 == summary["rows_out"] + summary["rejects"]
    assert "rows in" in r.stdout and "rows/s" in r.stdout and "pool: actors" in r.stderr


def test_same_labels_as_the_service_scoring(mixed_job):
    """The batch job's labels and probabilities equal what the service's own code computes:
    the tokenizer deployment's encoding, the model replica's `classify`, the ingress's softmax."""
    import contextlib

    from batch.classify import DEFAULT_CONFIG, resolve_labels, service_config
    from batch.worker import ShardClassifier
    from deployments.api.classify import softmax_rows
    from deployments.model_replica import ModelReplica

    d, good, _ = mixed_job
    batch = {x["id"]: x for x in dataio.read_output(str(d / "out"))[0]}
    cfg = service_config(DEFAULT_CONFIG)
    labels = resolve_labels(cfg, None)
    worker = ShardClassifier(
        cfg.model_dump(mode="json"), cfg.classification.model, labels, str(d / "x"), "sentence", "id"
    )
    try:
        texts = [g["sentence"] for g in good]
        enc = worker.tokenizer.classify_prompts(texts, labels)

        class Replica:  # what ModelReplica.classify uses of its instance
            engine = worker.engine
            stats = type("S", (), {"engine_request": staticmethod(lambda *a: contextlib.nullcontext())})()

            async def _lora_request(self, lora):
                return worker.lora

        scores = worker.loop.run_until_complete(ModelReplica.classify(Replica(), enc.prompts, enc.label_ids, "x"))
        served = softmax_rows(scores, labels)
        direct = worker.classify(texts)
    finally:
        worker.engine.shutdown()
    for g, s, w in zip(good, served, direct):
        got = batch[g["id"]]
        for k in labels:
            assert abs(got["scores"][k] - s["scores"][k]) < 1e-4
        # the same label, or a tie within that rounding (another batch, another summation order)
        for other in (got, w):
            assert other["label"] == s["label"] or abs(s["scores"][other["label"]] - s["scores"][s["label"]]) < 2e-4, (
                other,
                s,
            )

    # The evaluation of the batch output gives the figures of the service's path.
    from scripts import eval_classifier as ev

    gold_file = d / "gold.jsonl"
    gold_file.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in good))
    report = d / "eval.html"
    assert (
        ev.main(
            [
                "--data",
                str(gold_file),
                "--batch-output",
                str(d / "out"),
                "--id-field",
                "id",
                "--report",
                str(report),
                "--no-progress",
            ]
        )
        == 0
    )
    got = json.loads(report.with_suffix(".json").read_text())["metrics"]
    preds = [s["label"] for s in served]
    want = ev.compute_metrics(
        [g["label_desc"] for g in good], preds, labels, ev.confidences(preds, [s["scores"] for s in served])
    )
    assert got["accuracy"] == want["accuracy"] and got["confusion_matrix"] == want["confusion_matrix"]
    assert got["accuracy_ci95"] == pytest.approx(want["accuracy_ci95"])
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-4) and 0 <= got["ece"] <= 1
    assert got["macro_f1"] == pytest.approx(want["macro_f1"])
    assert "ECE" in report.read_text()


def test_wilson_interval_and_ece():
    from scripts import eval_classifier as ev

    lo, hi = ev.wilson_interval(426, 1000)
    assert lo == pytest.approx(0.3956, abs=1e-3) and hi == pytest.approx(0.4570, abs=1e-3)
    assert ev.calibration([True, False], [0.5, 0.5])["ece"] == pytest.approx(0.0)
    assert ev.calibration([True, True, False, False], [0.9, 0.9, 0.9, 0.9])["ece"] == pytest.approx(0.4)


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every finished output file (parts, rejects, done markers): its mtime and content."""
    return {
        str(f.relative_to(out)): (f.stat().st_mtime_ns, f.read_bytes())
        for sub in ("parts", "rejects", "done")
        if (out / sub).is_dir()
        for f in (out / sub).iterdir()
        if dataio.is_output_name(f.name)
    }


def _markers(out: Path) -> int:
    return len(list((out / "done").glob("*.json"))) if (out / "done").is_dir() else 0


N_SHARDS = 30  # enough that an interruption after 3 written shards lands mid-run


def _interrupted(src: Path, out: Path, common: list[str], sig: int, markers: int) -> tuple[int, str]:
    """Run the job and send it `sig` once `markers` shards are written; (exit status, stderr)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "batch.classify", str(src), "--out", str(out), *common],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None and _markers(out) < markers:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before it was interrupted"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


@pytest.mark.parametrize(
    "signals",
    [
        pytest.param((signal.SIGTERM,), id="sigterm"),
        pytest.param((signal.SIGINT, signal.SIGTERM), id="ctrl-c-then-sigterm", marks=pytest.mark.soak),
    ],
)
def test_interrupted_runs_keep_what_workers_wrote_and_resume_redoes_none_of_it(tmp_path, signals):
    """Workers write each shard (part, rejects, then its marker) as soon as it is classified, so
    what an interrupted run computed is on disk whatever reached the driver; a resumed run
    classifies only the rest (CI: SIGTERM, then to the end; `-m soak`: Ctrl-C, then SIGTERM, then
    to the end), and the whole equals an uninterrupted run's output."""
    src = tmp_path / "in.jsonl"
    rows = _held_out(4 * N_SHARDS)
    src.write_text("".join(json.dumps({"sentence": r["sentence"]}, ensure_ascii=False) + "\n" for r in rows))
    common = ["--text-field", "sentence", "--shard-rows", "4", "--batch-size", "2", "--no-progress"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    full = len(signals) > 1  # the soak version compares with an uninterrupted run's output too
    if full:
        r = _cli(str(src), "--out", str(ref), *common)
        assert r.returncode == 0, r.stderr[-3000:]

    written: dict[str, tuple[int, bytes]] = {}
    words = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
    for sig in signals:
        word = words[sig]
        before = len(written) // 3
        rc, err = _interrupted(src, out, common, sig, before + 3)
        assert rc == 128 + sig, err[-3000:]
        assert f"{before} shards already done, {N_SHARDS - before} to classify" in err, err[-2000:]
        now = _snapshot(out)
        assert {k: now[k] for k in written} == written  # nothing already written was rewritten
        written = now
        n = sum(k.startswith("done/") for k in written)
        assert before + 3 <= n < N_SHARDS and len(written) == 3 * n, n  # each marked shard: part + rejects
        # the driver reports what the workers wrote (its workers stopped first), not what came back
        assert f"{word}: {n}/{N_SHARDS} shards done and written" in err, err[-2000:]

    r = _cli(str(src), "--out", str(out), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{n} shards already done, {N_SHARDS - n} to classify" in r.stderr, r.stderr[-2000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_this_run"] == 4 * (N_SHARDS - n)  # only the rest was classified
    after = _snapshot(out)
    assert {k: after[k] for k in written} == written
    # complete, nothing left over, the same files as the uninterrupted run, the same labels
    assert not [f for f in out.rglob("*") if not dataio.is_output_name(f.name)]
    got, rejects = dataio.read_output(str(out))
    assert not rejects and [x["id"] for x in got] == list(range(1, 4 * N_SHARDS + 1))  # each row once, in order
    assert summary["rows_out"] == 4 * N_SHARDS and summary["shards_done"] == N_SHARDS
    if not full:
        return
    assert set(after) == set(_snapshot(ref))
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in ref.iterdir())
    got, rejects = dataio.read_output(str(out))
    want, _ = dataio.read_output(str(ref))
    assert not rejects and [x["id"] for x in got] == [x["id"] for x in want] == list(range(1, 4 * N_SHARDS + 1))
    assert [x["label"] for x in got] == [x["label"] for x in want]
    for a, b in zip(got, want):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    ref_summary = json.loads((ref / "_summary.json").read_text())
    for k in ("rows_in", "rows_out", "rejects", "shards", "shards_done", "labels"):
        assert summary[k] == ref_summary[k], k


# ---------------------------------------------------------------------------- the RayJob


CRD = REPO.parent / "shared" / "kuberay" / "crds" / "ray.io_rayjobs.yaml"


def _defaults(instance, schema) -> None:
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = json.loads(json.dumps(sub["default"]))
            if key in instance:
                _defaults(instance[key], sub)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _defaults(item, schema["items"])


def _rayjob_errors(doc) -> list[str]:
    import copy

    import jsonschema
    import yaml

    crd = yaml.safe_load(CRD.read_text())
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert ver["served"]
    schema = ver["schema"]["openAPIV3Schema"]
    schema = {
        **schema,
        "properties": {
            **schema["properties"],
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        },
    }
    doc = copy.deepcopy(doc)
    _defaults(doc, schema)
    return [
        f"{'/'.join(map(str, e.path))}: {e.message[:200]}"
        for e in jsonschema.Draft7Validator(strict(schema)).iter_errors(doc)
    ]


def test_rayjob_validates_against_the_crd():
    import yaml

    from scripts.manifests import rayjob as gen_rayjob

    doc = yaml.safe_load(gen_rayjob.RAYJOB.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert not _rayjob_errors(doc)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["shutdownAfterJobFinish"] = True  # a typo is rejected
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert len(_rayjob_errors(bad)) >= 2


def test_rayjob_runs_the_rayservice_cluster_and_config():
    import shlex

    import yaml

    from batch import classify as classify_batch
    from deployments.config import ServiceConfig
    from scripts.manifests import rayjob as gen_rayjob
    from scripts.manifests import rayservice as gen

    job = yaml.safe_load(gen_rayjob.RAYJOB.read_text())["spec"]
    service = yaml.safe_load(gen.RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
    cluster = job["rayClusterSpec"]
    assert (
        cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        == service["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    )
    gpu = [w for w in cluster["workerGroupSpecs"] if w["rayStartParams"].get("num-gpus", "0") != "0"]
    assert gpu and all(w["replicas"] == w["maxReplicas"] for w in gpu)
    args = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"][classify_batch.BATCH_ARGS_ENV]
    assert json.loads(args) == gen.app_args(gen.serve_config("gpu"))
    ServiceConfig.model_validate(json.loads(args))
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "batch.classify"]
    parsed = classify_batch.parser().parse_args(argv[3:])
    assert parsed.concurrency == sum(w["maxReplicas"] for w in gpu) and parsed.num_gpus == 1
    for pod in [cluster["headGroupSpec"]["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]]
        assert gen_rayjob.DATA_MOUNT in mounts


def test_rayjob_drift(tmp_path, monkeypatch):
    import yaml

    from scripts.manifests import rayjob as gen_rayjob
    from scripts.manifests import rayservice as gen

    assert gen_rayjob.stale() == "", "the RayJob is stale: run `python scripts/gen_kuberay.py`"
    r = subprocess.run([sys.executable, "scripts/gen_kuberay.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    edited = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    edited["applications"][0]["args"]["classification"]["max_input_chars"] = 1500
    cfg = tmp_path / "serve_config.yaml"
    cfg.write_text(yaml.safe_dump(edited))
    monkeypatch.setattr(gen, "SERVE_CONFIG", cfg)
    assert "max_input_chars" in gen_rayjob.stale()

"""The batch classifier's worker: one vLLM engine per actor, fed whole shards.

It encodes texts with the tokenizer deployment's own code (``PromptTokenizer``: the same chat
prompt and label tokens as ``POST /v1/classify``), scores the labels with
``deployments.engine.label_scoring.score_labels`` (the model replica's implementation) and turns
scores into probabilities with ``deployments.api.classify.softmax_rows``, so a text gets the
label the service would give it. The engine is built from the service config exactly as the
model replica builds it (``deployments.engine``): on a GPU node the actor holds one GPU; on
CPU the engine runs in the actor's process (never vLLM's Ray executor).

With ``merge_adapter`` an adapter is merged into the base weights once per actor
(``scripts/merge_lora.py``) and the engine runs without LoRA: the same function up to float
rounding, and on the CPU engine, whose LoRA kernels dominate a step, several times faster.

``ShardClassifier`` is a Ray Data ``map_batches`` callable class (a batch holds shard
descriptors, one per row) and also a plain Ray actor (``process``).

Progress is durable per shard, on the worker: ``process`` writes the shard's rows, rejects and
done marker (``dataio.write_shard``, each file atomically, the marker last) before it returns,
so what a worker has computed survives a driver that is interrupted or killed before the result
reaches it. A shard already marked done is not classified again (a task Ray retries after an
actor died, a second run): ``process`` returns the marker's statistics with ``skipped``. The
output folder must therefore be the same for every worker: a shared filesystem mounted at the
same path on every node (the RayJob's ReadWriteMany volume) or an object store; given the job
(``job``), a worker checks at start that it sees the driver's ``_job.json`` there and fails
with that explanation otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from batch import dataio
from deployments.engine.process import shutdown_engine


class ShardClassifier:
    def __init__(
        self,
        config: dict[str, Any],
        model: str,
        labels: list[str],
        out: str,
        text_field: str,
        id_field: str | None,
        batch_size: int = 256,
        num_cpus: float | None = 1,
        merge_adapter: bool = False,
        job: dict[str, Any] | None = None,
    ):
        from deployments.config import ServiceConfig

        if job is not None:
            check_output_visible(out, job)
        cfg = ServiceConfig.model_validate(config)
        if model != cfg.model.model_id and model not in cfg.lora.adapters:
            raise ValueError(
                f"unknown model {model!r}: the base {cfg.model.model_id!r} or one of {sorted(cfg.lora.adapters)}"
            )
        with contextlib.ExitStack() as merged:
            if merge_adapter and model != cfg.model.model_id:
                cfg = merged.enter_context(merged_adapter(cfg, model))
                model = cfg.model.model_id
            self._start(cfg, model, labels, out, text_field, id_field, batch_size, num_cpus)
        # the merged weights (a base model's size) are removed once the engine has loaded them

    def _start(self, cfg, model, labels, out, text_field, id_field, batch_size, num_cpus) -> None:
        from deployments.config import resolve_path
        from deployments.engine.factory import start_engine
        from deployments.tokenizer import PromptTokenizer

        self.config = cfg
        self.labels, self.out, self.batch_size = list(labels), out, batch_size
        self.text_field, self.id_field = text_field, id_field
        self.tokenizer = PromptTokenizer(cfg)
        self.loop = asyncio.new_event_loop()
        started = start_engine(cfg, num_cpus)
        self.engine, self.engine_start_s = started.engine, started.start_s
        self.lora = None
        if model != cfg.model.model_id:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(lora_name=model, lora_int_id=1, lora_path=resolve_path(cfg.lora.adapters[model]))

    # ------------------------------------------------------------------ classification

    def classify(self, texts: list[str]) -> list[dict[str, Any] | str]:
        """Each text's ``{"label", "scores"}``, or the reason it cannot be classified (a text
        the tokenizer deployment would refuse with a 400: over the context length, bad Unicode)."""
        from deployments.api.classify import softmax_rows
        from deployments.api.errors import APIError
        from deployments.engine.label_scoring import score_labels

        results: list[dict[str, Any] | str] = [""] * len(texts)
        prompts, where = [], []
        label_ids: list[list[int]] = []  # the labels' token ids (the same for every text)
        for i, text in enumerate(texts):
            try:
                enc = self.tokenizer.classify_prompts([text], self.labels)
            except APIError as exc:
                results[i] = f"{exc.code or 'invalid_input'}: {exc.message}"
                continue
            label_ids = enc.label_ids
            prompts.append(enc.prompts[0])
            where.append(i)
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            scores = self.loop.run_until_complete(score_labels(self.engine, chunk, label_ids, self.lora))
            for k, row in enumerate(softmax_rows(scores, self.labels)):
                results[where[start + k]] = {"label": row["label"], "scores": row["scores"]}
        return results

    def process(self, shard_json: str) -> dict[str, Any]:
        """Classify one shard and write it (rows, rejects, done marker); its statistics."""
        shard = dataio.Shard.from_json(shard_json)
        t0 = time.monotonic()
        fs, _ = dataio.filesystem(self.out)
        done = dataio.done_marker(fs, self.out, shard.key)
        if done is not None:  # written already (a retried task, another run): not redone
            return {**done, "skipped": True}
        parsed = dataio.parse_shard(
            fs, shard, self.text_field, self.id_field, self.config.classification.max_input_chars
        )
        results = self.classify([text for _, _, text in parsed.rows])
        rows, rejects = [], list(parsed.rejects)
        for (row, rid, text), res in zip(parsed.rows, results):
            if isinstance(res, str):
                rejects.append(
                    {
                        "source": shard.path,
                        "row": row,
                        "id": rid,
                        "reason": "too_long"
                        if "context_length" in res
                        else "bad_encoding"
                        if "Unicode" in res
                        else "invalid_input",
                        "detail": res,
                        "raw": text[: dataio.RAW_CHARS],
                    }
                )
            else:
                rows.append({"id": rid, **res})
        stats: dict[str, Any] = {
            "key": shard.key,
            "rows_in": shard.n_rows,
            "rows_out": len(rows),
            "rejects": len(rejects),
            "labels": dict(Counter(r["label"] for r in rows)),
            "reasons": dict(Counter(r["reason"] for r in rejects)),
            "seconds": time.monotonic() - t0,
            "pid": os.getpid(),
        }
        if stats["rows_out"] + stats["rejects"] != stats["rows_in"]:  # never silently drop a row
            raise RuntimeError(f"shard {shard.key}: {shard.n_rows} rows in, {len(rows)} out + {len(rejects)} rejects")
        dataio.write_shard(fs, self.out, shard, rows, rejects, self.labels, stats)
        return stats

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """Ray Data: a batch of shard descriptors (column ``shard``) → their statistics."""
        import json

        return {"stats": [json.dumps(self.process(s)) for s in batch["shard"]]}

    def ready(self) -> float:
        return self.engine_start_s

    def __del__(self):
        shutdown_engine(self)


def check_output_visible(out: str, job: dict[str, Any]) -> None:
    """Fail unless this process sees the driver's ``_job.json`` for `job` under `out`: workers
    write the shards themselves, so the output must be shared by every node."""
    import json
    import socket

    fs, _ = dataio.filesystem(out)
    try:
        with fs.open(f"{out}/_job.json", "rb") as f:
            seen = json.loads(f.read())
    except FileNotFoundError:
        seen = None
    if seen != job:
        raise RuntimeError(
            f"the output folder {out} is not the driver's as seen from {socket.gethostname()} "
            f"({'no _job.json' if seen is None else 'another job'} there): the workers write the shards, "
            "so --out must be a filesystem shared by every node (mounted at the same path) or an object store"
        )


@contextlib.contextmanager
def merged_adapter(cfg, adapter: str) -> Iterator[Any]:
    """`cfg` serving `adapter` merged into the base, in a folder under the temporary directory
    that exists only inside the block (the engine reads it while it starts; an 8B merge is 16 GB
    a worker, so none is left behind, whatever happens)."""
    import shutil
    import tempfile
    from pathlib import Path

    from deployments.config import ServiceConfig, resolve_path
    from scripts.merge_lora import merge

    folder = Path(tempfile.mkdtemp(prefix="classify-batch-"))
    try:
        out = folder / adapter
        merge(Path(cfg.model.resolved_source()), Path(resolve_path(cfg.lora.adapters[adapter])), out)
        doc = cfg.model_dump(mode="json")
        doc["model"].update(model_id=adapter, model_source=str(out), default_model=None, aliases={})
        doc["lora"].update(adapters={}, enabled=False)
        doc["classification"]["model"] = None
        yield ServiceConfig.model_validate(doc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

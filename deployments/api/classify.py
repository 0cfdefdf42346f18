"""POST /v1/classify: validation of the texts and labels, the tokenizer and model calls (label
scoring on the model replica), and the softmax over the label set in the response."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi.responses import JSONResponse

from deployments.admission.capacity import ANONYMOUS, ModelCalls, Tenant, dependency_call
from deployments.api import errors
from deployments.api.generation import request_id
from deployments.api.models import ModelDirectory
from deployments.api.protocol import ClassifyRequest
from deployments.config import ClassificationConfig, LimitsConfig


def check_classify(
    body: ClassifyRequest, cfg: ClassificationConfig, label_set: list[str]
) -> tuple[list[str], list[str]]:
    """(texts, labels) of a valid request; a 400 naming the field otherwise."""
    texts = body.texts()
    if not texts:
        raise errors.bad_request("input must hold at least one text.", "input")
    if len(texts) > cfg.max_inputs:
        raise errors.bad_request(
            f"at most {cfg.max_inputs} texts per request (got {len(texts)}).", "input", "too_many_inputs"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise errors.bad_request(f"input[{i}] is empty.", f"input[{i}]")
        if len(text) > cfg.max_input_chars:
            raise errors.bad_request(
                f"input[{i}] is longer than {cfg.max_input_chars} characters.", f"input[{i}]", "input_too_long"
            )
    labels = body.labels or label_set
    unknown = [label for label in labels if label not in label_set]
    if unknown:
        raise errors.bad_request(
            f"unknown labels {unknown[:5]}; the label set is {label_set}.", "labels", "unknown_labels"
        )
    if len(set(labels)) != len(labels):
        raise errors.bad_request("labels must be distinct.", "labels")
    return texts, list(labels)


def softmax_rows(scores: list[list[float]], labels: list[str]) -> list[dict[str, Any]]:
    """Each text's label (the highest score) and every label's probability."""
    data = []
    for i, row in enumerate(scores):
        top = max(row)
        exp = [math.exp(v - top) for v in row]
        total = sum(exp)
        probs = {label: e / total for label, e in zip(labels, exp)}
        data.append({"index": i, "label": labels[row.index(top)], "scores": probs})
    return data


class ServingClassify:
    def __init__(
        self,
        tokenizer,
        models: ModelDirectory,
        calls: ModelCalls,
        limits: LimitsConfig,
        cfg: ClassificationConfig,
        label_set: list[str],
        stats,
    ):
        self.tokenizer, self.models, self.calls = tokenizer, models, calls
        self.limits, self.cfg, self.label_set, self.stats = limits, cfg, label_set, stats

    async def classify(self, body: ClassifyRequest, who: Tenant = ANONYMOUS) -> JSONResponse:
        """Each text gets a label from the label set (label scoring: never an invalid label)
        and the probability of every label."""
        trace = self.stats.request_started("/v1/classify", request_id=request_id(), stream=False)
        slot = None
        try:
            served, mux = await self.models.resolve(body.model or self.cfg.model)
            texts, labels = check_classify(body, self.cfg, self.label_set)
            slot = self.calls.admit(who)
            async with asyncio.timeout(self.limits.request_timeout_s):
                enc = await dependency_call(self.tokenizer.encode_classify.remote(texts, labels), "tokenizer")
                trace.tokenized(sum(len(p) for p in enc.prompts))
                trace.dispatched()
                unary, _ = self.models.handles(mux)
                _, scores = await self.calls.start(slot, lambda: unary.classify.remote(enc.prompts, enc.label_ids, mux))
        except TimeoutError:
            trace.finished(504, "timeout")
            raise errors.timed_out(self.limits.request_timeout_s) from None
        except BaseException as exc:
            trace.failed(exc)
            raise
        finally:
            if slot is not None:
                slot.release()
        trace.finished(200, completion_tokens=0)
        label_tokens = sum(len(ids) for ids in enc.label_ids)
        prompt_tokens = sum(len(p) + label_tokens for p in enc.prompts)
        return JSONResponse(
            {
                "object": "list",
                "model": served,
                "data": softmax_rows(scores, labels),
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

"""Label scoring on a vLLM engine: the ONE implementation behind ``POST /v1/classify`` (the
model replica) and the batch job (``batch/classify.py``).

Each label's answer tokens (after the tokens all labels share) form a trie; one 1-token engine
step per trie node and prompt returns the log-probabilities of exactly that node's children
(``logprob_token_ids``), so a label's score is the sum of its tokens' log-probabilities, up to a
term common to all labels, which the softmax over the label set cancels.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from typing import Any

from deployments.classification import label_scoring_tokens


@functools.lru_cache(maxsize=64)
def scoring_plan(label_ids: tuple[tuple[int, ...], ...]):
    """(tokens every label shares, each label's tokens still to score, the trie of those as
    [(prefix, sorted next tokens)]), computed once per label set, not per request. Tokens all
    labels share cost no engine step, nor does their shared end-of-turn token when it tells no
    two labels apart: one engine step per text for TNEWS."""
    common, labels = label_scoring_tokens(label_ids)
    children: dict[tuple[int, ...], set[int]] = {}
    for ids in labels:
        for k in range(len(ids)):
            children.setdefault(tuple(ids[:k]), set()).add(ids[k])
    nodes = [(prefix, tuple(sorted(kids))) for prefix, kids in children.items()]
    return common, labels, nodes


async def score_labels(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    lora_request: Any = None,
    tag: str | None = None,
) -> list[list[float]]:
    """Each prompt's score of each label (log-probability of the label's answer tokens, up to
    a term common to all labels). ``engine``: a vLLM ``AsyncLLM``; all the steps are submitted
    at once, so the engine batches them."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    common, labels, nodes = scoring_plan(tuple(map(tuple, label_ids)))
    tag = tag or uuid.uuid4().hex[:12]

    async def step(i: int, n: int) -> dict[int, float]:
        prefix, kids = nodes[n]
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=list(kids), output_kind=RequestOutputKind.FINAL_ONLY
        )
        final: Any = None  # the last (FINAL_ONLY: the one) RequestOutput
        prompt = TokensPrompt(prompt_token_ids=list(prompts[i]) + list(common) + list(prefix))
        async for out in engine.generate(prompt, params, f"cls-{tag}-{i}-{n}", lora_request=lora_request):
            final = out
        row = final.outputs[0].logprobs[0]
        return {t: row[t].logprob for t in kids}

    tables = await asyncio.gather(*[step(i, n) for i in range(len(prompts)) for n in range(len(nodes))])
    index = {prefix: n for n, (prefix, _) in enumerate(nodes)}
    scores = []
    for i in range(len(prompts)):
        row = tables[i * len(nodes) : (i + 1) * len(nodes)]
        scores.append([sum(row[index[tuple(ids[:k])]][ids[k]] for k in range(len(ids))) for ids in labels])
    return scores

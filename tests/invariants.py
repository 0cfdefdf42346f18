"""What a generation must satisfy whatever the model's weights: the tests derive their
expectations from the engine's own output on the same weights (its logprobs tokens, a second
request, transformers on the same model folder), never from one machine's greedy text.

* `special_tokens` / `special_token_ids`: what `skip_special_tokens` (the default) drops from
  the text while `logprobs` still lists it (`<|endoftext|>` under `ignore_eos`, ...).
* `assert_text_of_tokens`: a choice's text is its logprobs tokens, special tokens removed. A
  rare character is split into byte tokens (byte-level BPE): vLLM reports the byte tokens
  before the one that completes the character as "" and the completing token as the whole
  character (vllm/v1/engine/logprobs.py `_correct_decoded_token`); a byte that never forms a
  character stays "" while the text shows it as U+FFFD. So an empty token stands for nothing
  or one U+FFFD of the text; a token still holding U+FFFD (decoded alone) for at most as many
  characters.
* `no_special_tokens_bias`: a `logit_bias` that keeps the special tokens (and any other token
  ids given) out of a generation, so a test that needs visible text or a given structure gets
  it for any weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def special_tokens(tokenizer: Any) -> set[str]:
    """The texts of the tokens the detokenizer skips (`skip_special_tokens`)."""
    added = {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
    return added | set(tokenizer.all_special_tokens)


def special_token_ids(tokenizer: Any) -> set[int]:
    added = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return added | set(tokenizer.all_special_ids)


def token_ids(tokenizer: Any, *texts: str) -> set[int]:
    """The ids of added tokens written as text (`<think>`, `</think>`, ...)."""
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in texts}


def no_special_tokens_bias(tokenizer: Any, also: Iterable[int] = ()) -> dict[str, float]:
    """OpenAI `logit_bias` (-100: never sampled) for every special token and `also`."""
    return {str(i): -100 for i in sorted(special_token_ids(tokenizer) | set(also))}


def visible_pattern(tokens: Sequence[str], specials: set[str]) -> str:
    """A regular expression the text of `tokens` matches: the non-special tokens in order; an
    empty token (a byte of a character) matching nothing or U+FFFD, a run of U+FFFD in a token
    as many characters or fewer."""
    out = []
    for token in tokens:
        if token in specials:
            continue
        if token == "":
            out.append(f"{REPLACEMENT}?")
            continue
        for piece in re.split(f"({REPLACEMENT}+)", token):
            if piece.startswith(REPLACEMENT):
                out.append(f".{{0,{len(piece)}}}")
            elif piece:
                out.append(re.escape(piece))
    return "".join(out)


def assert_text_of_tokens(text: str, tokens: Sequence[str], specials: set[str], what: str = "text") -> None:
    """`text` is what `tokens` (a choice's logprobs tokens, in order) spell once the special
    tokens are skipped."""
    pattern = visible_pattern(tokens, specials)
    assert re.fullmatch(pattern, text, re.DOTALL), (
        f"{what} {text!r} is not its logprobs tokens {list(tokens)!r} without the special tokens {sorted(specials)}"
    )

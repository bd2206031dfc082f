"""Tokenization of prompts and responses, following TRL's DPOTrainer (1.16) so numbers move between the two.

- Standard rows: the tokenizer's EOS is appended to each response (unless already there) and counted; the
  prompt and prompt+response are tokenized as plain strings (with the tokenizer's special tokens).
- Conversational rows: the prompt goes through the chat template with the generation prompt; prompt+response
  as a whole conversation. The assistant turn's end tokens are part of the response.
- The response starts at the shortest common prefix of the tokenized prompt and each prompt+response, so a
  pair's two responses share one prompt.
- Truncation (applied only when a row does not fit; TRL 1.16 applies none below its max_length): the prompt is
  cut from the left to `max_prompt_length`; then each response is cut from the right to fit `max_length`. A
  prompt that alone fills `max_length` is cut from the left to half of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The default cut-offs (TRL's DPOConfig defaults), shared by score, generate and train.
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512


@dataclass(frozen=True)
class Encoded:
    """One prompt with its responses (a pair's chosen and rejected, or one candidate) as token ids."""

    prompt: list[int]
    responses: tuple[list[int], ...]
    truncated: bool

    def sequence(self, i: int) -> list[int]:
        return self.prompt + self.responses[i]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _flat(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return ids[0] if ids and isinstance(ids[0], list) else ids


def render(tok, prompt: Any, responses: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt alone and of prompt+response for each response, before the split."""
    if isinstance(prompt, str):
        eos = tok.eos_token
        texts = [prompt] + [prompt + (r if r.endswith(eos) else r + eos) for r in responses]
        ids = tok(texts)["input_ids"]
        return list(ids[0]), [list(x) for x in ids[1:]]
    prompt = list(prompt)
    texts = [tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)]
    for r in responses:
        convo = prompt + (list(r) if isinstance(r, list) else [{"role": "assistant", "content": r}])
        texts.append(tok.apply_chat_template(convo, tokenize=False))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return list(ids[0]), [list(x) for x in ids[1:]]


def split(prompt_ids: list[int], full: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The shared prompt and each response: the split is the shortest common prefix (as TRL 1.16)."""
    n = min(common_prefix_length(prompt_ids, f) for f in full)
    return prompt_ids[:n], [f[n:] for f in full]


def truncate(prompt: list[int], responses: list[list[int]], max_length: int | None,
             max_prompt_length: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Cut the prompt from the left and the responses from the right, as the module docstring says."""
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[len(prompt) - max_prompt_length:], True
    if max_length is not None and len(prompt) + max(len(r) for r in responses) > max_length:
        if len(prompt) >= max_length:
            keep = max_length // 2
            prompt, cut = prompt[len(prompt) - keep:], True
        budget = max_length - len(prompt)
        if any(len(r) > budget for r in responses):
            responses, cut = [r[:budget] for r in responses], True
    return prompt, responses, cut


def encode(tok, prompt: Any, responses: Sequence[Any], max_length: int | None = None,
           max_prompt_length: int | None = None) -> Encoded:
    """Tokenize one prompt with its responses, split and truncate them."""
    prompt_ids, full = render(tok, prompt, responses)
    p, rs = split(prompt_ids, full)
    p, rs, cut = truncate(p, rs, max_length, max_prompt_length)
    return Encoded(p, tuple(rs), cut)

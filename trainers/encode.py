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
- Chat templates: a tokenizer without one, or a template that refuses a conversation, raises `TemplateError`
  (the caller names the row). A template that refuses only the system role (Gemma's "System role not
  supported", Mistral's alternating roles) gets the system turn folded into the first user turn, as the row's
  `folded` flag records.
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
    folded: bool = False  # the system turn went into the first user turn (the template refuses system)
    double_bos: bool = False  # a string prompt that starts with the BOS the tokenizer adds again

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


class TemplateError(ValueError):
    """Messages that the tokenizer's chat template cannot format; `str(err)` says why, without the row."""


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def fold_system(messages: list[dict]) -> list[dict] | None:
    """The conversation with its system turns put before the first user turn's text; None without one."""
    system = [m for m in messages if m.get("role") == "system"]
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system:
        return None
    text = "\n\n".join(str(m.get("content", "")) for m in system)
    first = next((m for m in rest if m.get("role") == "user"), None)
    if first is None:
        return [{"role": "user", "content": text}, *rest]
    first["content"] = f"{text}\n\n{first.get('content', '')}"
    return rest


def chat_text(tok, messages: list[dict], generation_prompt: bool, fold: bool = False) -> tuple[str, bool]:
    """The conversation through the chat template, and whether its system turn had to be folded.

    `fold` folds the system turn without trying it first (a row whose prompt was already folded)."""
    if not has_chat_template(tok):
        raise TemplateError("message rows need a chat template, and this tokenizer has none")
    folded = fold_system(messages) if fold else None
    if folded is not None:
        return tok.apply_chat_template(folded, tokenize=False, add_generation_prompt=generation_prompt), True
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt), False
    except Exception as err:  # jinja2's TemplateError, raise_exception() in the template, or bad content
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        folded = fold_system(messages)
        if folded is not None:
            try:
                text = tok.apply_chat_template(folded, tokenize=False, add_generation_prompt=generation_prompt)
            except Exception:  # noqa: S110  (the original reason is the one to report)
                pass
            else:
                return text, True
        raise TemplateError(f"the chat template refuses this conversation: {reason}") from None


def render(tok, prompt: Any, responses: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt alone and of prompt+response for each response, before the split."""
    return render_rows(tok, prompt, responses)[:2]


def render_rows(tok, prompt: Any, responses: Sequence[Any]) -> tuple[list[int], list[list[int]], bool, bool]:
    """`render`, plus whether a system turn was folded and whether a string prompt carries a doubled BOS."""
    if isinstance(prompt, str):
        eos = tok.eos_token
        texts = [prompt] + [prompt + (r if r.endswith(eos) else r + eos) for r in responses]
        ids = tok(texts)["input_ids"]
        bos = getattr(tok, "bos_token_id", None)
        double = bos is not None and len(ids[0]) > 1 and ids[0][0] == bos and ids[0][1] == bos
        return list(ids[0]), [list(x) for x in ids[1:]], False, double
    prompt = list(prompt)
    convos = [prompt + (list(r) if isinstance(r, list) else [{"role": "assistant", "content": r}])
              for r in responses]
    texts = [chat_text(tok, prompt, True)]
    for convo in convos:
        text, f = chat_text(tok, convo, False, fold=texts[0][1])
        texts.append((text, f))
    folded = any(f for _, f in texts)
    if folded and not all(f for _, f in texts):  # fold every text of the row alike: the prompt stays a prefix
        texts = [chat_text(tok, prompt, True, fold=True)] + [chat_text(tok, c, False, fold=True) for c in convos]
    texts = [t for t, _ in texts]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return list(ids[0]), [list(x) for x in ids[1:]], folded, False


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
    prompt_ids, full, folded, double = render_rows(tok, prompt, responses)
    p, rs = split(prompt_ids, full)
    p, rs, cut = truncate(p, rs, max_length, max_prompt_length)
    return Encoded(p, tuple(rs), cut, folded, double)

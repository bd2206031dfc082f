"""Preference-data layouts: how one raw record becomes (prompt, chosen, rejected).

- hh: Anthropic HH-RLHF, full dialogues in `chosen`/`rejected` ("\\n\\nHuman: ...\\n\\nAssistant: ...").
  The prompt is everything up to the last "\\n\\nAssistant:", the response the rest. A row whose two dialogues
  differ before that point, or with an empty response or turn, is skipped with its reason.
- ultrafeedback: message lists in `chosen`/`rejected` (the prompt as their common leading messages, or in
  `prompt`), as in UltraFeedback binarized.
- plain: string `prompt`, `chosen`, `rejected`.
- implicit: TRL's implicit-prompt form, `chosen` and `rejected` alone, both beginning with the prompt. For
  strings the prompt ends after the last "\n\nAssistant:" of their common beginning (HH-RLHF's form), else
  at their longest common prefix less a trailing space (TRL's `extract_prompt`); message lists are read as
  ultrafeedback. A row whose two texts share no beginning is skipped with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sera_cli.data.errors import InputError

MARKER = "\n\nAssistant:"
TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TEXT = ("prompt", "chosen", "rejected")
DROPPED = {"messages"}  # whole-conversation copies (UltraFeedback binarized) say nothing new

# Why a row is skipped, as the summary words it.
DIFFER = "whose two dialogues differ before the last turn"
EMPTY_RESPONSE = "with an empty response"
EMPTY_TURN = "with an empty earlier turn"
NO_PROMPT = "with no prompt"
NOT_HH = "that do not start with a Human turn"
NO_SHARED_PROMPT = "whose chosen and rejected share no prompt"


class Skip(Exception):
    """This row cannot become a pair; the argument is the reason."""


Row = tuple[Any, Any, Any]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def hh_dialogue(prefix: str) -> list[dict[str, str]]:
    """The messages of an HH dialogue prefix that ends with "\\n\\nAssistant:"."""
    parts = TURN.split(prefix)
    if parts[0].strip():
        raise Skip(NOT_HH)
    messages = [{"role": ROLES[role], "content": text.strip()}
                for role, text in zip(parts[1::2], parts[2::2], strict=True)][:-1]
    if not messages or any(not m["content"] for m in messages):
        raise Skip(EMPTY_TURN)
    return messages


def hh_row(rec: dict[str, Any], fmt: str) -> Row:
    """Split two HH dialogues into a shared prompt and two final responses."""
    chosen, rejected = rec["chosen"], rec["rejected"]
    ic, ir = chosen.rfind(MARKER), rejected.rfind(MARKER)
    if ic < 0 or ir < 0:
        raise Skip(NO_PROMPT)
    prefix, c, r = chosen[:ic + len(MARKER)], chosen[ic + len(MARKER):], rejected[ir + len(MARKER):]
    if prefix != rejected[:ir + len(MARKER)]:
        raise Skip(DIFFER)
    if not c.strip() or not r.strip():
        raise Skip(EMPTY_RESPONSE)
    messages = hh_dialogue(prefix)
    if fmt == "standard":
        return prefix, c, r
    return messages, assistant(c.strip()), assistant(r.strip())


def _messages(value: Any) -> list[dict[str, Any]]:
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def messages_row(rec: dict[str, Any], fmt: str) -> Row:
    """A prompt and two responses from message lists; the prompt is `prompt` or the common leading messages."""
    chosen, rejected = _messages(rec["chosen"]), _messages(rec["rejected"])
    prompt = rec.get("prompt")
    prompt = user(prompt) if isinstance(prompt, str) else _messages(prompt) if prompt else None
    if prompt is None:
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    if not prompt or any(not str(m["content"] or "").strip() for m in prompt):
        raise Skip(NO_PROMPT if not prompt else EMPTY_TURN)
    if any(m["role"] != "assistant" for m in chosen + rejected):
        raise Skip(DIFFER)
    if not chosen or not rejected or any(not str(m["content"] or "").strip() for m in chosen + rejected):
        raise Skip(EMPTY_RESPONSE)
    return prompt, chosen, rejected


def plain_row(rec: dict[str, Any], fmt: str) -> Row:
    prompt, chosen, rejected = (rec.get(c) for c in TEXT)
    if not isinstance(prompt, str) or not prompt.strip():
        raise Skip(NO_PROMPT)
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        raise Skip(EMPTY_RESPONSE)
    return prompt, chosen, rejected


def prompt_end(chosen: str, rejected: str) -> int:
    """Where the prompt that two texts begin with ends: after the last "\n\nAssistant:" of their common
    beginning, else at their longest common prefix, less a trailing space (as TRL's `extract_prompt`)."""
    k, n = 0, min(len(chosen), len(rejected))
    while k < n and chosen[k] == rejected[k]:
        k += 1
    marker = chosen.rfind(MARKER, 0, k)
    if marker >= 0:
        return marker + len(MARKER)
    return k - 1 if k and chosen[k - 1] == " " else k


def implicit_row(rec: dict[str, Any], fmt: str) -> Row:
    """A prompt and two responses from `chosen`/`rejected` that both begin with the prompt (TRL's implicit form)."""
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, list):
        return messages_row({"chosen": chosen, "rejected": rejected}, fmt)
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise TypeError("implicit rows hold strings or message lists")
    k = prompt_end(chosen, rejected)
    prompt, c, r = chosen[:k], chosen[k:], rejected[k:]
    if not prompt.strip():
        raise Skip(NO_SHARED_PROMPT)
    if not c.strip() or not r.strip():
        raise Skip(EMPTY_RESPONSE)
    if fmt == "conversational" and prompt.endswith(MARKER):
        return hh_dialogue(prompt), assistant(c.strip()), assistant(r.strip())
    return prompt, c, r


READERS: dict[str, Callable[[dict[str, Any], str], Row]] = {
    "hh": hh_row, "ultrafeedback": messages_row, "plain": plain_row, "implicit": implicit_row}
NATURAL = {"hh": "conversational", "ultrafeedback": "conversational", "plain": "standard", "implicit": "standard"}


def detect(file: str, rec: dict[str, Any]) -> str:
    """The layout of a file, from its first record."""
    for column in ("chosen", "rejected"):
        if column not in rec:
            raise InputError(file, f"missing column '{column}' (has: {', '.join(rec)})", row=0,
                             hint="sera convert reads HH-RLHF, UltraFeedback and prompt/chosen/rejected layouts")
    if isinstance(rec["chosen"], list):
        return "ultrafeedback"
    if "prompt" in rec:
        return "plain"
    if isinstance(rec["chosen"], str) and MARKER in rec["chosen"]:
        return "hh"
    if isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):
        if rec["chosen"][:prompt_end(rec["chosen"], rec["rejected"])].strip():
            return "implicit"
        raise InputError(file, "has no 'prompt' column, and its chosen and rejected share no prompt (they do not "
                         "begin with the same text)", row=0, column="chosen",
                         hint="give the prompt in a 'prompt' column")
    raise InputError(file, "has no 'prompt' column and no HH dialogue turns ('\\n\\nAssistant:')", row=0,
                     column="chosen")


def to_format(row: Row, fmt: str) -> Row:
    """A row as strings (standard) or message lists (conversational)."""
    prompt, chosen, rejected = row
    if fmt == "conversational":
        return (user(prompt) if isinstance(prompt, str) else prompt,
                assistant(chosen) if isinstance(chosen, str) else chosen,
                assistant(rejected) if isinstance(rejected, str) else rejected)
    if isinstance(prompt, list):
        if len(prompt) != 1 or prompt[0]["role"] != "user" or len(chosen) != 1 or len(rejected) != 1:
            raise ValueError("a multi-turn conversation cannot be written as plain strings")
        return prompt[0]["content"], chosen[0]["content"], rejected[0]["content"]
    return row


def extras(rec: dict[str, Any]) -> dict[str, Any]:
    """The scalar fields of a record besides the texts, with one level of nested objects lifted."""
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if key in TEXT or key in DROPPED:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if sub not in rec and _scalar(v):
                    out.setdefault(sub, v)
        elif _scalar(value):
            out[key] = value
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)



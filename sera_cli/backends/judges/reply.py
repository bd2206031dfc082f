"""The text of an OpenAI-compatible chat reply, or a one-line reason why a reply has none.

A reply body must be UTF-8 JSON (nested at most `MAX_DEPTH` deep, so a hostile endpoint cannot exhaust the
parser's recursion) with `choices[0].message.content` either a string, null (an empty reply), or a list of
content parts as OpenAI allows: the text of the parts of type "text" is joined; any other part (an image, a
refusal) makes the reply unusable for a judge and is reported.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64


class MalformedReply(ValueError):
    """The endpoint answered, but not with a chat completion: `str(err)` says what was wrong, in one phrase."""


def _depth_ok(raw: str) -> bool:
    """Whether brackets outside strings nest at most MAX_DEPTH deep (checked before json.loads recurses)."""
    depth, in_string, escaped = 0, False, False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def reply_json(body: bytes) -> Any:
    """The parsed reply body; MalformedReply when it is not UTF-8 JSON of reasonable depth."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedReply(f"reply is not UTF-8 (byte {err.start} of {len(body)})") from None
    if not _depth_ok(text):
        raise MalformedReply(f"reply JSON is nested more than {MAX_DEPTH} deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedReply(f"reply is not JSON ({err.msg} at character {err.pos} of {len(text)})") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise MalformedReply("reply JSON is nested too deep") from None


def reply_text(data: Any) -> str:
    """`choices[0].message.content` as one string (see the module docstring); MalformedReply otherwise."""
    try:
        message = data["choices"][0]["message"]
        content = message["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply("reply has no choices[0].message.content") from None
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"),
                                                                                                  str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise MalformedReply(f"reply content part {i} is {kind!r}, not text")
            texts.append(part["text"])
        return "".join(texts)
    raise MalformedReply(f"reply content is a {type(content).__name__}, not a text")

"""Evaluation questions from the formats people have them in: a prompt table, FastChat, AlpacaEval, WizardLM.

- A Parquet or JSONL table with a `prompt` column (a string, used as it is, or a list of messages); its id is
  `question_id`, `id` or a content hash.
- FastChat's question format (Vicuna bench, MT-bench): `question_id`, `category`, `turns` (a list of user turns),
  optional `reference` (reference answers). The first turn by default; `turns="all"` keeps every turn.
- AlpacaEval's JSON (a list of records, or JSONL): `instruction`, optional `output` (the reference answer).
- WizardLM's Evol-Instruct test set: `idx`, `Skill`, `Instruction`.

Every question becomes a `Question` whose turns are user messages (so an instruct model answers through its chat
template), except a plain-string `prompt`, which stays a string, as the data contract says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sera_cli.data.errors import InputError
from sera_cli.data.hashing import digest

FORMATS = "a 'prompt' column, FastChat questions ('question_id', 'turns'), AlpacaEval ('instruction') or " \
          "WizardLM ('Instruction')"


@dataclass(frozen=True)
class Question:
    """One question: `turns` are the user turns (strings); `raw` a plain-string or messages prompt, if given so."""

    question_id: str
    turns: tuple[str, ...]
    category: str | None = None
    reference: tuple[str, ...] | None = None
    raw: Any = None  # the `prompt` cell of a prompt table (string or messages), used as it is for generation

    @property
    def text(self) -> str:
        """The question as the judge reads it (the first turn)."""
        return self.turns[0]


def read_questions(path: str, turns: str = "first") -> list[Question]:
    """The questions of a prompts file, in file order; `turns` is "first" or "all"."""
    if turns not in ("first", "all"):
        raise InputError(path, f"--turns {turns}: expected first or all")
    records = _records(path)
    if not records:
        raise InputError(path, "has no rows")
    first = records[0]
    if "turns" in first:
        make = _fastchat
    elif "prompt" in first:
        make = _prompt_row
    elif "instruction" in first:
        make = _alpaca
    elif "Instruction" in first:
        make = _wizardlm
    else:
        raise InputError(path, f"unknown prompt format: columns {', '.join(sorted(first)) or 'none'}",
                         row=0, hint=f"give {FORMATS}")
    out, seen = [], {}
    for row, rec in enumerate(records):
        q = make(path, row, rec)
        if turns == "first":
            q = Question(q.question_id, q.turns[:1], q.category, q.reference[:1] if q.reference else None, q.raw)
        if q.question_id in seen:
            raise InputError(path, f"question id {q.question_id!r} repeats row {seen[q.question_id]}", row=row,
                             hint="question ids must be unique")
        seen[q.question_id] = row
        out.append(q)
    return out


def _records(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise InputError(path, "no such file")
    if p.suffix == ".parquet":
        from sera_cli.data.tables import read_parquet

        return read_parquet(path).to_pylist()
    text = _read_text(path)
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            data = json.loads(text)
            if not all(isinstance(r, dict) for r in data):
                raise InputError(path, "a JSON list of records (objects) was expected")
            return data
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise InputError(path, "each line must be a JSON object", row=i)
                rows.append(rec)
        return rows
    except json.JSONDecodeError as err:
        raise InputError(path, f"not JSON or JSONL: {err.msg} at line {err.lineno}",
                         hint=f"give Parquet or JSON(L) with {FORMATS}") from None
    except RecursionError:
        raise InputError(path, "its JSON is nested too deep", hint=f"give Parquet or JSON(L) with {FORMATS}") from None


def _read_text(path: str) -> str:
    """A JSON(L) prompts file as text: UTF-8, gzip-compressed or not; a folder or undecodable bytes are errors."""
    import gzip
    import zlib

    p = Path(path)
    if p.is_dir():
        raise InputError(path, "is a folder, not a prompts file", hint=f"give Parquet or JSON(L) with {FORMATS}")
    try:
        data = p.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(path, f"cannot be read: {getattr(err, 'strerror', None) or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, f"is not UTF-8 text (byte {err.start})",
                         hint=f"save it as UTF-8, or give Parquet or JSON(L) with {FORMATS}") from None


def _text(path: str, row: int, rec: dict, column: str) -> str:
    value = rec.get(column)
    if not isinstance(value, str) or not value.strip():
        raise InputError(path, "must be a non-empty string", row=row, column=column)
    return value


def _fastchat(path: str, row: int, rec: dict) -> Question:
    turns = rec.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise InputError(path, "must be a non-empty list of non-empty strings", row=row, column="turns")
    if rec.get("question_id") is None:
        raise InputError(path, "is missing", row=row, column="question_id")
    ref = rec.get("reference")
    return Question(str(rec["question_id"]), tuple(turns), rec.get("category"),
                    tuple(ref) if isinstance(ref, list) and ref else None)


def _prompt_row(path: str, row: int, rec: dict) -> Question:
    prompt = rec.get("prompt")
    qid = rec.get("question_id", rec.get("id"))
    if isinstance(prompt, str) and prompt.strip():
        turns = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role") == "user"]
        if not users or not all(isinstance(u, str) and u.strip() for u in users):
            raise InputError(path, "messages need at least one non-empty user message", row=row, column="prompt")
        turns = (users[-1],)
    else:
        raise InputError(path, "must be a non-empty string or a list of messages", row=row, column="prompt")
    return Question(str(qid) if qid is not None else digest(prompt)[:16], turns, rec.get("category"), raw=prompt)


def _alpaca(path: str, row: int, rec: dict) -> Question:
    text = _text(path, row, rec, "instruction")
    if isinstance(rec.get("input"), str) and rec["input"].strip():
        text = f"{text}\n\n{rec['input']}"
    out = rec.get("output")
    qid = rec.get("question_id", rec.get("id"))
    return Question(str(qid) if qid is not None else digest(text)[:16], (text,), rec.get("dataset"),
                    (out,) if isinstance(out, str) and out.strip() else None)


def _wizardlm(path: str, row: int, rec: dict) -> Question:
    text = _text(path, row, rec, "Instruction")
    qid = rec.get("idx")
    return Question(str(qid) if qid is not None else digest(text)[:16], (text,), rec.get("Skill"))


def messages_for(q: Question, answers: list[str]) -> Any:
    """The prompt that asks for turn len(answers) + 1: the user turns with the model's earlier answers between."""
    if q.raw is not None:
        return q.raw
    msgs: list[dict[str, str]] = []
    for k, answer in enumerate(answers):
        msgs += [{"role": "user", "content": q.turns[k]}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": q.turns[len(answers)]}]

"""The prompts of a generation run: read from any table with a `prompt` column, identified, tokenized, checked.

A prompt's id is the row's `id` when the table has one, else a content hash of the prompt. Rows that repeat a
prompt (same id, same prompt) are generated once. Prompts are tokenized exactly as `score` tokenizes them
(`trainers.encode.render`): plain strings as they are, messages through the chat template with the generation
prompt, so the tokens a response was sampled after are the tokens it is scored after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sera_cli.data.contract import check_prompts
from sera_cli.data.errors import InputError
from sera_cli.data.hashing import digest
from sera_cli.data.tables import Inputs


@dataclass(frozen=True)
class Prompts:
    """Distinct prompts in input order: `rows[i]` is the table row that `ids[i]` and `texts[i]` come from."""

    ids: tuple[str, ...]
    texts: tuple[Any, ...]
    rows: tuple[int, ...]
    kind: str
    repeated: int  # input rows skipped because they repeat an earlier prompt


def read_prompts(inputs: Inputs) -> Prompts:
    """Validate the `prompt` column and identify each distinct prompt."""
    kind = check_prompts(inputs)
    texts = inputs.table.column("prompt").to_pylist()
    given = inputs.table.column("id").to_pylist() if "id" in inputs.table.column_names else [None] * len(texts)
    first: dict[str, int] = {}
    keep: list[tuple[int, str]] = []
    for row, (text, rid) in enumerate(zip(texts, given, strict=True)):
        pid = str(rid) if rid is not None else digest(text)[:16]
        if pid in first:
            if texts[first[pid]] != text:
                file, local = inputs.locate(row)
                other, other_row = inputs.locate(first[pid])
                raise InputError(file, f"id {pid!r} is also the id of {other} row {other_row}, another prompt",
                                 row=local, column="id", hint="ids must be unique per prompt")
            continue
        first[pid] = row
        keep.append((row, pid))
    rows = tuple(r for r, _ in keep)
    return Prompts(tuple(p for _, p in keep), tuple(texts[r] for r in rows), rows, kind, len(texts) - len(rows))


def prompt_tokens(tok, prompt: Any) -> list[int]:
    """The prompt's token ids as `score` sees them (chat template with the generation prompt for messages)."""
    from trainers.encode import render

    return render(tok, prompt, [])[0]


def tokenize_prompts(tok, inputs: Inputs, prompts: Prompts, start: int, stop: int) -> tuple[list[list[int]], int]:
    """Token ids of prompts[start:stop] (as `prompt_tokens`) and how many had their system turn folded into the
    first user turn; a prompt the chat template cannot format is a one-line error naming its row."""
    from sera_cli.backends.chat_templates import template_problem, warn_double_bos
    from trainers.encode import TemplateError, render_rows

    tokens, folded, double = [], 0, []
    for i in range(start, stop):
        try:
            ids, _, f, d = render_rows(tok, prompts.texts[i], [])
        except TemplateError as err:
            raise template_problem(err, *inputs.locate(prompts.rows[i])) from None
        tokens.append(ids)
        folded += f
        if d:
            double.append(prompts.rows[i])
    warn_double_bos(tok, double, inputs.locate)
    return tokens, folded


def check_lengths(inputs: Inputs, prompts: Prompts, tokens: list[list[int]], max_new_tokens: int,
                  context: int | None) -> None:
    """Every prompt plus `max_new_tokens` fits the model's context; else a one-line error naming the row."""
    if context is None:
        return
    for i, ids in enumerate(tokens):
        if len(ids) + max_new_tokens > context:
            file, local = inputs.locate(prompts.rows[i])
            raise InputError(file, f"prompt has {len(ids):,} tokens; with --max-new-tokens {max_new_tokens} that "
                                   f"exceeds the model's context of {context:,} tokens", row=local, column="prompt",
                             hint="lower --max-new-tokens, or shorten or drop the row")

"""The MT-bench judging protocols as pure functions: judge prompts, verdict parsing, both-orders agreement.

Templates are FastChat's MT-bench judge prompts (`sera_cli/eval_templates/judge_prompts.jsonl`, Apache-2.0, see
the NOTICE there): `pair-v2` and `single-v1` for a first turn, their `-multi-turn` forms for a second turn (the
whole conversation shown, the second answer judged), and the `-math-` forms, which show a reference answer, for
math, reasoning and coding questions that have one (as FastChat does).

Pairwise (`--mode pairwise`): each question is judged twice, the model's answer first (order "AB") and second
("BA"). A win or a loss needs both orders to agree; any disagreement is a tie (MT-bench's rule); a tie counts
0.5. A verdict that cannot be parsed from the judge's text makes the question unparseable: it is counted and
reported, and left out of the win rate, never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sera_cli.stages.eval.questions import Question

NEED_REF_CATS = ("math", "reasoning", "coding")
ORDERS = ("AB", "BA")  # AB: the model's answer is assistant A; BA: it is assistant B
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str


@cache
def templates() -> dict[str, Template]:
    return read_templates(Path(__file__).resolve().parents[2] / "eval_templates" / "judge_prompts.jsonl")


def read_templates(path: Path) -> dict[str, Template]:
    """A judge-prompt file in FastChat's format (one JSON object a line: `name`, `system_prompt`,
    `prompt_template` with `{question}`, `{answer_a}`... fields, and FastChat's other keys, unused here)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["name"]: Template(r["name"], r["system_prompt"], r["prompt_template"]) for r in rows}


def template_for(mode: str, q: Question, turn: int) -> Template:
    """The template FastChat uses for this question, turn (1 or 2) and mode ("pairwise" or "single")."""
    ref = q.reference is not None and (q.category or "") in NEED_REF_CATS
    name = ("pair" if mode == "pairwise" else "single") + ("-math" if ref else "") + ("-v1" if mode == "single"
                                                                                      or ref else "-v2")
    return templates()[name + ("-multi-turn" if turn == 2 else "")]


def judge_messages(mode: str, q: Question, turn: int, answer_a: list[str], answer_b: list[str] | None = None
                   ) -> tuple[str, list[dict[str, str]]]:
    """(template name, chat messages) asking the judge about `turn` of `q`; answers are per turn, A's then B's."""
    t = template_for(mode, q, turn)
    ref = list(q.reference or []) + ["", ""]
    fields = {"question": q.turns[0], "ref_answer_1": ref[0], "ref_answer_2": ref[1]}
    if turn == 2:
        fields |= {"question_1": q.turns[0], "question_2": q.turns[1]}
    if mode == "single":
        fields |= {"answer": answer_a[0]} if turn == 1 else {"answer_1": answer_a[0], "answer_2": answer_a[1]}
    elif turn == 1:
        fields |= {"answer_a": answer_a[0], "answer_b": answer_b[0]}
    else:
        fields |= {"answer_a_1": answer_a[0], "answer_a_2": answer_a[1], "answer_b_1": answer_b[0],
                   "answer_b_2": answer_b[1]}
    return t.name, [{"role": "system", "content": t.system}, {"role": "user", "content": t.user.format(**fields)}]


def parse_pairwise(text: str) -> tuple[str | None, str | None]:
    """("A" | "B" | "tie", None), or (None, why) when the text holds no verdict or several different ones."""
    found = [v for v in ("A", "B", "C") if f"[[{v}]]" in text]
    if not found:
        return None, "no verdict [[A]], [[B]] or [[C]] in the judge's text"
    if len(found) > 1:
        return None, f"several verdicts in the judge's text: {', '.join(f'[[{v}]]' for v in found)}"
    return ("tie" if found[0] == "C" else found[0]), None


def parse_rating(text: str) -> tuple[float | None, str | None]:
    """(grade 1-10, None), or (None, why) when the text holds no [[rating]], several, or one out of range."""
    values = sorted({float(m) for m in _RATING.findall(text)})
    if not values:
        return None, "no [[rating]] in the judge's text"
    if len(values) > 1:
        return None, f"several ratings in the judge's text: {', '.join(f'{v:g}' for v in values)}"
    if not 1 <= values[0] <= 10:
        return None, f"rating {values[0]:g} is outside 1-10"
    return values[0], None


def model_point(order: str, verdict: str | None) -> float | None:
    """What one judgment gives the model: 1 (its answer won), 0.5 (tie), 0 (lost), None (unparseable)."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    mine = "A" if order == "AB" else "B"
    return 1.0 if verdict == mine else 0.0


def combine(point_ab: float | None, point_ba: float | None) -> float | None:
    """The question's outcome from both orders: a win or loss needs both to agree, else a tie; None if either
    judgment is unparseable."""
    if point_ab is None or point_ba is None:
        return None
    return point_ab if point_ab == point_ba else 0.5

"""The answers being judged: generated with the `generate` stage, cached per model, or read from a file.

Generated answers are cached in `CACHE/answers/<key>.parquet`, where the key is the model's content fingerprint
and the generation settings (engine, temperature, max new tokens, seed, dtype), one row per (question, turn),
keyed by the question's content. So adding a policy, or questions, later generates only what is new, and a
second run generates nothing. Generation runs `sera_cli.stages.generate.api.generate` with one response per prompt
(greedy by default), resumable by its own chunks. A second turn (`--turns all`) is asked after the model's own
first answer.

`--answers FILE` gives precomputed answers instead: `prompt_id` (the question id), `model` (the name given to
--policy/--baseline) and `response`, with an optional 1-based `turn`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sera_cli.data.errors import InputError
from sera_cli.data.hashing import digest
from sera_cli.data.tables import read_parquet, write_parquet
from sera_cli.stages.eval.questions import Question, messages_for

CACHE = pa.schema([("question_key", pa.string()), ("question_id", pa.string()), ("turn", pa.int32()),
                   ("response", pa.string()), ("finish_reason", pa.string()), ("ntok", pa.int32())])


@dataclass(frozen=True)
class Generation:
    """How answers are generated (what, besides the model, decides them)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    trust_remote_code: bool = False
    progress: bool = True

    def key(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "engine": self.engine, "dtype": self.dtype}


def question_key(q: Question) -> str:
    return digest([list(q.turns), q.raw])[:20]


def label(spec: str) -> str:
    """The name a model goes by in the outputs: what the user typed, without a trailing slash."""
    return spec.rstrip("/") or spec


def generated_answers(spec: str, questions: list[Question], gen: Generation, cache: Path
                      ) -> tuple[dict[str, list[str]], int]:
    """({question_id: [answer per turn]}, answers generated now) for model `spec`, through the cache."""
    from sera_cli.backends.models import resolve

    ref = resolve(spec)
    key = digest([ref.fingerprint, gen.key()])[:20]
    path = cache / "answers" / f"{key}.parquet"
    table = pq.read_table(path) if path.exists() else CACHE.empty_table()
    have = {(k, t): r for k, t, r in zip(table.column("question_key").to_pylist(), table.column("turn").to_pylist(),
                                         table.column("response").to_pylist(), strict=True)}
    made = 0
    for turn in range(1, max(len(q.turns) for q in questions) + 1):
        todo = [q for q in questions if len(q.turns) >= turn and (question_key(q), turn) not in have]
        if not todo:
            continue
        prompts = [messages_for(q, [have[(question_key(q), t)] for t in range(1, turn)]) for q in todo]
        rows = _generate(spec, todo, prompts, turn, gen, path.parent / f".work-{key}-t{turn}")
        table = pa.concat_tables([table, rows])
        write_parquet(table, str(path))
        have |= {(k, turn): r for k, r in zip(rows.column("question_key").to_pylist(),
                                              rows.column("response").to_pylist(), strict=True)}
        made += rows.num_rows
    return {q.question_id: [have[(question_key(q), t)] for t in range(1, len(q.turns) + 1)]
            for q in questions}, made


def _generate(spec: str, questions: list[Question], prompts: list, turn: int, gen: Generation, work: Path
              ) -> pa.Table:
    from sera_cli.stages.generate.api import generate
    from sera_cli.stages.generate.config import GenerateConfig

    work.mkdir(parents=True, exist_ok=True)
    ids = [question_key(q) for q in questions]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), work / "prompts.parquet")
    out = work / "answers.parquet"
    generate(GenerateConfig(inputs=(str(work / "prompts.parquet"),), output=str(out), policy=spec,
                            engine=gen.engine, n=1, temperature=gen.temperature, top_p=gen.top_p,
                            max_new_tokens=gen.max_new_tokens, seed=gen.seed, max_redraws=0, dtype=gen.dtype,
                            device=gen.device, batch_size=gen.batch_size, resume=True,
                            trust_remote_code=gen.trust_remote_code, progress=gen.progress))
    got = pq.read_table(out, columns=["prompt_id", "response", "finish_reason", "ntok"]).to_pylist()
    by_id = {r["prompt_id"]: r for r in got}
    empty = {"response": "", "finish_reason": "empty", "ntok": 0}  # greedy gave an empty answer: kept as one
    rows = [{"question_key": k, "question_id": q.question_id, "turn": turn,
             **{c: by_id.get(k, empty)[c] for c in ("response", "finish_reason", "ntok")}}
            for k, q in zip(ids, questions, strict=True)]
    shutil.rmtree(work, ignore_errors=True)
    return pa.Table.from_pylist(rows, schema=CACHE)


def given_answers(path: str, models: list[str], questions: list[Question]) -> dict[str, dict[str, list[str]]]:
    """{model: {question_id: [answer per turn]}} for the models of `models` that the file has answers for."""
    table = read_parquet(path)
    missing = [c for c in ("prompt_id", "model", "response") if c not in table.column_names]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}",
                         hint="--answers needs prompt_id, model, response (and optionally turn)")
    rows = table.to_pylist()
    found: dict[str, dict[tuple[str, int], str]] = {}
    where: dict[tuple[str, str, int], int] = {}
    for i, r in enumerate(rows):
        if r["model"] not in models:
            continue
        key = (r["model"], *_answer_key(path, i, r))
        if key in where:
            raise InputError(path, f"answers question {key[1]!r} (turn {key[2]}) of model {key[0]!r} again (also "
                                   f"row {where[key]})", row=i, column="prompt_id",
                             hint="give one answer per model, question and turn")
        where[key] = i
        found.setdefault(r["model"], {})[key[1:]] = r["response"]
    out = {}
    for model, answers in found.items():
        per_q = {}
        for q in questions:
            turns = [answers.get((q.question_id, t)) for t in range(1, len(q.turns) + 1)]
            if any(a is None for a in turns):
                raise InputError(path, f"model {model!r} has no answer to question {q.question_id!r} "
                                       f"(turn {turns.index(None) + 1})", column="prompt_id",
                                 hint="give every question's answer, or drop the model from --answers")
            per_q[q.question_id] = turns
        out[model] = per_q
    return out


def _answer_key(path: str, row: int, r: dict) -> tuple[str, int]:
    """(question id, turn) of one row of an --answers file, whose response must be a text: a null id, turn or
    answer is an error naming the row, not an empty answer or question 'None'."""
    pid, response = r["prompt_id"], r["response"]
    turn = 1 if r.get("turn") is None else r["turn"]  # no turn (column or value): a single-turn answer
    if pid is None or pid != pid or (isinstance(pid, str) and not pid.strip()):
        raise InputError(path, "is null, NaN or empty", row=row, column="prompt_id", hint="give the question's id")
    if not isinstance(response, str):
        raise InputError(path, "is null" if response is None else f"is {type(response).__name__}, not a text",
                         row=row, column="response", hint="give the answer's text ('' for an empty answer)")
    if isinstance(turn, bool) or not (isinstance(turn, int) or (isinstance(turn, float) and
                                                      turn.is_integer())) or turn < 1:
        raise InputError(path, f"is {turn!r}; expected a turn number 1, 2, ...", row=row, column="turn",
                         hint="give the 1-based turn, or drop the column for single-turn answers")
    return str(pid), int(turn)

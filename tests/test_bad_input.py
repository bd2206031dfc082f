"""Every bad input, for every command, as the user meets it: one table of cases, one test.

Each case runs `python -m sera_cli ...` in a fresh folder (a real process: real exit code, real stderr, stdout
not a TTY) and checks that it exits with the expected code, prints exactly one line on stderr (blank lines
aside) that names the file, row or column and what to do, leaves no output, partial folder or other new file
behind, and leaves every input byte-identical.

Read-only folders: when the tests run as root, the cases run without CAP_DAC_OVERRIDE (dropped from the
capability bounding set before exec), so permissions apply to them as to any user.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import conversational_table, standard_table

ROOT = Path(__file__).resolve().parents[1]
SERA = [sys.executable, "-m", "sera_cli"]
FAST = ["--max-length", "64", "--max-prompt-length", "32"]


# ----------------------------------------------------------------------------------------------- the inputs

def _parquet(table: pa.Table) -> Callable[[Path], None]:
    return lambda path: pq.write_table(table, path)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _text(data: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(data)


def _truncated(table: pa.Table) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        pq.write_table(table, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return make


def _pairs(**changes) -> pa.Table:
    """The six standard pairs, with `changes` (column -> list of values, or None to drop the column)."""
    table = standard_table()
    for name, values in changes.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        if values is not None:
            table = table.append_column(name, pa.array(values) if not isinstance(values, pa.Array) else values)
    return table


def _scored(irm: list | None = None, **extra) -> pa.Table:
    """A scored-pairs table as `select`, `mix` and `inspect` read it (IRM and the per-side columns)."""
    n = 6
    irm = irm if irm is not None else [0.5, -0.2, 1.0, 0.1, 0.3, -1.0]
    cols = {"id": [f"r{i}" for i in range(n)], "irm": irm,
            "reward_chosen": [0.1] * n, "reward_rejected": [0.0] * n, "ntok_chosen": [3] * n, "ntok_rejected": [4] * n,
            "logp_ref_chosen": [-5.0] * n, "logp_ref_rejected": [-6.0] * n}
    cols.update(extra)
    table = _pairs()
    for k, v in cols.items():
        if v is not None:
            table = table.append_column(k, pa.array(v))
    return table


def _candidates(reward: list) -> pa.Table:
    return pa.table({"prompt_id": ["p0", "p0", "p1", "p1"], "prompt": ["a", "a", "b", "b"],
                     "response": ["x", "y", "z", "w"], "id": ["c0", "c1", "c2", "c3"], "reward": reward,
                     "logp_policy": [-1.0] * 4, "logp_ref": [-1.0] * 4, "ntok": [2] * 4})


def _roles(role: str) -> pa.Table:
    table = conversational_table()
    prompts = table.column("prompt").to_pylist()
    prompts[2] = [{"role": role, "content": "Say hi."}]
    return table.drop_columns(["prompt"]).add_column(0, "prompt", pa.array(prompts, table.schema.field("prompt").type))


def _prev(irm: list) -> pa.Table:
    from sera_cli.data.contract import with_ids

    ids = with_ids(standard_table()).column("id")
    return pa.table({"id": ids, "irm": irm})


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _folder(*files: tuple[str, Callable[[Path], None]], mode: int | None = None) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.mkdir()
        for name, maker in files:
            maker(path / name)
        if mode is not None:
            path.chmod(mode)
    return make


PAIRS = ("pairs.parquet", _parquet(_pairs()))
SCORED = ("scored.parquet", _parquet(_scored()))
LONG = ("long.parquet", _parquet(_pairs(chosen=[" 4.", " Blue.", " Hi there, " * 20, " Paris.", " Yes.", " One."])))
PLAIN_JSONL = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(*[standard_table().column(n).to_pylist()
               for n in ("prompt", "chosen", "rejected")], strict=True)]


# --------------------------------------------------------------------------------------------- the models

@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_policy, tiny_ref) -> dict[str, str]:
    """Tiny models, and broken or odd copies of them, made once for every case."""
    root = tmp_path_factory.mktemp("bad-models")

    def copy(name: str, src: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    short = copy("short-context", tiny_policy)  # a model whose context (32) is shorter than --max-length
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 32}))
    broken = copy("broken-weights", tiny_policy)  # weights that cannot be read
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not safetensors at all")
    remote = copy("remote-code", tiny_policy)  # a model whose config needs its own code
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "sera-custom", "architectures": ["X"],
                                                    "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                                 "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    (remote / "configuration_x.py").write_text("raise RuntimeError('remote code ran')\n")
    (remote / "modeling_x.py").write_text("raise RuntimeError('remote code ran')\n")
    other = copy("other-tokenizer", tiny_ref)  # same weights as tiny_ref, another chat template
    template = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    if (other / "chat_template.jinja").exists():
        (other / "chat_template.jinja").write_text(template)
    else:
        tc = json.loads((other / "tokenizer_config.json").read_text())
        (other / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": template}))
    return {"policy": tiny_policy, "ref": tiny_ref, "short": str(short), "broken": str(broken),
            "remote": str(remote), "othertok": str(other)}


@pytest.fixture(scope="session")
def scored_runs(tmp_path_factory, models) -> dict[str, str]:
    """Real `sera score` outputs (provenance included): the pairs scored against two references, and two shards."""
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    root = tmp_path_factory.mktemp("bad-scored")
    pq.write_table(_pairs(), root / "pairs.parquet")
    out = {}
    for name, ref, shard in (("ref-a", models["ref"], None), ("ref-b", models["policy"], None),
                             ("shard0", models["ref"], (0, 3)), ("shard1", models["ref"], (1, 3))):
        path = root / f"{name}.parquet"
        score(ScoreConfig(inputs=(str(root / "pairs.parquet"),), output=str(path), policy=models["policy"],
                          ref=ref, max_length=64, max_prompt_length=32, chunk_rows=2, shard=shard, progress=False))
        out[name] = str(path)
    return out


# ---------------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # `{name}` is a model of `models` or a file of `scored_runs`
    files: tuple[tuple[str, Callable[[Path], None]], ...] = ()
    line: str = ""  # a regex the one stderr line must match (re.search)
    code: int = 1
    stdin: str | None = None  # a file of the case given on stdin
    readonly: bool = False  # needs permissions to apply (see the module docstring)
    uses: tuple[str, ...] = field(default=())  # session fixtures beyond `models` ("scored_runs")


def _c(id, argv, files=(), line="", **kw) -> Case:
    return Case(id, argv.split() if isinstance(argv, str) else argv, tuple(files), line, **kw)


MODEL = "--policy {policy} --ref {ref}"
RO = ("ro", _folder(("keep.txt", _text("x")), mode=0o555))
SQL_LOCKED = r"(query failed: .*(Cannot access file|read-only|locked).*writes nothing|runs one read-only SELECT)"

CASES: list[Case] = [
    # --- convert
    _c("convert-missing-column", "convert in.jsonl -o out.parquet",
       [("in.jsonl", _text(_jsonl([{"prompt": "a", "chosen": "b"}])))], r"in\.jsonl.*rejected"),
    _c("convert-null", "convert in.jsonl -o out.parquet",
       [("in.jsonl", _text(_jsonl([{"prompt": "a", "chosen": None, "rejected": "c"}])))],
       r"in\.jsonl: no row could be converted.*skipped"),
    _c("convert-wrong-type", "convert in.jsonl -o out.parquet",
       [("in.jsonl", _text(_jsonl([{"prompt": "a", "chosen": 3, "rejected": "c"}])))],
       r"in\.jsonl: no row could be converted.*skipped"),
    _c("convert-empty", "convert in.jsonl -o out.parquet", [("in.jsonl", _text(""))], r"in\.jsonl.*(empty|no rows)"),
    _c("convert-truncated", "convert in.jsonl -o out.parquet",
       [("in.jsonl", _text(_jsonl(PLAIN_JSONL)[:-30]))], r"in\.jsonl.*row 5"),
    _c("convert-bad-flag", "convert in.jsonl --flip 2 -o out.parquet", [("in.jsonl", _text(_jsonl(PLAIN_JSONL)))],
       r"--flip"),
    _c("convert-output-is-input", "convert pairs.parquet -o pairs.parquet", [PAIRS], r"pairs\.parquet.*input"),
    _c("convert-readonly-output", "convert in.jsonl -o ro/out.parquet", [("in.jsonl", _text(_jsonl(PLAIN_JSONL))),
       RO], r"ro/out\.parquet.*(permission|read-only)", readonly=True),
    # --- score: the data
    _c("score-missing-column", f"score in.parquet {MODEL} -o out.parquet",
       [("in.parquet", _parquet(_pairs(rejected=None)))], r"in\.parquet.*'rejected'"),
    _c("score-null", f"score in.parquet {MODEL} -o out.parquet",
       [("in.parquet", _parquet(_pairs(chosen=["a", None, "c", "d", "e", "f"])))],
       r"in\.parquet, row 1, column 'chosen': is null"),
    _c("score-wrong-type", f"score in.parquet {MODEL} -o out.parquet",
       [("in.parquet", _parquet(_pairs(chosen=[1, 2, 3, 4, 5, 6])))], r"in\.parquet.*column 'chosen'.*type"),
    _c("score-empty-file", f"score in.parquet {MODEL} -o out.parquet", [("in.parquet", _bytes(b""))],
       r"in\.parquet.*empty"),
    _c("score-truncated", f"score in.parquet {MODEL} -o out.parquet", [("in.parquet", _truncated(_pairs()))],
       r"in\.parquet.*not a readable Parquet"),
    _c("score-no-rows", f"score in.parquet {MODEL} -o out.parquet", [("in.parquet", _parquet(_pairs().slice(0, 0)))],
       r"in\.parquet.*no rows"),
    _c("score-bad-flag", f"score pairs.parquet {MODEL} --shard x -o out.parquet", [PAIRS], r"--shard"),
    _c("score-unknown-flag", f"score pairs.parquet {MODEL} --bogus -o out.parquet", [PAIRS], r"--bogus", code=2),
    _c("score-duplicate-id", f"score in.parquet {MODEL} -o out.parquet",
       [("in.parquet", _parquet(_pairs(id=["a", "b", "c", "a", "e", "f"])))],
       r"in\.parquet, row 3, column 'id'.*(unique|twice)"),
    _c("score-null-id", f"score in.parquet {MODEL} -o out.parquet",
       [("in.parquet", _parquet(_pairs(id=["a", "b", None, "d", "e", "f"])))],
       r"in\.parquet, row 2, column 'id'.*null"),
    _c("score-unknown-role", f"score in.parquet {MODEL} -o out.parquet",
       [("in.parquet", _parquet(_roles("wizard")))], r"in\.parquet, row 2, column 'prompt'.*role 'wizard'"),
    _c("score-prev-nan", f"score pairs.parquet {MODEL} --prev prev.parquet -o out.parquet",
       [PAIRS, ("prev.parquet", _parquet(_prev([0.1, float("nan"), 0.2, 0.3, 0.4, 0.5])))],
       r"prev\.parquet, row 1, column 'irm'.*(NaN|not finite).*--prev-missing current"),
    _c("score-prev-inf", f"score pairs.parquet {MODEL} --prev prev.parquet -o out.parquet",
       [PAIRS, ("prev.parquet", _parquet(_prev([0.1, 0.2, float("inf"), 0.3, 0.4, 0.5])))],
       r"prev\.parquet, row 2, column 'irm'.*(inf|not finite)"),
    _c("score-prev-duplicate-id", f"score pairs.parquet {MODEL} --prev prev.parquet -o out.parquet",
       [PAIRS, ("prev.parquet", _parquet(pa.table({"id": ["a", "a"], "irm": [0.1, 0.2]})))],
       r"prev\.parquet, row 1, column 'id'"),
    _c("score-output-is-input", f"score pairs.parquet {MODEL} -o pairs.parquet", [PAIRS], r"pairs\.parquet.*input"),
    _c("score-readonly-output", f"score pairs.parquet {MODEL} -o ro/out.parquet", [PAIRS, RO],
       r"ro/out\.parquet.*(permission|read-only)", readonly=True),
    _c("score-readonly-cache", f"score pairs.parquet {MODEL} --cache ro/cache -o out.parquet", [PAIRS, RO],
       r"ro/cache.*(permission|read-only)", readonly=True),
    # --- score: the models
    _c("score-no-such-model", "score pairs.parquet --policy nope/ --ref {ref} -o out.parquet", [PAIRS],
       r"nope.*no such model"),
    _c("score-fake-gguf", "score pairs.parquet --policy fake.gguf --ref {ref} -o out.parquet",
       [PAIRS, ("fake.gguf", _bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40))], r"fake\.gguf.*GGUF"),
    _c("score-empty-gguf", "score pairs.parquet --policy empty.gguf --ref {ref} -o out.parquet",
       [PAIRS, ("empty.gguf", _bytes(b""))], r"empty\.gguf.*(empty|GGUF)"),
    _c("score-broken-weights", "score pairs.parquet --policy {broken} --ref {ref} -o out.parquet", [PAIRS],
       r"broken-weights.*(weights|load)"),
    _c("score-short-context", "score long.parquet --policy {short} --ref {ref} --max-length 64 -o out.parquet",
       [LONG], r"long\.parquet, row 2: .*short-context \(32 positions.*--max-length 32"),
    _c("score-remote-code", "score pairs.parquet --policy {remote} --ref {ref} -o out.parquet", [PAIRS],
       r"remote-code.*--trust-remote-code"),
    _c("score-tokenizer-mismatch", "score pairs.parquet --policy {policy} --ref {othertok} -o out.parquet", [PAIRS],
       r"tokenizers.*differ"),
    # --- select
    _c("select-missing-column", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_pairs(rejected=None).append_column("irm", pa.array([1.0] * 6))))],
       r"in\.parquet.*'rejected'"),
    _c("select-no-irm", "select pairs.parquet --top 0.5 -o out.parquet", [PAIRS], r"pairs\.parquet.*'irm'"),
    _c("select-null-irm", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored([0.1, None, 0.3, 0.2, 0.1, 0.0])))], r"in\.parquet, row 1, column 'irm'"),
    _c("select-nan-irm", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored([0.1, 0.2, float("nan"), 0.2, 0.1, 0.0])))],
       r"in\.parquet, row 2, column 'irm'"),
    _c("select-inf-irm", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored([0.1, 0.2, 0.3, float("-inf"), 0.1, 0.0])))],
       r"in\.parquet, row 3, column 'irm'.*(inf|finite)"),
    _c("select-inf-reward-pairs", "select in.parquet --pairs -o out.parquet",
       [("in.parquet", _parquet(_candidates([0.1, float("inf"), 0.2, 0.3])))],
       r"in\.parquet, row 1, column 'reward'.*(inf|finite)"),
    _c("select-wrong-type", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored(["a", "b", "c", "d", "e", "f"])))], r"in\.parquet.*'irm'.*number"),
    _c("select-duplicate-id", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored(id=["a", "b", "a", "c", "d", "e"])))], r"in\.parquet, row 2, column 'id'"),
    _c("select-null-id", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored(id=["a", "b", None, "c", "d", "e"])))], r"in\.parquet, row 2, column 'id'"),
    _c("select-empty-file", "select in.parquet --top 0.5 -o out.parquet", [("in.parquet", _bytes(b""))],
       r"in\.parquet.*empty"),
    _c("select-truncated", "select in.parquet --top 0.5 -o out.parquet", [("in.parquet", _truncated(_scored()))],
       r"in\.parquet.*not a readable Parquet"),
    _c("select-empty-stdin", "select - --top 0.5 -o out.parquet", [("empty", _bytes(b""))],
       r"stdin.*empty", stdin="empty"),
    _c("select-bad-flag", "select scored.parquet --top 2 -o out.parquet", [SCORED], r"--top"),
    _c("select-output-is-input", "select scored.parquet --top 0.5 -o scored.parquet", [SCORED],
       r"scored\.parquet.*input"),
    _c("select-readonly-output", "select scored.parquet --top 0.5 -o ro/out.parquet", [SCORED, RO],
       r"ro/out\.parquet.*(permission|read-only)", readonly=True),
    # --- mix
    _c("mix-missing-irm", "mix --offline pairs.parquet --k2 0 --n 6 -o out.parquet", [PAIRS], r"pairs\.parquet.*'irm'"),
    _c("mix-nan-irm", "mix --offline in.parquet --k2 0 --n 6 -o out.parquet",
       [("in.parquet", _parquet(_scored([0.1, float("nan"), 0.3, 0.2, 0.1, 0.0])))],
       r"in\.parquet, row 1, column 'irm'"),
    _c("mix-duplicate-id", "mix --offline in.parquet --k2 0 --n 6 -o out.parquet",
       [("in.parquet", _parquet(_scored(id=["a", "b", "a", "c", "d", "e"])))], r"in\.parquet, row 2, column 'id'"),
    _c("mix-empty-file", "mix --offline in.parquet --k2 0 --n 6 -o out.parquet", [("in.parquet", _bytes(b""))],
       r"in\.parquet.*empty"),
    _c("mix-truncated", "mix --offline in.parquet --k2 0 --n 6 -o out.parquet", [("in.parquet", _truncated(_scored()))],
       r"in\.parquet.*not a readable Parquet"),
    _c("mix-bad-flag", "mix --offline scored.parquet --k1 -1 --k2 0 -o out.parquet", [SCORED], r"--k1", code=2),
    _c("mix-output-is-input", "mix --offline scored.parquet --k2 0 --n 6 -o scored.parquet", [SCORED],
       r"scored\.parquet.*input"),
    # --- generate
    _c("generate-missing-prompt", "generate in.parquet --policy {policy} --n 2 --max-new-tokens 4 -o out.parquet",
       [("in.parquet", _parquet(pa.table({"question": ["a"]})))], r"in\.parquet.*'prompt'"),
    _c("generate-null-prompt", "generate in.parquet --policy {policy} --n 2 --max-new-tokens 4 -o out.parquet",
       [("in.parquet", _parquet(_pairs(prompt=["a", None, "c", "d", "e", "f"])))],
       r"in\.parquet, row 1, column 'prompt'"),
    _c("generate-wrong-type", "generate in.parquet --policy {policy} --n 2 --max-new-tokens 4 -o out.parquet",
       [("in.parquet", _parquet(_pairs(prompt=[1, 2, 3, 4, 5, 6])))], r"in\.parquet.*'prompt'.*type"),
    _c("generate-empty-file", "generate in.parquet --policy {policy} --n 2 -o out.parquet",
       [("in.parquet", _bytes(b""))], r"in\.parquet.*empty"),
    _c("generate-truncated", "generate in.parquet --policy {policy} --n 2 -o out.parquet",
       [("in.parquet", _truncated(_pairs()))], r"in\.parquet.*not a readable Parquet"),
    _c("generate-bad-flag", "generate pairs.parquet --policy {policy} --n 0 -o out.parquet", [PAIRS], r"--n", code=2),
    _c("generate-unknown-role", "generate in.parquet --policy {policy} --n 2 --max-new-tokens 4 -o out.parquet",
       [("in.parquet", _parquet(_roles("wizard")))], r"in\.parquet, row 2, column 'prompt'.*role 'wizard'"),
    _c("generate-null-id", "generate in.parquet --policy {policy} --n 2 --max-new-tokens 4 -o out.parquet",
       [("in.parquet", _parquet(_pairs(id=["a", None, "c", "d", "e", "f"])))], r"in\.parquet, row 1, column 'id'"),
    _c("generate-fake-gguf", "generate pairs.parquet --policy fake.gguf --n 2 -o out.parquet",
       [PAIRS, ("fake.gguf", _bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40))], r"fake\.gguf.*GGUF"),
    _c("generate-remote-code", "generate pairs.parquet --policy {remote} --n 2 --max-new-tokens 4 -o out.parquet",
       [PAIRS], r"remote-code.*--trust-remote-code"),
    _c("generate-broken-weights", "generate pairs.parquet --policy {broken} --n 2 --max-new-tokens 4 -o out.parquet",
       [PAIRS], r"broken-weights.*(weights|load)"),
    _c("generate-score-tokenizer-mismatch",
       "generate pairs.parquet --policy {policy} --score --ref {othertok} --n 2 --max-new-tokens 4 -o out.parquet",
       [PAIRS], r"tokenizers.*differ"),
    _c("generate-output-is-input", "generate pairs.parquet --policy {policy} --n 2 -o pairs.parquet", [PAIRS],
       r"pairs\.parquet.*input"),
    _c("generate-readonly-output", "generate pairs.parquet --policy {policy} --n 2 -o ro/out.parquet", [PAIRS, RO],
       r"ro/out\.parquet.*(permission|read-only)", readonly=True),
    # --- train
    _c("train-missing-column", f"train in.parquet {MODEL} {' '.join(FAST)} -o out",
       [("in.parquet", _parquet(_pairs(chosen=None)))], r"in\.parquet.*'chosen'"),
    _c("train-null", f"train in.parquet {MODEL} -o out",
       [("in.parquet", _parquet(_pairs(rejected=["a", "b", "c", None, "e", "f"])))],
       r"in\.parquet, row 3, column 'rejected': is null"),
    _c("train-wrong-type", f"train in.parquet {MODEL} -o out",
       [("in.parquet", _parquet(_pairs(prompt=[1.0] * 6)))], r"in\.parquet.*'prompt'.*type"),
    _c("train-empty-file", f"train in.parquet {MODEL} -o out", [("in.parquet", _bytes(b""))], r"in\.parquet.*empty"),
    _c("train-truncated", f"train in.parquet {MODEL} -o out", [("in.parquet", _truncated(_pairs()))],
       r"in\.parquet.*not a readable Parquet"),
    _c("train-bad-flag", f"train pairs.parquet {MODEL} --loss nope -o out", [PAIRS], r"--loss"),
    _c("train-duplicate-id", f"train in.parquet {MODEL} -o out",
       [("in.parquet", _parquet(_pairs(id=["a", "b", "c", "d", "b", "f"])))], r"in\.parquet, row 4, column 'id'"),
    _c("train-short-context", "train long.parquet --policy {short} --ref {short} --max-length 64 -o out", [LONG],
       r"long\.parquet, row 2: .*short-context \(32 positions.*--max-length 32"),
    _c("train-broken-weights", "train pairs.parquet --policy {broken} --ref {ref} --max-length 64 -o out", [PAIRS],
       r"broken-weights.*(weights|load)"),
    _c("train-fake-gguf", "train pairs.parquet --policy fake.gguf --ref {ref} -o out",
       [PAIRS, ("fake.gguf", _bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40))], r"fake\.gguf.*GGUF"),
    _c("train-output-is-input", f"train pairs.parquet {MODEL} -o pairs.parquet", [PAIRS], r"pairs\.parquet.*input"),
    _c("train-two-refs", "train {ref-a} {ref-b} --policy {policy} --ref {ref} --max-length 64 --max-prompt-length 32 "
       "-o out", [], r"ref-b\.parquet.*(reference|ref)", uses=("scored_runs",)),
    # --- inspect
    _c("inspect-non-numeric-irm", "inspect in.parquet", [("in.parquet", _parquet(_scored(["a"] * 6)))],
       r"in\.parquet.*'irm'.*number"),
    _c("inspect-missing-irm", "inspect pairs.parquet", [PAIRS], r"pairs\.parquet.*'irm'"),
    _c("inspect-empty-file", "inspect in.parquet", [("in.parquet", _bytes(b""))], r"in\.parquet.*empty"),
    _c("inspect-truncated", "inspect in.parquet", [("in.parquet", _truncated(_scored()))],
       r"in\.parquet.*not a readable Parquet"),
    _c("inspect-readonly-plot", "inspect scored.parquet --plot ro/irm.png", [SCORED, RO],
       r"ro/irm\.png.*(permission|read-only)", readonly=True),
    _c("inspect-plot-is-input", "inspect scored.parquet --plot scored.parquet", [SCORED],
       r"scored\.parquet.*(input|\.png)"),
    # --- export
    _c("export-output-is-input", "export trl scored.parquet -o scored.parquet", [SCORED], r"scored\.parquet.*input"),
    _c("export-unknown-target", "export csv scored.parquet -o o.parquet", [SCORED], r"csv.*not an export target"),
    # --- sql
    _c("sql-copy-to", ["sql", "COPY (SELECT 1) TO 'leak.csv'", "scored.parquet"], [SCORED], SQL_LOCKED),
    _c("sql-explain-analyze-copy", ["sql", "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO 'scored.parquet'",
                                    "scored.parquet"], [SCORED], SQL_LOCKED),
    _c("sql-read-text", ["sql", "SELECT * FROM read_text('/etc/passwd')", "scored.parquet"], [SCORED],
       r"query failed: .*Cannot access file \"/etc/passwd\".*reads only the files it is given"),
    _c("sql-output-is-input", ["sql", "SELECT * FROM scored", "scored.parquet", "-o", "scored.parquet"], [SCORED],
       r"scored\.parquet.*input"),
    _c("sql-empty-file", ["sql", "SELECT * FROM e", "e.parquet"], [("e.parquet", _bytes(b""))], r"e\.parquet"),
    _c("sql-truncated", ["sql", "SELECT * FROM t", "t.parquet"], [("t.parquet", _truncated(_scored()))],
       r"t\.parquet"),
    # --- report and run
    _c("report-corrupt-run-json", "report wd", [("wd", _folder(("run.json", _text('{"stages": {"s1": '))))],
       r"wd/run\.json.*(JSON|corrupt)"),
    _c("report-not-a-workdir", "report wd", [("wd", _folder(("x.txt", _text("x"))))], r"wd.*run\.json"),
    _c("run-workdir-is-a-file", "run pairs.parquet --policy {policy} --workdir wd.txt", [PAIRS, ("wd.txt", _text("x"))],
       r"wd\.txt.*(file|folder)"),
    _c("run-no-such-data", "run nope.parquet --policy {policy} --workdir wd", [], r"nope\.parquet.*no such file"),
    _c("run-bad-flag", "run pairs.parquet --policy {policy} --iterations 0 --workdir wd", [PAIRS], r"iterations"),
    # --- eval
    _c("eval-no-such-prompts", "eval --policy {policy} --baseline {ref} --judge {policy} --prompts nope.jsonl -o ev",
       [], r"nope\.jsonl.*no such file"),
    _c("eval-empty-prompts", "eval --policy {policy} --baseline {ref} --judge {policy} --prompts q.jsonl -o ev",
       [("q.jsonl", _text(""))], r"q\.jsonl.*(empty|no rows|no question)"),
    _c("eval-null-prompt", "eval --policy {policy} --baseline {ref} --judge {policy} --prompts q.parquet -o ev",
       [("q.parquet", _parquet(pa.table({"prompt": ["a", None]})))], r"q\.parquet, row 1.*'prompt'"),
    # --- merge (shards of `sera score --shard`)
    _c("merge-incomplete-shards", "merge {shard0} {shard1} -o out.parquet", [],
       r"(shard|2/3).*(missing|incomplete)", uses=("scored_runs",)),
    # --- numbers are finite or refused: every float option, config value and numeric column (tests/test_bad_numbers.py
    # generates the option cases for every command; these run them end to end)
    _c("train-beta-inf", f"train pairs.parquet {MODEL} --beta inf -o out", [PAIRS],
       r"--beta: inf is not a finite number", code=2),
    _c("train-max-grad-norm-nan", f"train pairs.parquet {MODEL} --max-grad-norm nan -o out", [PAIRS],
       r"--max-grad-norm: nan is not a finite number", code=2),
    _c("select-min-irm-nan", "select scored.parquet --min-irm nan -o out.parquet", [SCORED],
       r"--min-irm: nan is not a finite number", code=2),
    _c("eval-judge-timeout-inf", "eval --policy {policy} --baseline {ref} --judge {policy} --prompts q.jsonl "
       "--judge-timeout inf -o ev", [("q.jsonl", _text(_jsonl([{"prompt": "Hi?"}])))],
       r"--judge-timeout: inf is not a finite number", code=2),
    _c("generate-seed-negative", "generate pairs.parquet --policy {policy} --seed -1 -o out.parquet", [PAIRS],
       r"--seed: -1 is not a seed in \[0, 2\^53\]", code=2),
    _c("select-count-beyond-2-53", "select scored.parquet --count 99999999999999999999 -o out.parquet", [SCORED],
       r"--count: 99999999999999999999 is beyond 2\^53", code=2),
    _c("score-config-nan", f"score pairs.parquet {MODEL} --config c.toml -o out.parquet",
       [PAIRS, ("c.toml", _text("ensemble-lambda = nan\n"))],
       r"--ensemble-lambda: nan is not a finite number \(from c\.toml\)", code=2),
    _c("run-config-inf", "run pairs.parquet --policy {policy} --config c.toml --workdir wd",
       [PAIRS, ("c.toml", _text("beta = inf\nseed = -2\n"))],
       r"2 problems.*beta: inf is not a finite number \(from c\.toml\); seed: -2 is not a seed"),
    _c("select-nan-id", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", _parquet(_scored(id=[0.0, 1.0, float("nan"), 3.0, float("nan"), 5.0])))],
       r"in\.parquet, row 2, column 'id': is NaN"),
    _c("select-pairs-prompt-id-two-prompts", "select in.parquet --pairs -o out.parquet",
       [("in.parquet", _parquet(_candidates([0.1, 0.2, 0.3, 0.4]).set_column(
           1, "prompt", pa.array(["a", "a", "b", "c"]))))],
       r"in\.parquet, row 3, column 'prompt_id': prompt_id 'p1' is also the id of in\.parquet row 2, another prompt"),
    _c("select-pairs-null-prompt-id", "select in.parquet --pairs -o out.parquet",
       [("in.parquet", _parquet(_candidates([0.1, 0.2, 0.3, 0.4]).set_column(
           0, "prompt_id", pa.array(["p0", "p0", None, "p1"]))))],
       r"in\.parquet, row 2, column 'prompt_id': is null"),
    _c("inspect-null-flipped", "inspect in.parquet",
       [("in.parquet", _parquet(_scored(flipped=[False, None, True, False, False, False])))],
       r"in\.parquet, row 1, column 'flipped': is null; expected true/false"),
    _c("train-inf-ref-logp", "train in.parquet --policy {policy} -o out",
       [("in.parquet", _parquet(_scored(logp_ref_chosen=[-5.0, -5.0, float("-inf"), -5.0, -5.0, -5.0])))],
       r"in\.parquet, row 2, column 'logp_ref_chosen': is -inf, not a finite log-prob"),
    # --- malformed metadata, replies, adapters, files: one line each
    _c("select-provenance-not-json", "select in.parquet --top 0.5 -o out.parquet",
       [("in.parquet", lambda p: pq.write_table(_scored().replace_schema_metadata({b"sera": b"{not json"}), p))],
       r"in\.parquet: its 'sera' provenance metadata is not JSON"),
    _c("sql-provenance-a-list", ["sql", "SELECT * FROM t", "t.parquet", "-o", "out.parquet"],
       [("t.parquet", lambda p: pq.write_table(_scored().replace_schema_metadata({b"sera": b"[1, 2]"}), p))],
       r"t\.parquet: its 'sera' provenance metadata is a JSON list, not an object"),
    _c("sql-output-interval", ["sql", "SELECT INTERVAL 1 DAY AS i FROM scored", "scored.parquet", "-o", "out.parquet"],
       [SCORED], r"out\.parquet: Parquet cannot hold the column 'i' of type month_day_nano_interval"),
    _c("sql-output-union", ["sql", "SELECT [union_value(k := 1)] AS u FROM scored", "scored.parquet", "-o",
                            "out.parquet"], [SCORED], r"out\.parquet: Parquet cannot hold the column 'u'.*union"),
    _c("score-adapter-self-base", "score pairs.parquet --policy ad --ref {ref} -o out.parquet",
       [PAIRS, ("ad", _folder(("adapter_config.json", _text('{"base_model_name_or_path": "ad"}'))))],
       r"ad: adapter_config.json names as its base model 'ad', which leads back to this adapter"),
    _c("score-adapter-bad-json", "score pairs.parquet --policy ad --ref {ref} -o out.parquet",
       [PAIRS, ("ad", _folder(("adapter_config.json", _text('{"base_model_name_or_path": '))))],
       r"ad: adapter_config.json cannot be read as JSON"),
    _c("eval-prompts-not-utf8", "eval --policy {policy} --baseline {ref} --judge {policy} --prompts q.jsonl -o ev",
       [("q.jsonl", _bytes(b'{"prompt": "caf\xe9?"}\n'))], r"q\.jsonl: is not UTF-8 text \(byte 15\)"),
    _c("eval-prompts-folder", "eval --policy {policy} --baseline {ref} --judge {policy} --prompts q.jsonl -o ev",
       [("q.jsonl", _folder())], r"q\.jsonl: is a folder, not a prompts file"),
]


# ------------------------------------------------------------------------------------------------ the test

# Cases run in forks of one process that has imported sera, torch and transformers once (a "zygote"): each
# fork changes into the case's folder, takes the case's environment, redirects its stdin, stdout and stderr to
# files and calls `sera_cli.commands.app.main()`, the `sera` entry point; its exit status is the case's exit code. This
# is a real process with real file descriptors, without paying the heavy imports ~100 times.
ZYGOTE = r"""
import json, os, sys, traceback
import sera_cli.commands.app
import accelerate, torch, transformers, trainers.loop, sera_cli.stages.score.api, sera_cli.stages.generate.api
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1])  # resolves transformers' lazy modules; runs no torch op
print("ready", flush=True)


def inject(code):
    # every rename of a finished temporary over its target fails, as on a full disk (tests/test_faults.py)
    def failing(src, dst, *a, **k):
        raise OSError(code, os.strerror(code), str(dst))
    os.replace = failing


for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            for fd, path, flags in ((0, req["stdin"], os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT),
                                    (2, req["stderr"], os.O_WRONLY | os.O_CREAT)):
                f = os.open(path, flags, 0o644)
                os.dup2(f, fd)
                os.close(f)
            if req.get("inject"):
                inject(req["inject"])
            sys.argv = ["sera", *req["argv"]]
            try:
                sera_cli.commands.app.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _drop_dac_override() -> None:
    """Run the child without root's permission bypass (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop() -> bool:
    if os.geteuid() != 0:
        return True
    done = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_override, capture_output=True)
    return done.returncode == 0


ROOT_CAN_DROP = os.geteuid() == 0 and _can_drop()


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "SERA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("SERA_DEBUG", None)
    return env


class Zygote:
    def __init__(self, tokenizer: str, cache: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, tokenizer], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_env(cache), cwd=ROOT,
                                     preexec_fn=_drop_dac_override if ROOT_CAN_DROP else None)
        assert self._line(300) == "ready", "the zygote did not start"

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer within {timeout} s"
        return self.proc.stdout.readline().strip()

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], stdin: Path | None = None,
            inject: int = 0) -> tuple[int, bytes, bytes]:
        """Run `sera argv` in a fork; `inject` (an errno) makes every rename of a finished output fail with it."""
        out, err = cwd.parent / "stdout", cwd.parent / "stderr"
        req = {"argv": argv, "cwd": str(cwd), "env": env, "stdin": str(stdin or os.devnull), "stdout": str(out),
               "stderr": str(err), "inject": inject}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self._line(180))["code"]
        return code, out.read_bytes(), err.read_bytes()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="session")
def zygote(models, tmp_path_factory):
    z = Zygote(models["policy"], tmp_path_factory.mktemp("zygote-cache"))
    yield z
    z.close()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes (folders as 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _names(request, case: Case) -> dict[str, str]:
    names = dict(request.getfixturevalue("models"))
    for fixture in case.uses:
        names.update(request.getfixturevalue(fixture))
    return names


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, request, tmp_path, zygote):
    if case.readonly and os.geteuid() == 0 and not ROOT_CAN_DROP:
        pytest.skip("running as root without the capability to drop CAP_DAC_OVERRIDE")
    names = _names(request, case)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    cache.mkdir()
    for name, make in case.files:
        make(work / name)
    used = [k for k in names if any(f"{{{k}}}" in a for a in case.argv)]
    argv = [re.sub(r"\{([\w-]+)\}", lambda m: names[m.group(1)], a) for a in case.argv]
    watched = {work} | {Path(names[k]) if Path(names[k]).is_dir() else Path(names[k]).parent for k in used}
    before = {d: _snapshot(d) for d in watched}
    try:
        code, stdout, stderr_bytes = zygote.run(argv, work, _env(cache), work / case.stdin if case.stdin else None)
    finally:
        if (work / "ro").exists():
            (work / "ro").chmod(0o755)
    stderr = stderr_bytes.decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(case.line, lines[0]), f"{lines[0]!r} does not match {case.line!r}"
    assert code == case.code, f"exit code {code}, expected {case.code}: {lines[0]}"
    assert stdout == b"", "nothing on stdout when the command fails"
    after = {d: _snapshot(d) for d in watched}
    for d in watched:
        new = sorted(set(after[d]) - set(before[d]))
        assert not new, f"left behind in {d}: {new}"
        changed = sorted(k for k in before[d] if after[d].get(k) != before[d][k])
        assert not changed, f"inputs changed or removed in {d}: {changed}"
    assert not [p for p in cache.rglob("*") if "partial" in str(p.relative_to(cache))], "partial work left in cache"


def test_the_entry_point_in_its_own_process(tmp_path):
    """The same contract through `python -m sera_cli` itself: one line, exit code 1, nothing written."""
    pq.write_table(_pairs(chosen=["a", None, "c", "d", "e", "f"]), tmp_path / "in.parquet")
    before = _snapshot(tmp_path)
    done = subprocess.run(SERA + ["score", "in.parquet", "--policy", "p/", "--ref", "r/", "-o", "out.parquet"],
                          cwd=tmp_path, env=_env(tmp_path / "cache"), capture_output=True, timeout=120)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode() == ("error: in.parquet, row 1, column 'chosen': is null (fix or drop that row)\n")
    assert _snapshot(tmp_path) == before


def test_cases_cover_every_command():
    covered = {c.argv[0] for c in CASES}
    from sera_cli.commands.app import COMMANDS

    assert {m.__name__.rsplit(".", 1)[-1] for m in COMMANDS} <= covered


def test_no_progress_bar_when_not_a_tty(models, tmp_path, zygote):
    """A successful run with stderr not a TTY prints its summary line and no progress bar or spinner."""
    work = tmp_path / "work"
    work.mkdir()
    pq.write_table(_pairs(), work / "pairs.parquet")
    code, _, stderr = zygote.run(["score", "pairs.parquet", "--policy", models["policy"], "--ref", models["ref"],
                                  *FAST, "-o", "out.parquet"], work, _env(tmp_path / "cache"), None)
    assert code == 0, stderr.decode()[-2000:]
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("scored 6 rows"), lines
    assert "\r" not in stderr.decode() and "\x1b[" not in stderr.decode()


def test_train_ref_compares_resolved_dtype(models, scored_runs, tmp_path):
    """Scores made with --dtype auto on CPU are float32: `train --dtype float32 --ref` takes them as they are."""
    from sera_cli.backends.models import load_tokenizer, resolve
    from sera_cli.stages.train.data import plan_reference, read_pairs
    from trainers import TrainConfig

    config = TrainConfig(inputs=(scored_runs["ref-a"],), output=str(tmp_path / "out"), policy=models["policy"],
                         ref=models["ref"], dtype="float32", device="cpu", max_length=64, max_prompt_length=32)
    tok = load_tokenizer(resolve(models["policy"]))
    plan = plan_reference(config, read_pairs(config, tok), tok)
    assert plan.source == "input"
    stored = json.loads(pq.read_schema(scored_runs["ref-a"]).metadata[b"sera"])
    assert stored["logps"]["ref"]["dtype"] == "float32"  # the resolved dtype is what the identity records


def test_prev_missing_current_stands_in_for_non_finite_previous_irm(models, tmp_path):
    """With --prev-missing current, a NaN, inf or null previous IRM counts as missing: irm_prev = irm_now."""
    import numpy as np

    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    pq.write_table(_pairs(), tmp_path / "pairs.parquet")
    prev = [0.5, float("nan"), float("inf"), None, -0.5, 1.0]
    pq.write_table(_prev(prev), tmp_path / "prev.parquet")
    common = {"inputs": (str(tmp_path / "pairs.parquet"),), "policy": models["policy"], "ref": models["ref"],
              "max_length": 64, "max_prompt_length": 32, "progress": False}
    score(ScoreConfig(output=str(tmp_path / "out.parquet"), prev=str(tmp_path / "prev.parquet"),
                      prev_missing="current", ensemble_lambda=0.3, **common))
    out = pq.read_table(tmp_path / "out.parquet").to_pydict()
    now, got = np.array(out["irm_now"]), np.array(out["irm_prev"])
    expected = np.array([0.5, now[1], now[2], now[3], -0.5, 1.0])
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(out["irm"], 0.3 * expected + 0.7 * now)


def test_rows_with_the_same_content_get_distinct_ids():
    """The stated rule: the k-th repeat of a row's content (k >= 2) gets '-k' after the content hash."""
    from sera_cli.data.contract import with_ids
    from sera_cli.data.hashing import row_id

    table = pa.table({"prompt": ["p", "q", "p", "p"], "chosen": ["a", "a", "a", "a"], "rejected": ["b"] * 4})
    base = row_id("p", "a", "b")
    assert with_ids(table).column("id").to_pylist() == [base, row_id("q", "a", "b"), f"{base}-2", f"{base}-3"]

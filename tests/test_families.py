"""Six model families (Llama 3, Qwen2, Mistral, Gemma 2, Gemma 3, Phi-3) through score, generate, train, eval's
judge prompt and `export trl`: tiny random models (hidden 64, 2 layers) with each family's real tokenizer and
chat template (tests/families.py; Gemma's vocabularies are Gemma-like, see there), built once per session from
../shared/data/tokenizers. A bare clone without that folder skips these tests, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_packed_equals_plain, plain_logp
from families import END_OF_TURN, FAMILIES, TEMPLATE_TEXT, TOKENIZERS, build
from typer.testing import CliRunner

from sera_cli.commands.app import app

torch = pytest.importorskip("torch")
pytest.importorskip("gguf", reason="the Mistral, Phi-3 and Gemma-like tokenizers are read from GGUF files")

LOSSES = dict(zip(FAMILIES, ("dpo", "ipo", "slic", "simpo", "cdpo", "rdpo"), strict=True))  # every loss once
USER = [{"role": "user", "content": "Name a colour, please."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one word."}, *USER]
MESSAGE_ROWS = [(USER, [{"role": "assistant", "content": "Blue."}],
                 [{"role": "assistant", "content": "I would rather not say anything."}]),
                ([{"role": "user", "content": "What is 2+2?"}], [{"role": "assistant", "content": "4"}],
                 [{"role": "assistant", "content": "Five, I think."}])]
STRING_ROWS = [("Question: name a colour.\nAnswer:", " Blue.", " I would rather not say."),
               ("Question: what is 2+2?\nAnswer:", " 4", " Five, I think.")]
runner = CliRunner()


class _Models(dict):
    """family -> model folder, each built on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        self[family] = str(build(family, self.root / family))
        return self[family]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    """Each family's tiny model folder, built once per test session (when a test first needs it)."""
    if not TOKENIZERS.exists():
        pytest.skip(f"needs the shared data folder ../shared/data beside the checkout: {TOKENIZERS} not found")
    return _Models(tmp_path_factory.mktemp("families"))


def table(rows) -> pa.Table:
    p, c, r = zip(*rows, strict=True)
    return pa.table({"prompt": list(p), "chosen": list(c), "rejected": list(r)})


def trl_split(tok, prompt, chosen):
    """TRL 1.16's tokenization of one row (its `_tokenize` and EOS rule), split at the common prefix."""
    from trl.trainer.dpo_trainer import _tokenize

    if isinstance(prompt, str):
        chosen = chosen if chosen.endswith(tok.eos_token) else chosen + tok.eos_token
        p, full = _tokenize(tok, prompt)["input_ids"], _tokenize(tok, prompt + chosen)["input_ids"]
    else:
        p = _tokenize(tok, prompt, add_generation_prompt=True)["input_ids"]
        full = _tokenize(tok, prompt + chosen)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full)))
    return list(p[:n]), list(full[n:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [MESSAGE_ROWS, STRING_ROWS], ids=["messages", "strings"])
def test_score_matches_trl_tokens_and_a_plain_forward(tmp_path, family_models, family, rows):
    from transformers import AutoModelForCausalLM

    from sera_cli.backends.models import load_tokenizer, resolve
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig
    from trainers.encode import encode

    folder = family_models[family]
    src, out = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    pq.write_table(table(rows), src)
    score(ScoreConfig(inputs=(str(src),), output=str(out), policy=folder, reward="simpo", progress=False))
    scored = pq.read_table(out).to_pylist()
    tok = load_tokenizer(resolve(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    have_trl = True
    try:
        import trl  # noqa: F401
    except ImportError:
        have_trl = False
    for row, (prompt, chosen, rejected) in zip(scored, rows, strict=True):
        enc = encode(tok, prompt, [chosen, rejected], 1024, 512)
        for i, (response, side) in enumerate(((chosen, "chosen"), (rejected, "rejected"))):
            if have_trl:  # the same tokens as TRL
                assert (enc.prompt, list(enc.responses[i])) == trl_split(tok, prompt, response)
            end = tok.convert_tokens_to_ids(END_OF_TURN[family]) if rows is MESSAGE_ROWS else tok.eos_token_id
            assert end in enc.responses[i][-3:]  # the turn's end token (some templates add a newline after it)
            want = plain_logp(model, enc.prompt, list(enc.responses[i]))
            assert row[f"ntok_{side}"] == len(enc.responses[i])
            assert row[f"logp_policy_{side}"] == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_pairs_equal_a_plain_forward(family_models, family):
    """Training's packed row [prompt | chosen | rejected] (trainers.packing) covers every family here: its
    log-probs equal each whole sequence's plain forward, through each family's attention (Gemma 2's soft-capped
    eager attention, Gemma 3's and Mistral's sliding-window layers, with rows inside the window)."""
    from sera_cli.backends.models import load_model, load_tokenizer, resolve
    from trainers.encode import encode
    from trainers.packing import can_pack

    folder = family_models[family]
    tok, model = load_tokenizer(resolve(folder)), load_model(resolve(folder), "float32", "cpu")
    encoded = [encode(tok, p, [c, r], 1024, 512) for p, c, r in MESSAGE_ROWS]
    assert can_pack(model, max(len(e.prompt) + len(x) for e in encoded for x in e.responses)), family
    assert_packed_equals_plain(model, encoded, tok.pad_token_id, abs_tol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_stops_at_the_end_of_turn_token(tmp_path, family_models, family):
    from sera_cli.stages.generate.api import generate
    from sera_cli.stages.generate.config import GenerateConfig

    src, out = tmp_path / "prompts.parquet", tmp_path / "cands.parquet"
    pq.write_table(pa.table({"prompt": [USER, [{"role": "user", "content": "Say hi."}]]}), src)
    generate(GenerateConfig(inputs=(str(src),), output=str(out), policy=family_models[family], n=2,
                            max_new_tokens=24, temperature=1.0, top_p=1.0, seed=1, engine="hf", progress=False))
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 4
    assert sum(r["finish_reason"] == "stop" for r in rows) >= 3, [r["finish_reason"] for r in rows]
    for r in rows:
        assert END_OF_TURN[family] not in r["response"] and TEMPLATE_TEXT[family] not in r["response"]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_one_step_and_export_trl_round_trip(tmp_path, family_models, family):
    """One training step (each family another loss, so every loss runs on some family); the saved tokenizer
    keeps the base's pad token (none for Llama 3 and Mistral); `export trl` gives back the scored numbers."""
    from sera_cli.stages.export import ExportConfig, export
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig
    from sera_cli.stages.train.api import train
    from trainers import TrainConfig

    folder = family_models[family]
    src, scored, trl_file, out = (tmp_path / n for n in ("pairs.parquet", "scored.parquet", "trl.parquet", "pi1"))
    pq.write_table(table(MESSAGE_ROWS), src)
    score(ScoreConfig(inputs=(str(src),), output=str(scored), policy=folder, ref=folder, progress=False))
    loss = LOSSES[family]
    train(TrainConfig(inputs=(str(scored),), output=str(out), policy=folder, ref=None if loss == "simpo" else folder,
                      loss=loss, lr=1e-3, batch_size=2, micro_batch=2, max_steps=1, progress=False, dtype="float32"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["loss"] == records[0]["loss"]  # one step, a finite loss
    base_pad = json.loads(Path(folder, "tokenizer_config.json").read_text()).get("pad_token")
    saved_pad = json.loads((out / "tokenizer_config.json").read_text()).get("pad_token")
    assert saved_pad == base_pad

    export(ExportConfig(inputs=(str(scored),), output=str(trl_file)))
    a, b = pq.read_table(scored).to_pylist(), pq.read_table(trl_file).to_pylist()
    assert [r["prompt"] for r in b] == [r["prompt"] for r in a]
    for side in ("chosen", "rejected"):
        assert [r[f"ref_{side}_logps"] for r in b] == pytest.approx([r[f"logp_ref_{side}"] for r in a], rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_formats_the_judge_prompt_with_the_judges_template(family_models, family):
    from sera_cli.backends.judges.local import LocalJudge

    judge = LocalJudge(family_models[family], max_tokens=8)
    messages = [{"role": "system", "content": "You are a fair judge."}, {"role": "user", "content": "Rate it."}]
    text = judge.tokenizer.decode(judge.prompt_ids(messages))
    assert TEMPLATE_TEXT[family] in text and "You are a fair judge." in text and "Rate it." in text


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_a_system_turn_is_folded_where_the_template_refuses_it(tmp_path, family_models, family):
    from sera_cli.data import provenance
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    src, out = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    rows = [(WITH_SYSTEM, [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "No."}]),
            *MESSAGE_ROWS]
    pq.write_table(table(rows), src)
    score(ScoreConfig(inputs=(str(src),), output=str(out), policy=family_models[family], reward="simpo",
                      progress=False))
    prov = provenance.read(pq.read_table(out))
    assert prov["chat_template"]["system_folded_rows"] == 1


def test_a_template_error_is_one_line_naming_the_row_and_the_fix(tmp_path, family_models):
    """No chat template: one line naming the row and --chat-template; --chat-template FILE then scores."""
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(family_models["mistral"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template", None) or (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "mistral.jinja").write_text(template)
    src, out = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    pq.write_table(table(MESSAGE_ROWS), src)
    args = ["score", str(src), "--policy", str(folder), "--reward", "simpo", "-o", str(out), "-q"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{src}, row 0, column 'prompt': message rows need a chat template" in lines[0]
    assert "--chat-template" in lines[0]
    assert not out.exists()
    r = runner.invoke(app, [*args, "--chat-template", str(tmp_path / "mistral.jinja")])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == 2


def test_a_doubled_bos_is_a_one_line_warning(tmp_path, family_models, capfd):
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    src, out = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    rows = [("<|begin_of_text|>" + p, c, r) for p, c, r in STRING_ROWS]
    pq.write_table(table(rows), src)
    score(ScoreConfig(inputs=(str(src),), output=str(out), policy=family_models["llama3"], reward="simpo",
                      progress=False))
    err = capfd.readouterr().err
    assert err.count("warning:") == 1
    assert f"{src}, row 0 and 1 more row(s): the prompt starts with '<|begin_of_text|>'" in err

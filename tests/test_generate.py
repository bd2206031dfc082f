"""`sera generate` as users run it (transformers engine, tiny random Llamas), and its sampling maths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.backends.engines.nucleus import gumbel, nucleus_sample
from sera_cli.backends.engines.packed_linear import onednn_available
from sera_cli.backends.engines.sampling import collect, draw_seed, trim, uniforms
from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.data.hashing import digest
from sera_cli.stages.generate.config import GenerateConfig

runner = CliRunner()
TOKENS = 6
COLUMNS = ["prompt_id", "prompt", "response", "sample_idx", "finish_reason", "ntok", "id"]


def sera(*args: str):
    return runner.invoke(app, list(args))


def gen_args(inp: str, policy: str, out, *extra: str) -> list[str]:
    """A random model's next-token distribution is nearly flat, so its top-p nucleus needs a sort of the whole
    vocabulary at every step; top_p 1 skips it where a test is about plumbing, not sampling."""
    return ["generate", inp, "--policy", policy, "--max-new-tokens", str(TOKENS), "--chunk-prompts", "2",
            "--batch-size", "8", "--seed", "7", "--top-p", "1", "-q", "-o", str(out), *extra]


def rows(path) -> pa.Table:
    """A generated table without its metadata (the provenance records the command line)."""
    return pq.read_table(path).replace_schema_metadata(None)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "sera-partial" in p.name or ".tmp" in p.name)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_policy):
    """One reference run: 6 prompts x 4 samples x 6 tokens, 3 chunks of 2 prompts."""
    d = tmp_path_factory.mktemp("gen")
    pq.write_table(standard_table(), d / "pairs.parquet")
    out = d / "cands.parquet"
    r = sera(*gen_args(str(d / "pairs.parquet"), tiny_policy, out))
    assert r.exit_code == 0, r.stderr
    return d / "pairs.parquet", out, r.stderr


# ---------------------------------------------------------------------------------------------- the maths


def fixed(table) -> object:
    """Noise read from a [B, V] table, as the sampler asks for it: by rows and token ids."""
    table = torch.as_tensor(table, dtype=torch.float32)
    return lambda rows, ids: table[rows.unsqueeze(1), ids]


def test_nucleus_sample_hand_computed():
    """p = (0.5, 0.3, 0.15, 0.05), top_p 0.8: the nucleus is tokens 0 and 1 (the mass before token 2 is 0.8, not
    below 0.8). The sample is argmax of log p + noise within it: log 0.5 = -0.693 against log 0.3 + 0.6 = -0.604
    picks token 1; against log 0.3 + 0.4 = -0.804 token 0; tokens 2 and 3 never win, whatever their noise."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2, 1)
    noise = fixed([[0.0, 0.6, 9.0, 9.0], [0.0, 0.4, 9.0, 9.0]])
    assert nucleus_sample(logits, noise, 1.0, 0.8).tolist() == [1, 0]
    # top_p 1 keeps every token: the noise of 9 wins
    assert nucleus_sample(logits, noise, 1.0, 1.0).tolist() == [2, 2]
    # temperature 0.5 doubles the log-probs: 2 log 0.5 = -1.386 vs 2 log 0.3 + 0.6 = -1.808: token 0
    assert nucleus_sample(logits, noise, 0.5, 0.8).tolist() == [0, 0]
    assert nucleus_sample(logits, noise, 0.0, 0.8).tolist() == [0, 0]  # greedy


def test_nucleus_sample_with_kept_tables_samples_the_same():
    """The sampler's kept tables (SamplerBuffers) hold the same numbers as fresh ones: the same tokens, call after
    call, as the row count shrinks (finished rows leave) and grows again."""
    from sera_cli.backends.engines.nucleus import SamplerBuffers, seeded_noise

    g = torch.Generator().manual_seed(3)
    buffers = SamplerBuffers()
    seeds = np.arange(12, dtype=np.uint64) * 7919
    for step, rows in enumerate((12, 12, 5, 9)):
        logits = torch.randn(rows, 3000, generator=g) * (1 + step)
        for top_p in (0.9, 1.0):
            fresh = nucleus_sample(logits, seeded_noise(seeds[:rows], step), 0.7, top_p)
            kept = nucleus_sample(logits, seeded_noise(seeds[:rows], step), 0.7, top_p, buffers)
            assert torch.equal(fresh, kept)
    scaled, probs = buffers.tables(logits)
    assert torch.equal(scaled, logits / 0.7) and torch.equal(probs, torch.softmax(logits / 0.7, dim=-1))


def _reference_nucleus(logits: np.ndarray, noise: np.ndarray, temperature: float, top_p: float) -> int:
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    kept = order[before < top_p]
    return int(kept[np.argmax(z[kept] + noise[kept])])


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat (full sort), medium (top-1024), peaked (top-64)
def test_nucleus_sample_matches_a_plain_sort(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5000, generator=g) * scale
    table = -torch.log(-torch.log(torch.rand(16, 5000, generator=g)))
    got = nucleus_sample(logits, fixed(table), 0.7, 0.95).tolist()
    want = [_reference_nucleus(logits[i].double().numpy(), table[i].double().numpy(), 0.7, 0.95) for i in range(16)]
    assert got == want


def test_nucleus_sample_frequencies():
    """With Gumbel noise from `uniforms`, the samples follow the nucleus renormalised: (0.625, 0.375, 0, 0)."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(20000, 1)
    seeds = np.arange(20000, dtype=np.uint64)

    def noise(rows, ids):
        return gumbel(torch.from_numpy(uniforms(seeds[rows.numpy()], 0, ids.numpy()))).float()

    counts = np.bincount(nucleus_sample(logits, noise, 1.0, 0.8).numpy(), minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.625, 0.375, 0, 0], atol=0.015)


def test_uniforms_are_keyed_by_seed_step_and_token():
    seeds = np.array([1, 2, 3], dtype=np.uint64)
    ids = np.array([[5, 6], [5, 6], [7, 5]])
    a = uniforms(seeds, 4, ids)
    np.testing.assert_array_equal(a[::-1], uniforms(seeds[::-1].copy(), 4, ids[::-1].copy()))
    assert a[0, 0] == uniforms(seeds[:1], 4, np.array([[9, 5]]))[0, 1]  # whatever the other candidates
    assert not np.array_equal(a, uniforms(seeds, 5, ids))
    many = uniforms(np.arange(200, dtype=np.uint64), 3, np.tile(np.arange(250), (200, 1)))
    assert 0 < many.min() and many.max() < 1 and abs(many.mean() - 0.5) < 0.005


def test_trim():
    assert trim([5, 6, 2, 2, 2], [2], 5) == ([5, 6, 2], "stop")
    assert trim([5, 6, 7], [2, 9], 3) == ([5, 6, 7], "length")
    assert trim([5, 9], [2, 9], 4) == ([5, 9], "stop")
    assert trim([5], [2], 4) == ([5], "stop")  # an engine that dropped the stop token ended early


def test_collect_redraws_duplicates_and_reports_shortfall():
    """Prompt 0 repeats itself once then gets new texts; prompt 1 only ever says 'same' (and blanks)."""
    script = {(0, 0): ["a", "b", " a ", "c"], (0, 1): ["d"], (1, 0): ["same", "same", "", "same"],
              (1, 1): ["same", "  ", "same"], (1, 2): ["same"] * 3}
    calls = []

    def draw(draws):
        calls.append([(d.key, d.count, d.round) for d in draws])
        return [script[(d.key, d.round)][:d.count] for d in draws]

    kept, missing = collect(["p0", "p1"], 4, 7, 2, draw, text=lambda s: s)
    assert kept == [["a", "b", "c", "d"], ["same"]]
    assert missing == 3
    assert calls == [[(0, 4, 0), (1, 4, 0)], [(0, 1, 1), (1, 3, 1)], [(1, 3, 2)]]
    assert draw_seed(7, "p0", 1) != draw_seed(7, "p0", 0) != draw_seed(8, "p0", 0)


def test_config_problems_reported_together():
    config = GenerateConfig(inputs=("x",), output="-", n=4, temperature=0, top_p=1.5, resume=True, shard=(3,
                            2))
    with pytest.raises(Exception) as err:
        config.check()
    assert str(err.value) == (
        "--temperature 0 is greedy decoding and cannot give --n 4 distinct responses (use a temperature above 0, "
        "or --n 1); --top-p must be in (0, 1] (got 1.5); --shard 3/2: need 0 <= i < n; --resume needs a file "
        "output (-o FILE), not stdout")


def test_config_unknown_reward():
    with pytest.raises(Exception) as err:
        GenerateConfig(inputs=("x",), output="o.parquet", reward="orpo", score=True).check()
    assert str(err.value) == "--reward orpo: expected dpo, ipo or simpo"


# ---------------------------------------------------------------------------------------------- the command


def test_output_rows_columns_and_provenance(full_run, tiny_policy):
    inp, out, stderr = full_run
    assert stderr.startswith(f"generated 24 responses for 6 prompts with hf ({24 * TOKENS} new tokens")
    assert stderr.rstrip().endswith(f"-> {out}")
    t = pq.read_table(out)
    assert t.column_names == COLUMNS
    assert [str(f.type) for f in t.schema] == ["string", "string", "string", "int32", "string", "int32", "string"]
    d = t.to_pydict()
    prompts = standard_table().column("prompt").to_pylist()
    assert d["prompt"] == [p for p in prompts for _ in range(4)]
    assert d["prompt_id"] == [digest(p)[:16] for p in d["prompt"]]
    assert d["id"] == [digest([p, r])[:16] for p, r in zip(d["prompt"], d["response"], strict=True)]
    assert d["sample_idx"] == [0, 1, 2, 3] * 6
    for i in range(0, 24, 4):  # the 4 responses of each prompt are distinct
        assert len({r.strip() for r in d["response"][i:i + 4]}) == 4
    # a random model almost never ends a sequence: every response used all its tokens
    assert set(d["finish_reason"]) == {"length"} and set(d["ntok"]) == {TOKENS}
    prov = provenance.read(t)
    assert prov["stage"] == "generate" and prov["models"]["policy"]["spec"] == tiny_policy
    assert prov["engine"] == {"name": "hf", "dtype": "float32", "device": "cpu", "batch_size": 8,
                             "cache_tokens": 65536}
    assert prov["sampling"] == {"n": 4, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": TOKENS, "seed": 7,
                                "max_redraws": 3}
    assert prov["stop_ids"] == [2] and prov["shortfall"] == {"prompts": 0, "missing": 0}
    assert prov["versions"]["transformers"] and prov["versions"]["torch"]
    assert not leftovers(out.parent)


def test_same_seed_same_output_other_seed_other_output(full_run, tiny_policy, tmp_path):
    inp, out, _ = full_run
    again, other = tmp_path / "again.parquet", tmp_path / "other.parquet"
    assert sera(*gen_args(str(inp), tiny_policy, again)).exit_code == 0
    assert rows(again).equals(rows(out))
    assert sera(*gen_args(str(inp), tiny_policy, other, "--seed", "8", "--n", "1")).exit_code == 0
    first = rows(out).filter(pc.equal(rows(out).column("sample_idx"), 0))
    assert rows(other).column("response").to_pylist() != first.column("response").to_pylist()


def test_batch_size_does_not_change_samples(full_run, tiny_policy, tmp_path):
    """Each sequence has its own random numbers, and left padding leaves its logits alone (float32): one
    sequence per batch gives what batches of 8 give, with the default top_p."""
    inp, _, _ = full_run
    one, eight = tmp_path / "one.parquet", tmp_path / "eight.parquet"
    common = ("--top-p", "0.95", "--n", "2", "--chunk-prompts", "6")
    assert sera(*gen_args(str(inp), tiny_policy, one, *common, "--batch-size", "1")).exit_code == 0
    assert sera(*gen_args(str(inp), tiny_policy, eight, *common, "--batch-size", "8")).exit_code == 0
    assert rows(one).equals(rows(eight))


def test_shards_concatenate_to_the_full_run(full_run, tiny_policy, tmp_path):
    inp, out, _ = full_run
    parts = []
    for i in range(3):
        part = tmp_path / f"shard{i}.parquet"
        r = sera(*gen_args(str(inp), tiny_policy, part, "--shard", f"{i}/3"))
        assert r.exit_code == 0, r.stderr
        assert r.stderr.startswith("generated 8 responses for 2 prompts")
        parts.append(rows(part))
    assert pa.concat_tables(parts).equals(rows(out))


def test_resume_keeps_finished_chunks(full_run, tiny_policy, tmp_path, monkeypatch):
    """Interrupted in its second chunk, a run resumes with the first chunk done and ends equal to a full run."""
    from sera_cli.stages.generate import generation as gen_run

    inp, out, _ = full_run
    target = tmp_path / "resumed.parquet"
    real, calls = gen_run._Work._chunk, []

    def interrupted(self, engine, c, *a):
        calls.append(c)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, engine, c, *a)

    monkeypatch.setattr(gen_run._Work, "_chunk", interrupted)
    r = sera(*gen_args(str(inp), tiny_policy, target))
    assert r.exit_code == 130 and not target.exists()
    assert r.stderr == "interrupted: no output was written; rerun with --resume to keep finished work\n"
    assert len(list(tmp_path.glob(".resumed.parquet.*.sera-partial/chunk-*.parquet"))) == 1
    calls.clear()
    monkeypatch.setattr(gen_run._Work, "_chunk", lambda self, engine, c, *a: (calls.append(c), real(self, engine, c, *a)))
    r = sera(*gen_args(str(inp), tiny_policy, target, "--resume"))
    assert r.exit_code == 0, r.stderr
    assert "; 1 chunks resumed ->" in r.stderr and calls == [2, 4]
    assert rows(target).equals(rows(out))
    assert not leftovers(tmp_path)


def test_conversational_prompts_use_the_chat_template(tmp_path, tiny_policy, chat_pairs_file):
    from sera_cli.backends.models import load_tokenizer, resolve
    from sera_cli.stages.generate.prompts import prompt_tokens
    from trainers.encode import encode

    out = tmp_path / "chat.parquet"
    r = sera(*gen_args(chat_pairs_file, tiny_policy, out, "--n", "2"))
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(out)
    assert str(t.schema.field("prompt").type) == str(pq.read_table(chat_pairs_file).schema.field("prompt").type)
    assert pa.types.is_string(t.schema.field("response").type) and t.num_rows == 12
    tok = load_tokenizer(resolve(tiny_policy))
    prompt = t.column("prompt")[0].as_py()
    ids = prompt_tokens(tok, prompt)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids == encode(tok, prompt, ["Paris is the capital."]).prompt  # the tokens `score` conditions on


def test_turn_end_token_of_the_chat_template(smol):
    """Chat prompts also stop at the token that ends an assistant turn in the template, whatever it is."""
    from sera_cli.backends.chat_templates import stop_ids, turn_end_id
    from sera_cli.backends.models import load_tokenizer

    tok = load_tokenizer(smol)
    assert turn_end_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    assert turn_end_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id
    assert stop_ids(smol.path, tok, chat=True) == sorted({tok.eos_token_id, turn_end_id(tok)})
    assert stop_ids(smol.path, tok) == [tok.eos_token_id]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert turn_end_id(tok) is None


def test_stop_tokens_of_generation_config(tmp_path, tiny_policy, pairs_file):
    """A model whose generation_config lists 5,001 end-of-sequence ids stops early: 'stop' rows end with a stop
    token (counted in ntok, not in the text) within the limit; 'length' rows hit the limit."""
    model = tmp_path / "stopper"
    shutil.copytree(tiny_policy, model)
    cfg = json.loads((model / "generation_config.json").read_text())
    cfg["eos_token_id"] = [2, *range(1000, 6000)]
    (model / "generation_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "stop.parquet"
    r = sera(*gen_args(pairs_file, str(model), out, "--max-new-tokens", "24", "--n", "2"))
    assert r.exit_code == 0, r.stderr
    d = pq.read_table(out).to_pydict()
    stops = [n for n, f in zip(d["ntok"], d["finish_reason"], strict=True) if f == "stop"]
    lengths = [n for n, f in zip(d["ntok"], d["finish_reason"], strict=True) if f == "length"]
    assert stops and all(1 < n <= 24 for n in stops) and all(n == 24 for n in lengths)
    assert all(r.strip() for r in d["response"])  # an immediate stop is an empty response: re-drawn
    assert len(provenance.read(pq.read_table(out))["stop_ids"]) == 5001


def test_shortfall_is_reported(tmp_path, tiny_policy, pairs_file):
    """top_p 1e-9 keeps only the most likely token: every draw repeats, so each prompt keeps one response."""
    out = tmp_path / "short.parquet"
    r = sera(*gen_args(pairs_file, tiny_policy, out, "--top-p", "1e-9", "--max-redraws", "1"))
    assert r.exit_code == 0, r.stderr
    assert "; 6 prompts short of distinct responses (18 missing) ->" in r.stderr
    t = pq.read_table(out)
    assert t.num_rows == 6 and provenance.read(t)["shortfall"] == {"prompts": 6, "missing": 18}


def test_stdout_and_repeated_prompts(tmp_path, tiny_policy):
    table = pa.concat_tables([standard_table().slice(0, 2), standard_table().slice(0, 1)])
    pq.write_table(table, tmp_path / "rep.parquet")
    r = sera(*gen_args(str(tmp_path / "rep.parquet"), tiny_policy, "-", "--n", "2"))
    assert r.exit_code == 0, r.stderr
    assert "; 1 repeated prompts skipped -> -" in r.stderr
    t = pq.read_table(pa.BufferReader(r.stdout_bytes))
    assert t.num_rows == 4 and t.column("prompt_id").to_pylist()[0] == digest(table.column("prompt")[0].as_py())[:16]


def test_score_flag_equals_sera_score(full_run, tiny_policy, tiny_ref, tmp_path):
    inp, out, _ = full_run
    both, scored = tmp_path / "both.parquet", tmp_path / "scored.parquet"
    r = sera(*gen_args(str(inp), tiny_policy, both, "--score", "--ref", tiny_ref))
    assert r.exit_code == 0, r.stderr
    assert sera("score", str(out), "--policy", tiny_policy, "--ref", tiny_ref, "-q", "-o", str(scored)).exit_code == 0
    a, b = pq.read_table(both), pq.read_table(scored)
    assert a.column("id").equals(b.column("id"))
    for col in ("logp_policy", "logp_ref", "reward", "ntok"):
        np.testing.assert_allclose(a.column(col).to_numpy(), b.column(col).to_numpy(), rtol=1e-6)
    prov = provenance.read(a)
    assert prov["stage"] == "score" and prov["parents"][0]["stage"] == "generate"
    assert not leftovers(tmp_path)


def test_generate_score_select_pairs(full_run, tiny_policy, tiny_ref, tmp_path):
    """End to end: generated candidates, scored, paired by max IRM: chosen reward >= rejected reward."""
    _, out, _ = full_run
    scored, pairs = tmp_path / "scored.parquet", tmp_path / "pairs.parquet"
    assert sera("score", str(out), "--policy", tiny_policy, "--ref", tiny_ref, "-q", "-o", str(scored)).exit_code == 0
    r = sera("select", str(scored), "--pairs", "-o", str(pairs))
    assert r.exit_code == 0, r.stderr
    d = pq.read_table(pairs).to_pydict()
    assert len(d["prompt"]) == 6
    assert all(c >= j for c, j in zip(d["reward_chosen"], d["reward_rejected"], strict=True))
    assert all(c != j for c, j in zip(d["chosen"], d["rejected"], strict=True))


# ---------------------------------------------------------------------------------------------- bad input


def _bad(tmp_path, policy: str, table: pa.Table, *extra: str):
    inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, inp)
    r = sera("generate", str(inp), "--policy", policy, "-q", "-o", str(out), *extra)
    assert r.exit_code == 1
    assert not out.exists() and not leftovers(tmp_path)
    return r.stderr, str(inp)


def test_bad_no_prompt_column(tmp_path, tiny_policy):
    err, inp = _bad(tmp_path, tiny_policy, pa.table({"question": ["a", "b"]}))
    assert err == (f"error: {inp}: missing column 'prompt' for generation prompts (has: question) ('sera convert' "
                   "turns common layouts into prompt/chosen/rejected)\n")


def test_bad_empty_prompt(tmp_path, tiny_policy):
    err, inp = _bad(tmp_path, tiny_policy, pa.table({"prompt": ["Say hi.", "Say bye.", "  "]}))
    assert err == f"error: {inp}, row 2, column 'prompt': is empty (fix or drop that row)\n"


def test_bad_prompt_longer_than_the_context(tmp_path, tiny_policy):
    from sera_cli.backends.models import load_tokenizer, resolve

    long = "word " * 2100
    n = len(load_tokenizer(resolve(tiny_policy))(long)["input_ids"])
    err, inp = _bad(tmp_path, tiny_policy, pa.table({"prompt": ["Say hi.", long]}), "--max-new-tokens", "16")
    assert err == (f"error: {inp}, row 1, column 'prompt': prompt has {n:,} tokens; with --max-new-tokens 16 that "
                   "exceeds the model's context of 2,048 tokens (lower --max-new-tokens, or shorten or drop the row)\n")


def test_bad_ids_shared_by_two_prompts(tmp_path, tiny_policy):
    err, inp = _bad(tmp_path, tiny_policy, pa.table({"prompt": ["a", "b"], "id": ["x", "x"]}))
    assert err == (f"error: {inp}, row 1, column 'id': id 'x' is also the id of {inp} row 0, another prompt "
                   "(ids must be unique per prompt)\n")


def test_bad_greedy_with_several_responses(tmp_path, tiny_policy):
    err, _ = _bad(tmp_path, tiny_policy, standard_table(), "--temperature", "0")
    assert err == ("error: --temperature 0 is greedy decoding and cannot give --n 4 distinct responses (use a "
                   "temperature above 0, or --n 1)\n")


def test_bad_vllm_not_installed(tmp_path, tiny_policy):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; tests/test_generate_vllm.py covers it")
    err, _ = _bad(tmp_path, tiny_policy, standard_table(), "--engine", "vllm")
    assert err == "error: --engine vllm: vllm is not installed (pip install 'sera[vllm]', or use --engine hf)\n"


onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@onednn
def test_packed_linear_is_linear_within_rounding_and_ignores_the_row_count():
    """oneDNN with a packed weight: `linear` within float32 rounding, and each row's numbers bit for bit the same
    whether it comes alone (the one-row case is computed as two rows), with 2, 7 or 300 others, flat or [B, 1, H]."""
    from sera_cli.backends.engines.packed_linear import PackedLinear, pack, packed_linear

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 160, bias=True)
    x = torch.randn(300, 96, generator=g)
    packed = pack(layer.weight, 64)
    assert packed is not None
    with torch.inference_mode():
        full = packed_linear(x, packed, layer.bias)
        torch.testing.assert_close(full, layer(x), rtol=1e-5, atol=1e-5)
        for m in (1, 2, 7):
            assert torch.equal(packed_linear(x[:m], packed, layer.bias), full[:m])
            assert torch.equal(packed_linear(x[-m:].view(m, 1, 96), packed, layer.bias), full[-m:].view(m, 1, 160))
        PackedLinear(layer, packed)
        assert torch.equal(layer(x[:5]), full[:5])
    assert layer(x[:2]).requires_grad  # training: the module's own forward, with gradients
    assert pack(layer.weight.bfloat16(), 64) is None  # float32 only


@onednn
def test_buffered_head_with_packed_blocks():
    """The vocabulary projection in packed oneDNN blocks: the full packed projection bit for bit (each logit is
    one dot product), `linear` within rounding, and a row's logits do not depend on the batch's row count."""
    from sera_cli.backends.engines.hf import BufferedHead
    from sera_cli.backends.engines.packed_linear import pack, packed_linear

    head = torch.nn.Linear(24, 9000, bias=False)
    buffered = BufferedHead(head, rows=8)
    assert buffered.blocks is not None and len(buffered.blocks) == 3  # 4096 + 4096 + 808 columns
    x = torch.randn(5, 1, 24)
    with buffered.decoding(), torch.inference_mode():
        on = head(x).clone()
        assert torch.equal(on[:, 0], packed_linear(x[:, 0], pack(head.weight, 8), None))
        torch.testing.assert_close(on, torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
        assert torch.equal(head(x[2:3]).clone(), on[2:3])


def test_help_has_an_example():
    r = sera("generate", "--help")
    assert r.exit_code == 0 and "Example: sera generate prompts.parquet --policy" in r.stdout


# ---------------------------------------------------------------------------------------------- the engine


ENGINE_PROMPTS = ["Say hi.", "Reply with one word: yes or no. Is water wet?",
                  "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.", "2+2?"]


def _both_engines(spec: str, temperature: float, top_p: float, counts: list[int], tokens: int, batch: int):
    from sera_cli.backends.chat_templates import stop_ids
    from sera_cli.backends.engines.hf import HFEngine
    from sera_cli.backends.engines.hf_baseline import ReferenceHFEngine
    from sera_cli.backends.engines.sampling import Request
    from sera_cli.backends.models import load_tokenizer, resolve
    from sera_cli.stages.generate.prompts import prompt_tokens

    ref = resolve(spec)
    tok = load_tokenizer(ref)
    stops = stop_ids(ref.path, tok, chat=True)
    prompts = [prompt_tokens(tok, [{"role": "user", "content": p}]) for p in ENGINE_PROMPTS]
    requests = [Request(p, c, 1000 + i) for i, (p, c) in enumerate(zip(prompts, counts, strict=True))]
    kw = {"dtype": "float32", "device": "cpu", "batch_size": batch, "temperature": temperature, "top_p": top_p,
          "max_new_tokens": tokens, "stop_ids": stops}
    new, old = HFEngine(ref, tok, **kw), ReferenceHFEngine(ref, tok, **kw)
    linears = sum(type(m) is torch.nn.Linear for m in new.model.modules()) - 1  # all but the vocabulary projection
    assert new.packed_layers == (linears if onednn_available() else 0) and old.packed_layers == 0
    batches = []
    got = new.generate(requests, batches.append)
    return got, old.generate(requests), batches, stops, (new.compactions, new.shared_batches)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.95), (1.0, 1.0), (0.0, 1.0)])
def test_engine_samples_what_the_reference_engine_samples(tiny_policy, temperature, top_p):
    """Prefix sharing and the preallocated cache change nothing: token for token the one-row-per-sample
    `model.generate` engine's output, with batches of 6 sequences splitting prompts' samples across batches."""
    got, want, batches, _, _ = _both_engines(tiny_policy, temperature, top_p, [4, 4, 3, 4], 10, 6)
    assert got == want
    assert [len(b) for b in batches] == [6, 6, 3] and all(len(s) == 10 for b in batches for s in b)
    assert [len(r) for r in got] == [4, 4, 3, 4]
    distinct = {tuple(s) for s in got[0]}
    assert len(distinct) == (1 if temperature == 0 else 4)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.95), (0.0, 1.0)])
def test_engine_matches_the_reference_on_smollm2(smol, temperature, top_p):
    """The real model, whose answers stop: a row that finished is padded, as `generate` pads it."""
    got, want, _, stops, (compactions, shared) = _both_engines(smol.path, temperature, top_p, [4, 4, 4, 4], 24, 16)
    assert got == want
    assert any(t in stops for r in got for s in r for t in s[:-1])  # some sample stopped before the limit
    assert compactions >= 1  # finished rows left the batch, and no other row's tokens changed
    assert shared == 1  # the prompts' keys/values were kept once until the first compaction


def test_engine_keeps_each_prompt_once_for_whole_groups(tiny_policy):
    """Batches of whole groups (2 prompts x 3 samples) decode over each prompt's keys/values kept once, and
    sample what the reference engine samples."""
    got, want, batches, _, (_, shared) = _both_engines(tiny_policy, 0.7, 0.95, [3, 3, 3, 3], 10, 6)
    assert got == want and [len(b) for b in batches] == [6, 6] and shared == 2


def test_prefill_in_calls_of_similar_lengths(tiny_policy, monkeypatch):
    """Prompts prefilled a few at a time, each call padded to its own longest prompt at the positions one call
    would give them: the logits and keys/values of one call within float32 rounding (pad positions zero), and the
    engine still samples what the reference engine samples."""
    from sera_cli.backends.engines import hf as engine_hf
    from sera_cli.backends.models import load_tokenizer, resolve

    ref = resolve(tiny_policy)
    engine = engine_hf.HFEngine(ref, load_tokenizer(ref), dtype="float32", device="cpu", batch_size=8,
                                temperature=0.7, top_p=0.95, max_new_tokens=4, stop_ids=[2])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21]]
    with torch.inference_mode():
        one_logits, one_cache, one_mask = engine._prefill(prompts)
        monkeypatch.setattr(engine_hf, "_PREFILL_PROMPTS", 2)
        logits, cache, mask = engine._prefill(prompts)
    assert torch.equal(mask, one_mask) and mask.shape == (4, 7)
    torch.testing.assert_close(logits, one_logits, rtol=1e-5, atol=1e-5)
    for layer, one in zip(cache.layers, one_cache.layers, strict=True):
        assert layer.keys.shape == one.keys.shape
        real = mask[:, None, :, None].bool()
        torch.testing.assert_close(layer.keys * real, one.keys * real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values * real, one.values * real, rtol=1e-5, atol=1e-5)
        assert not layer.keys[2, :, :5].any()  # prompt 2 (2 tokens) was prefilled at width 5: zeros before it
    got, want, _, _, _ = _both_engines(tiny_policy, 0.7, 0.95, [3, 3, 3, 3], 10, 12)
    assert got == want


def test_a_model_that_drops_call_keywords_falls_back_to_one_row_per_sample(tiny_policy, monkeypatch):
    """Where the model does not hand the shared-prompt cache to sera's attention (a model class whose layers drop
    call keywords), the engine notices at the first step, takes it back and decodes with one row per sample:
    the reference engine's samples, not attention over the generated positions alone."""
    from sera_cli.backends.engines import decode_attention as da

    plain = da.decode_attention

    def dropping(module, query, key, value, attention_mask, **kwargs):
        shared = kwargs.pop(da.KWARG, None)
        if shared is not None:  # what the model would see without the keyword: the generated part only
            return plain(module, query, key, value, None, **kwargs)
        return plain(module, query, key, value, attention_mask, **kwargs)

    da.AttentionInterface.register(da.NAME, dropping)
    try:
        got, want, _, _, (_, shared) = _both_engines(tiny_policy, 0.7, 0.95, [3, 3, 3, 3], 10, 6)
    finally:
        da.AttentionInterface.register(da.NAME, plain)
    assert got == want and shared == 1  # the first batch tried, the second knew


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_shared_prompt_attention_equals_attention_over_repeated_prompts(mask_kind):
    """Scoring each prompt's keys once with all its samples' queries, then one softmax over prompt and generated
    positions, is attention over the cache with the prompt repeated per sample (within float32 rounding)."""
    from sera_cli.backends.engines.decode_attention import decode_attention, shared_prompt_attention
    from sera_cli.backends.engines.decode_cache import SharedPromptLayer, groups_of

    g = torch.Generator().manual_seed(1)
    prompts, group, hkv, hq, p, d = 3, 4, 2, 6, 7, 8
    rows = prompts * group
    layer = SharedPromptLayer(torch.randn(prompts, hkv, p, d, generator=g), torch.randn(prompts, hkv, p, d, generator=g),
                              group, room=5)
    for _ in range(3):  # three generated positions
        key, value = layer.update(torch.randn(rows, hkv, 1, d, generator=g), torch.randn(rows, hkv, 1, d, generator=g))
    assert layer.get_seq_length() == p + 3 and key.shape == (rows, hkv, 3, d)
    whole_k, whole_v = layer.whole()
    assert torch.equal(whole_k[5, :, :p], layer.prompt_keys[1]) and torch.equal(whole_k[5, :, p:], key[5])
    mask = torch.ones(rows, 1, 1, p + 3, dtype=torch.bool)
    mask[4:8, ..., :3] = False  # prompt 1 was left-padded by 3
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif mask_kind == "none":
        mask = None
    q = torch.randn(rows, hq, 1, d, generator=g)
    module = _attention_module(hq // hkv)
    got = shared_prompt_attention(q, layer, key, value, mask, 0.3)
    want, _ = decode_attention(module, q, whole_k, whole_v, mask, scaling=0.3)
    assert got.shape == (rows, 1, hq, d)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert groups_of([0, 0, 1, 1], 2) == 2 and groups_of([0, 1, 0, 1], 2) == 0 and groups_of([0, 0, 1], 2) == 0


def test_engine_leaves_sliding_window_caches_to_generate(tmp_path, smol):
    """A model with sliding-window attention keeps transformers' own cache (`generate`), and still samples what
    the reference engine samples."""
    from transformers import AutoTokenizer, DynamicCache, MistralConfig, MistralForCausalLM

    from sera_cli.backends.engines.decode_cache import preallocated

    config = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, bos_token_id=1,
                           eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    assert preallocated(DynamicCache(config=config), torch.tensor([0]), 4) is None
    torch.manual_seed(3)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smol.path).save_pretrained(tmp_path)
    got, want, _, _, _ = _both_engines(str(tmp_path), 0.7, 1.0, [2, 1, 3, 2], 12, 4)
    assert got == want and [len(r) for r in got] == [2, 1, 3, 2]


@pytest.mark.parametrize("dtype,contiguous", [("bfloat16", True), ("float32", False)])
def test_bf16_output_projection_sees_a_contiguous_input(tiny_policy, dtype, contiguous):
    """A bf16 prefill's last-position hidden state reaches the head contiguous (torch's strided bf16 path copies
    the weight once per row: 14.5 GB for 256 SmolLM2 prompts); float32 keeps the view and its numbers."""
    from transformers import AutoTokenizer, DynamicCache

    from sera_cli.backends.engines.hf import load_generator
    from sera_cli.backends.models import resolve

    ref = resolve(tiny_policy)
    model = load_generator(ref, AutoTokenizer.from_pretrained(ref.path), dtype, "cpu", 4, [2], False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, past_key_values=DynamicCache(config=model.config))
    assert seen == [contiguous]


def test_decode_batches_keep_the_cache_within_its_token_budget():
    from sera_cli.backends.engines.hf import decode_batches

    widths = [1422, 1200, 700, 300, 300, 200, 200, 200]  # longest first, as the engine sorts them
    assert decode_batches(widths, 256, None) == [(0, 8)]
    assert decode_batches(widths, 3, None) == [(0, 3), (3, 6), (6, 8)]
    got = decode_batches(widths, 256, 2000)
    assert got == [(0, 1), (1, 2), (2, 4), (4, 8)]  # 1 x 1422, 1 x 1200, 2 x 700, 4 x 300 (each <= 2000)
    assert all(max(1, e - b) * widths[b] <= 2000 or e - b == 1 for b, e in got)
    assert decode_batches([5000, 10], 8, 2000) == [(0, 1), (1, 2)]  # a row wider than the budget runs alone


def test_a_cache_token_budget_changes_batches_not_samples(tiny_policy):
    """float32: batches cut by --cache-tokens sample what one batch of every row samples."""
    from sera_cli.backends.chat_templates import stop_ids
    from sera_cli.backends.engines.hf import HFEngine
    from sera_cli.backends.engines.sampling import Request
    from sera_cli.backends.models import load_tokenizer, resolve
    from sera_cli.stages.generate.prompts import prompt_tokens

    ref = resolve(tiny_policy)
    tok = load_tokenizer(ref)
    stops = stop_ids(ref.path, tok, chat=True)
    prompts = [prompt_tokens(tok, [{"role": "user", "content": p}]) for p in ENGINE_PROMPTS]
    requests = [Request(p, 3, 50 + i) for i, p in enumerate(prompts)]
    kw = {"dtype": "float32", "device": "cpu", "batch_size": 64, "temperature": 0.7, "top_p": 0.95,
          "max_new_tokens": 8, "stop_ids": stops}
    batches: list = []
    small = HFEngine(ref, tok, cache_tokens=3 * (max(map(len, prompts)) + 8), **kw).generate(requests, batches.append)
    assert len(batches) >= 3 and sum(map(len, batches)) == 12 and len(batches[0]) == 3  # the longest prompt: 3 rows
    assert small == HFEngine(ref, tok, **kw).generate(requests)


def _attention_module(groups: int) -> torch.nn.Module:
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal = groups, True
    return m


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)])
def test_decode_attention_equals_sdpa(hq, hkv):
    """One query per sequence over a left-padded cache view: the matmul path equals torch's sdpa within float32
    rounding, and a prefill (several queries) is handed to sdpa unchanged (bit for bit)."""
    from sera_cli.backends.engines.decode_attention import decode_attention, sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    b, d, n = 6, 16, 11
    buf_k, buf_v = torch.randn(b, hkv, n + 5, d, generator=g), torch.randn(b, hkv, n + 5, d, generator=g)
    k, v = buf_k[:, :, :n], buf_v[:, :, :n]  # the preallocated cache's view, as decoding sees it
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    mask[3, ..., :9] = False
    module = _attention_module(hq // hkv)
    q = torch.randn(b, hq, 1, d, generator=g)
    ours, _ = decode_attention(module, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (b, 1, hq, d)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # by hand for one head of row 3: softmax over its 2 unpadded positions
    w = torch.softmax(0.25 * k[3, 0, 9:] @ q[3, 0, 0], dim=0)
    torch.testing.assert_close(ours[3, 0, 0], w @ v[3, 0, 9:], rtol=0, atol=1e-6)
    q4 = torch.randn(b, hq, 4, d, generator=g)
    mask4 = mask.expand(b, 1, 4, n).clone()
    assert torch.equal(decode_attention(module, q4, k, v, mask4, scaling=0.25)[0],
                       sdpa_attention_forward(module, q4, k, v, mask4, scaling=0.25)[0])


def test_buffered_head_logits_are_linear_bit_for_bit():
    from sera_cli.backends.engines.hf import BufferedHead

    head = torch.nn.Linear(24, 9000, bias=False)
    buffered = BufferedHead(head)
    x = torch.randn(5, 1, 24)
    off = head(x)  # inactive: the module's own forward
    with buffered.decoding():
        assert head(x).requires_grad  # with gradients on: the module's own forward
        with torch.inference_mode():
            on = head(x).clone()
            assert torch.equal(on, off) and torch.equal(on, torch.nn.functional.linear(x, head.weight))
            assert on.shape == (5, 1, 9000) and buffered.buffer.shape == (5, 9000)
            small = head(x[:3])  # fewer rows reuse the buffer
            assert torch.equal(small, torch.nn.functional.linear(x[:3], head.weight)) and buffered.buffer.shape == (5, 9000)
            two = torch.randn(2, 3, 24)  # several positions: the module's own forward
            assert torch.equal(head(two), torch.nn.functional.linear(two, head.weight))
    assert not buffered.active  # off again after decoding

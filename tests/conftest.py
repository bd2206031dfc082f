"""Shared fixtures: tiny random Llamas saved as real HF folders (SmolLM2's tokenizer), small pair tables."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small files the tests ship (own text, public formats)


def needs_shared(path: Path) -> Path:
    """`path` under the shared data folder (`../shared/data` beside the checkout), or skip naming what is missing."""
    if not path.exists():
        pytest.skip(f"needs the shared data folder ../shared/data beside the checkout: {path} not found")
    return path

STANDARD_ROWS = [
    ("Human: What is 2+2?\n\nAssistant:", " 4.", " 5."),
    ("Human: Name a colour.\n\nAssistant:", " Blue is a colour.", " I do not know."),
    ("Human: Say hi.\n\nAssistant:", " Hi there!", " No."),
    ("Human: Capital of France?\n\nAssistant:", " Paris.", " London, I think, or maybe Rome."),
    ("Human: Is ice cold?\n\nAssistant:", " Yes, ice is cold.", " It is hot."),
    ("Human: Count to three.\n\nAssistant:", " One, two, three.", " One, three, two."),
]


def _tiny_llama(path: Path, tokenizer_dir: str, seed: int, layers: int = 2) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct, converted once to a safetensors folder (cached)."""
    from sera_cli.backends.models import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, smol) -> str:
    return str(_tiny_llama(tmp_path_factory.mktemp("tiny-policy"), smol.path, seed=1))


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory, smol) -> str:
    return str(_tiny_llama(tmp_path_factory.mktemp("tiny-ref"), smol.path, seed=2))


def standard_table() -> pa.Table:
    p, c, r = zip(*STANDARD_ROWS, strict=True)
    return pa.table({"prompt": list(p), "chosen": list(c), "rejected": list(r)})


def conversational_table() -> pa.Table:
    rows = [([{"role": "user", "content": p.removeprefix("Human: ").removesuffix("\n\nAssistant:")}],
             [{"role": "assistant", "content": c.strip()}], [{"role": "assistant", "content": r.strip()}])
            for p, c, r in STANDARD_ROWS]
    p, c, r = zip(*rows, strict=True)
    return pa.table({"prompt": list(p), "chosen": list(c), "rejected": list(r)})


@pytest.fixture
def pairs_file(tmp_path) -> str:
    path = tmp_path / "pairs.parquet"
    pq.write_table(standard_table(), path)
    return str(path)


@pytest.fixture
def chat_pairs_file(tmp_path) -> str:
    path = tmp_path / "chat_pairs.parquet"
    pq.write_table(conversational_table(), path)
    return str(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_policy, tiny_ref) -> str:
    """The standard pairs scored by `sera score` with the tiny policy and reference (ref log-prob columns)."""
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    folder = tmp_path_factory.mktemp("scored")
    pq.write_table(standard_table(), folder / "pairs.parquet")
    out = str(folder / "scored.parquet")
    score(ScoreConfig(inputs=(str(folder / "pairs.parquet"),), output=out, policy=tiny_policy, ref=tiny_ref,
                      progress=False))
    return out


def plain_logp(model, prompt: list[int], response: list[int]) -> float:
    """The independent computation: the model's own forward of the whole sequence, log_softmax in float64,
    gather, sum over the response."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return float(logp.gather(-1, torch.tensor(response).unsqueeze(-1)).sum())


def assert_packed_equals_plain(model, encoded, pad_id: int, abs_tol: float) -> None:
    """Each pair packed into one row (`trainers.packing.packed_logps`): every response's token count and summed
    log-prob equal those of its whole sequence's plain forward (`plain_logp`)."""
    import torch

    from trainers.packing import packed_logps

    with torch.no_grad():
        logps, ntok = packed_logps(model, [(e.prompt, e.responses) for e in encoded], pad_id)
    n = len(encoded)
    for k in (0, 1):
        for b, e in enumerate(encoded):
            assert ntok[k * n + b] == len(e.responses[k])
            want = plain_logp(model, e.prompt, list(e.responses[k]))
            assert logps[k * n + b].item() == pytest.approx(want, abs=abs_tol)

"""Benchmark: `sera score` against a straightforward TRL-style scorer, same process, same pairs.

Baseline: chosen and rejected of each pair concatenated in one right-padded batch, full-vocabulary logits and
log-softmax at every position, policy and reference both in memory. sera: `sera_cli.stages.score.api.score` end to end
(tokenization, each prompt run once, prompts and responses in length-sorted token-budget batches, vocabulary
projection at response positions only).

    python tests/bench/score.py --pairs 512          # fp32 and bf16, HH-RLHF helpful-base test pairs

Prints tokens/s (prompt+response tokens of both responses, for both models), the ratio, the largest log-prob
difference, and for bf16 the fraction of this machine's bf16 matmul peak (measured in the same run). The first
`--float64-pairs` pairs are also scored one sequence at a time in float64: how far each float32 run is from
the exact numbers shows what part of their difference is float32 rounding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hh import hh_pairs  # noqa: E402

from sera_cli.backends.models import load_model, load_tokenizer, resolve
from sera_cli.stages.score.api import score
from sera_cli.stages.score.config import ScoreConfig
from trainers.encode import encode  # noqa: E402


def encode_pairs(tok, rows) -> list:
    return [encode(tok, r["prompt"], [r["chosen"], r["rejected"]], 1024, 512) for r in rows]


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] as TRL's `selective_log_softmax` computes it for float32: the target's logit
    minus the logsumexp of the row (torch's float32 `log_softmax` on CPU is off by about 7e-6 of the value,
    always upwards, which over a 500-nat response is 3.5e-3). Written out here rather than imported from
    `trainers.logps`, so that the baseline and the float64 ground truth stay independent of sera's code."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def baseline(models, tok, encs, batch_pairs: int) -> tuple[np.ndarray, int, float]:
    """TRL-style: [chosen; rejected] padded together, full logits, log-softmax over the vocabulary at every
    position. Token log-probs are summed in float64, as `sera score` sums them, so that the two differ only
    by their float32 forward passes."""
    out = np.zeros((len(models), len(encs) * 2))
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for m, model in enumerate(models):
            for s in range(0, len(encs), batch_pairs):
                group = encs[s:s + batch_pairs]
                seqs = [(e.sequence(j), len(e.prompt)) for j in (0, 1) for e in group]
                T = max(len(x) for x, _ in seqs)
                ids = torch.full((len(seqs), T), tok.pad_token_id)
                att = torch.zeros((len(seqs), T), dtype=torch.long)
                mask = torch.zeros((len(seqs), T), dtype=torch.bool)
                for i, (x, p) in enumerate(seqs):
                    ids[i, :len(x)] = torch.tensor(x)
                    att[i, :len(x)] = 1
                    mask[i, p:len(x)] = True
                tokens += int(att.sum())
                logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
                sums = (token_logps(logits, ids[:, 1:]).double() * mask[:, 1:]).sum(-1).numpy()
                n = len(group)
                for k in range(n):
                    out[m, 2 * (s + k)] = sums[k]
                    out[m, 2 * (s + k) + 1] = sums[n + k]
    return out, tokens, time.perf_counter() - t0


def sera_run(path: Path, dtype: str, batch_tokens: int) -> tuple[np.ndarray, int, float]:
    out = path.with_name(f"scored-{dtype}.parquet")
    summary = score(ScoreConfig(inputs=(str(path),), output=str(out), policy="smollm2-135m",
                                ref="smollm2-135m-ref", dtype=dtype,
                                device="cpu", progress=False, batch_tokens=batch_tokens))
    t = pq.read_table(out).to_pydict()
    flat = lambda a, b: np.stack([a, b], 1).reshape(-1)  # noqa: E731
    logps = np.stack([flat(t["logp_policy_chosen"], t["logp_policy_rejected"]),
                      flat(t["logp_ref_chosen"], t["logp_ref_rejected"])])
    return logps, summary.tokens, summary.seconds


def float64_logps(ref, encs) -> np.ndarray:
    """Ground truth for the first pairs: one sequence at a time in float64, full log-softmax (policy and
    reference are the same weights, so one model serves both)."""
    model = load_model(ref, "float32", "cpu").double()
    out = np.zeros(2 * len(encs))
    with torch.inference_mode():
        for i, e in enumerate(encs):
            for j in (0, 1):
                ids = torch.tensor([e.sequence(j)])
                picked = token_logps(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
                out[2 * i + j] = float(picked[len(e.prompt) - 1:].sum())
    return out


def linear_params(model) -> tuple[int, int]:
    """(weights the decoder multiplies each token by, weights of the vocabulary projection): the embedding
    lookup is no matmul, and a tied head is counted once, as the projection."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - emb.numel() - (0 if head is emb else head.numel()), head.numel()


def sera_flops(encs, decoder: int, head: int) -> float:
    """Matmul FLOPs `sera score` performs per model: each distinct prompt through the decoder once, every
    response through the decoder, the vocabulary projection at response positions only (attention left out)."""
    prompt_tokens = sum(len(p) for p in {tuple(e.prompt) for e in encs})
    response_tokens = sum(len(e.sequence(j)) - len(e.prompt) for e in encs for j in (0, 1))
    return 2 * (decoder * (prompt_tokens + response_tokens) + head * response_tokens)


def bf16_peak(seconds: float = 3.0) -> float:
    """bf16 FLOP/s of `nn.functional.linear` at the shape of a 1,024-token batch through an MLP projection of
    SmolLM2-135M (weights [out, in], as a model holds them; a plain `a @ b` on an [in, out] matrix takes a
    far slower path on CPUs without native bf16), repeated for about `seconds`."""
    a, w = torch.randn(1024, 576, dtype=torch.bfloat16), torch.randn(1536, 576, dtype=torch.bfloat16)
    torch.nn.functional.linear(a, w)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        torch.nn.functional.linear(a, w)
        n += 1
    return n * 2 * 1024 * 576 * 1536 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--baseline-batch", type=int, default=1, help="pairs per baseline batch (2 sequences each)")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--float64-pairs", type=int, default=16,
                    help="pairs also scored one at a time in float64, the ground truth both float32 runs are held to")
    args = ap.parse_args()
    rows = hh_pairs("helpful-base", args.pairs)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    smol = resolve("smollm2-135m")
    # A reference that is a distinct folder with the same weights, as in iteration 1 of SeRA (pi_ref = SFT).
    ref_dir = tmp / "smollm2-135m-ref"
    ref_dir.symlink_to(smol.path, target_is_directory=True)
    import os

    os.chdir(tmp)
    tok = load_tokenizer(smol)
    encs = encode_pairs(tok, rows)
    model = load_model(smol, "float32", "cpu")
    params = sum(p.numel() for p in model.parameters())
    flops = 2 * sera_flops(encs, *linear_params(model))  # policy and reference
    del model
    print(f"{len(rows)} pairs, {params / 1e6:.0f}M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for dtype in args.dtypes.split(","):
        models = [load_model(resolve(str(x)), dtype, "cpu") for x in (smol.path, ref_dir)]
        base, btok, bsec = baseline(models, tok, encs, args.baseline_batch)
        del models
        ours, stok, ssec = sera_run(path, dtype, args.batch_tokens)
        diff = np.abs(base - ours)
        print(f"[{dtype}] baseline (batch {args.baseline_batch} pair): {btok / bsec:,.0f} tok/s ({bsec:.1f} s)   "
              f"sera score: {stok / ssec:,.0f} tok/s ({ssec:.1f} s, incl. tokenization and model loads)   "
              f"ratio {stok / ssec / (btok / bsec):.2f}x   max |logp diff| vs baseline {diff.max():.2e} "
              f"({(diff > 1e-4).sum()} of {diff.size} sums above 1e-4; median {np.median(diff):.1e}; largest "
              f"relative to the sum {(diff / np.abs(base)).max():.1e})")
        if dtype == "float32":
            fp32 = ours
            if args.float64_pairs:
                k = min(args.float64_pairs, len(rows))
                truth = float64_logps(smol, encs[:k])
                err_b = np.abs(base[:, :2 * k] - truth).max()
                err_s = np.abs(ours[:, :2 * k] - truth).max()
                gap = np.abs(base[:, :2 * k] - ours[:, :2 * k]).max()
                print(f"[float32] first {k} pairs against float64 one at a time: baseline max |diff| {err_b:.2e}, "
                      f"sera {err_s:.2e} (the two float32 runs differ by {gap:.2e} on these pairs)")
        else:
            err = np.abs(ours - fp32)
            irm32 = (fp32[0, 0::2] - fp32[1, 0::2]) - (fp32[0, 1::2] - fp32[1, 1::2])
            irm16 = (ours[0, 0::2] - ours[1, 0::2]) - (ours[0, 1::2] - ours[1, 1::2])
            print(f"[{dtype}] accuracy vs float32: summed log-prob |diff| mean {err.mean():.3f}, max {err.max():.3f} "
                  f"nats; IRM (beta=1) |diff| mean {np.abs(irm16 - irm32).mean():.3f}, max "
                  f"{np.abs(irm16 - irm32).max():.3f}; sign agreement {np.mean(np.sign(irm16) == np.sign(irm32)):.1%}")
        if dtype == "bfloat16":
            peak = bf16_peak()
            achieved = flops / ssec
            print(f"[bfloat16] matmul peak {peak / 1e9:,.0f} GFLOP/s; sera score reaches {achieved / 1e9:,.1f} "
                  f"GFLOP/s = {achieved / peak:.0%} of peak (the matmul FLOPs it performs, over its whole run "
                  f"time, loads and tokenization included)")


if __name__ == "__main__":
    main()

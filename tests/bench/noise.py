"""Benchmark: does the IRM find flipped labels? HH-RLHF helpful-base with 20% and 40% of the labels swapped.

For each flip rate: train pi_1 from pi_0 = SmolLM2-135M-Instruct on the noisy pairs (iteration 1 of `sera run`,
reference pi_0), score the same pairs with (pi_1, pi_0), and rank them three ways:

- IRM (SeRA): beta * [log pi_1/pi_0 (chosen) - log pi_1/pi_0 (rejected)]
- reference log-prob margin (Curry-DPO style, no training): log pi_0(chosen) - log pi_0(rejected)
- random: uniform scores (the baseline the ratios are taken against; mean of 200 draws)

and print the AUROC of a low score for flipped vs clean pairs, and the share of the flipped pairs that stays in
the top 70% (k1 = 0.7; random keeps 70%). Both flip rates share one log-prob cache, so pi_0 scores each
sequence once.

The default, 200 pairs (a seeded sample) cut to 256 tokens, is sized for about 15 minutes on 2 CPU cores
(float32, LoRA): per flip rate one training epoch (about 50k tokens forward and backward) and one scoring pass
of pi_1, plus one scoring pass of pi_0 in all.

    python tests/bench/noise.py                       # 200 pairs, 20% and 40% flipped
    python tests/bench/noise.py --rows 16 --max-length 128 --max-prompt-length 64   # a smoke test
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

sys.path.insert(0, str(Path(__file__).parent))
from hh import hh_pairs  # noqa: E402

from sera_cli.data.rankstats import auroc
from sera_cli.stages.run.api import run
from sera_cli.stages.run.config import build
from sera_cli.stages.score.api import score
from sera_cli.stages.score.config import ScoreConfig

K1 = 0.7


def noisy(rows: list[dict], rate: float, seed: int) -> pa.Table:
    """The pairs with round(rate * n) of them, chosen at random, swapped and marked `flipped`."""
    rng = np.random.default_rng(seed)
    flip = set(rng.choice(len(rows), round(rate * len(rows)), replace=False).tolist())
    out = {"prompt": [], "chosen": [], "rejected": [], "flipped": []}
    for i, r in enumerate(rows):
        c, j = (r["rejected"], r["chosen"]) if i in flip else (r["chosen"], r["rejected"])
        out["prompt"].append(r["prompt"])
        out["chosen"].append(c)
        out["rejected"].append(j)
        out["flipped"].append(i in flip)
    return pa.table(out)


def kept_share(scores: np.ndarray, flipped: np.ndarray) -> float:
    """Share of the flipped rows among the top K1 by score (ties broken by row order)."""
    keep = np.argsort(-scores, kind="stable")[:int(np.floor(K1 * len(scores) + 1e-9))]
    return float(flipped[keep].sum() / flipped.sum())


def _show(stage, event: str, record) -> None:
    if event == "start":
        print(f"  {stage.key}: {stage.title}", flush=True)
    elif event == "ran":
        print(f"  {stage.key}: {record['seconds']:,.0f} s {record.get('summary') or ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200, help="pairs (a seeded sample of helpful-base)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()

    rows = hh_pairs("helpful-base")
    pick = np.random.default_rng(args.seed).permutation(len(rows))[:args.rows]
    rows = [rows[i] for i in sorted(pick)]
    print(f"{len(rows)} pairs of HH-RLHF helpful-base (seeded sample), flip rates {args.rates}", flush=True)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="sera-noise-"))
    start = time.perf_counter()
    cache = root / "cache"
    results = []
    for rate in args.rates:
        t0 = time.perf_counter()
        wd = root / f"flip-{int(rate * 100)}"
        wd.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        if not (wd / "cache").exists():
            (wd / "cache").symlink_to(cache, target_is_directory=True)  # one cache for every flip rate
        data = wd / "noisy.parquet"
        pq.write_table(noisy(rows, rate, args.seed), data)
        config = build(None, {
            "data": (str(data),), "workdir": str(wd), "method": "dpo", "iterations": 1, "heldout": 0.0,
            "policy": "smollm2-135m", "dtype": args.dtype, "lora_r": args.lora_r, "lr": args.lr,
            "batch_size": args.batch_size, "micro_batch": args.batch_size, "beta": args.beta, "seed": args.seed,
            "max_length": args.max_length, "max_prompt_length": args.max_prompt_length})
        run(config, on_stage=_show)
        scored = wd / "irm.parquet"
        score(ScoreConfig(inputs=(str(wd / "train.parquet"),), output=str(scored), policy=str(wd / "iter-1/model"),
                          ref="smollm2-135m", beta=args.beta, dtype=args.dtype, max_length=args.max_length,
                          max_prompt_length=args.max_prompt_length, cache=str(cache), resume=True))
        t = pq.read_table(scored).to_pydict()
        flipped = np.asarray(t["flipped"], bool)
        irm = np.asarray(t["irm"], float)
        ref_margin = np.asarray(t["logp_ref_chosen"], float) - np.asarray(t["logp_ref_rejected"], float)
        rng = np.random.default_rng(args.seed)
        rand = [(auroc(-s, flipped), kept_share(s, flipped)) for s in (rng.random(len(irm)) for _ in range(200))]
        results.append((rate, {"IRM (SeRA)": (auroc(-irm, flipped), kept_share(irm, flipped)),
                               "reference log-prob (Curry-DPO)": (auroc(-ref_margin, flipped),
                                                                  kept_share(ref_margin, flipped)),
                               "random": tuple(np.mean(rand, axis=0))}, time.perf_counter() - t0, len(irm)))

    print(f"\nHH-RLHF helpful-base, {len(rows)} pairs, SmolLM2-135M-Instruct, one DPO iteration ({args.dtype}, "
          f"LoRA r={args.lora_r}, lr {args.lr:g}, batch {args.batch_size}, beta {args.beta:g}, max length "
          f"{args.max_length})\n")
    print("| flipped | selector | AUROC (flipped vs clean) | flips left in top 70% | vs random |")
    print("|---|---|---|---|---|")
    for rate, by, seconds, n in results:
        base = by["random"][1]
        for name, (a, kept) in by.items():
            print(f"| {rate:.0%} | {name} | {a:.3f} | {kept:.1%} | {kept / base:.2f}x |")
        print(f"|  | ({n} pairs, {seconds:,.0f} s) | | | |")
    print(f"\ntotal {time.perf_counter() - start:,.0f} s; runs kept in {root}")


if __name__ == "__main__":
    main()

"""Benchmark: training with the reference log-probs stored by `score` against running the reference every step.

Both runs train the same policy on the same HH-RLHF pairs with the same settings; the baseline (`--live-ref`,
what OpenRLHF does and TRL does unless told to precompute) loads the reference model and runs it on every
micro-batch. Each run is a child process, so its peak memory (resident set on CPU, allocated on GPU) is its
own. Prints seconds per pair (training loop only, and whole run with loading), peak memory and the ratios, the
reward accuracy the stored-reference run logged, and a last line to paste into the README.

    python tests/bench/train.py --pairs 256 --max-length 256 --max-prompt-length 128
    python tests/bench/train.py --pairs 256 --no-baseline --rescore   # the acceptance run: one DPO epoch, then
                                                                      # `score` loads the trained folder

`--rescore` scores the training pairs again with the trained policy and reports the fraction whose implicit
reward margin is positive (0 before training: policy and reference are the same model, every margin is 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from hh import hh_pairs  # noqa: E402


def child(args) -> None:
    """One training run; prints one JSON line with its timings and peak memory."""
    import torch

    from trainers import TrainConfig, train

    t0 = time.perf_counter()
    config = TrainConfig((args.data,), args.out, args.model, ref=args.model if args.variant == "live" else None,
                         live_ref=args.variant == "live", lr=args.lr, batch_size=args.batch_size,
                         micro_batch=args.micro_batch, max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length, max_steps=args.max_steps, warmup_ratio=0.1,
                         dtype=args.dtype, lora_r=args.lora_r, save_steps=0, seed=args.seed, progress=False)
    summary = train(config)
    records = [json.loads(x) for x in Path(args.out, "metrics.jsonl").read_text().splitlines()]
    gpu = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": args.variant, "pairs": sum(r["pairs"] for r in records),
                      "loop_s": sum(r["seconds"] for r in records), "total_s": time.perf_counter() - t0,
                      "peak_mb": peak / 2**20, "memory": "GPU allocated" if gpu else "RSS",
                      "losses": [r["loss"] for r in records], "accuracy": [r["reward_accuracy"] for r in records],
                      "ref_source": summary.ref_source}))


def run_child(args, variant: str, data: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--data", data, "--out", out, "--model", args.model,
           "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--micro-batch", str(args.micro_batch),
           "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
           "--dtype", args.dtype, "--lora-r", str(args.lora_r), "--seed", str(args.seed)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def positive_margins(path: str) -> float:
    import pyarrow.parquet as pq

    return float((pq.read_table(path).column("irm").to_numpy() > 0).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times; keep the best")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the baseline that runs the reference every step")
    p.add_argument("--rescore", action="store_true", help="score the training pairs with the trained policy")
    p.add_argument("--variant", choices=("stored", "live"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sera_cli.score import score
    from sera_cli.score_config import ScoreConfig

    lengths = {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length}
    variants = ("live", "stored") if args.baseline else ("stored",)
    with tempfile.TemporaryDirectory() as tmp:
        pairs, scored = os.path.join(tmp, "pairs.parquet"), os.path.join(tmp, "scored.parquet")
        pq.write_table(pa.Table.from_pylist(hh_pairs(limit=args.pairs)), pairs)
        cache = os.path.join(tmp, "cache")  # policy == reference: the second pass comes from the cache
        t0 = time.perf_counter()
        score(ScoreConfig((pairs,), scored, args.model, args.model, dtype=args.dtype, progress=False, cache=cache,
                          **lengths))
        score_s = time.perf_counter() - t0
        best: dict[str, dict] = {}
        for i in range(args.repeats):
            for variant in variants:
                r = run_child(args, variant, scored, os.path.join(tmp, f"{variant}-{i}"))
                if variant not in best or r["loop_s"] < best[variant]["loop_s"]:
                    best[variant] = r
        if args.rescore:
            rescored = os.path.join(tmp, "rescored.parquet")
            score(ScoreConfig((pairs,), rescored, os.path.join(tmp, "stored-0"), args.model, dtype=args.dtype,
                              progress=False, cache=cache, **lengths))
            before, after = positive_margins(scored), positive_margins(rescored)
    stored = best["stored"]
    n, acc = stored["pairs"], stored["accuracy"]
    setting = (f"{args.model}, {args.pairs} HH-RLHF helpful-base pairs, max length {args.max_length}/"
               f"{args.max_prompt_length}, batch {args.batch_size} (micro {args.micro_batch}), lr {args.lr:g}, "
               f"dtype {args.dtype}, {f'LoRA rank {args.lora_r}' if args.lora_r else 'full fine-tuning'}")
    print(f"{setting}; {n} pairs trained; scoring them first took {score_s:.0f} s (work selection needs anyway)")
    half = len(acc) // 2
    print(f"training reward accuracy (logged, each batch before its update): first half of the steps "
          f"{sum(acc[:half]) / max(1, half):.3f}, second half {sum(acc[half:]) / max(1, len(acc) - half):.3f}")
    if args.rescore:
        print(f"reward accuracy on the training pairs, scored by 'sera score': {before:.3f} before, "
              f"{after:.3f} after the epoch")
    unit = f"peak {stored['memory']} MiB"
    print(f"{'':34}{'loop s/pair':>12}{'run s/pair':>12}{unit:>24}")
    rows = [("sera: stored reference log-probs", stored)]
    if "live" in best:
        rows.insert(0, ("baseline: reference every step", best["live"]))
    for name, r in rows:
        print(f"{name:34}{r['loop_s'] / n:12.3f}{r['total_s'] / n:12.3f}{r['peak_mb']:24,.0f}")
    if "live" not in best:
        return
    live = best["live"]
    gap = max(abs(a - b) for a, b in zip(live["losses"], stored["losses"], strict=True))
    print(f"largest loss difference between the two runs {gap:.1e}")
    print(f"README: `sera train` with stored reference log-probs: {stored['loop_s'] / n:.3f} s/pair, peak "
          f"{stored['memory']} {stored['peak_mb']:,.0f} MiB; running the reference every step: "
          f"{live['loop_s'] / n:.3f} s/pair, {live['peak_mb']:,.0f} MiB ({live['loop_s'] / stored['loop_s']:.2f}x "
          f"faster, {stored['peak_mb'] / live['peak_mb']:.2f}x the memory; {setting})")


if __name__ == "__main__":
    main()

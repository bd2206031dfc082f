"""How far a local judge can be trusted: position bias and agreement with GPT-4 on labelled pairs.

    python tests/bench/judge_check.py --pairs 64 --judge smollm2-135m --prefill "[["

The UltraFeedback held-out pairs (GPT-4-labelled, `../shared/data/ultrafeedback-sample/eval_clean.jsonl`) are
judged pairwise by `sera eval` with precomputed answers: model `chosen` (GPT-4's preferred response) against
model `rejected`, each pair in both orders. No generation runs. Prints the share of parseable verdicts, the
share of parsed verdicts that pick the first answer (0.5 for a judge without position bias), how often a
verdict agrees with GPT-4 in each order, and the win rate of `chosen` after the both-orders rule (ties 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SHARED = Path(os.environ.get("SERA_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--judge", default="smollm2-135m")
    ap.add_argument("--prefill", default="[[")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=1500, help="cut each answer to this many characters")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from sera_cli.evaluation.config import EvalConfig
    from sera_cli.evaluation.run import evaluate

    rows = [json.loads(x) for x in (SHARED / "ultrafeedback-sample" / "eval_clean.jsonl").read_text().splitlines()]
    rows = [r for r in rows if isinstance(r["prompt"], str)][: args.pairs]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="judge-check-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "question.jsonl"  # FastChat's question format: the ids are ours
    prompts.write_text("".join(json.dumps({"question_id": i, "category": "ultrafeedback", "turns": [r["prompt"]]})
                               + "\n" for i, r in enumerate(rows)))
    answers = work / "answers.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"prompt_id": str(i), "model": m, "response": r[m][: args.max_chars]}
         for i, r in enumerate(rows) for m in ("chosen", "rejected")]), answers)
    t0 = time.perf_counter()
    result = evaluate(EvalConfig(policies=("chosen",), baseline="rejected", prompts=str(prompts),
                                 output_dir=str(work / "eval"), answers=str(answers), judge=args.judge,
                                 judge_max_tokens=args.max_tokens, judge_prefill=args.prefill, progress=True))
    seconds = time.perf_counter() - t0
    js = pq.read_table(result.judgments).to_pylist()
    parsed = [j for j in js if j["verdict"] is not None]
    first = sum(j["verdict"] == "A" for j in parsed)
    agree = {o: [j for j in parsed if j["order"] == o] for o in ("AB", "BA")}
    right = {o: sum(j["verdict"] == ("A" if o == "AB" else "B") for j in v) for o, v in agree.items()}
    s = result.summary[0]
    print(f"judge {args.judge}, reply prefilled {args.prefill!r}, {args.max_tokens} tokens; {len(rows)} UltraFeedback "
          f"held-out pairs x 2 orders; {seconds:,.0f} s ({result.judged} judged, {result.cached} cached)")
    print(f"parseable verdicts: {len(parsed)}/{len(js)}; of those, first answer picked: {first}/{len(parsed)} "
          f"({first / max(len(parsed), 1):.0%}; 50% = no position bias); ties [[C]]: "
          f"{sum(j['verdict'] == 'C' for j in parsed)}")
    for o in ("AB", "BA"):
        print(f"  GPT-4's choice shown {'first' if o == 'AB' else 'second'}: judge agrees {right[o]}/{len(agree[o])}")
    print("win rate of GPT-4's chosen after the both-orders rule (ties 0.5): "
          + ", ".join(f"{k} {v}" for k, v in s.items() if k in ("win_rate", "wins", "ties", "losses", "unparsed")))


if __name__ == "__main__":
    main()

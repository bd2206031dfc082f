"""How far a local judge can be trusted: position bias and agreement with GPT-4 on labelled pairs.

    python tests/bench/judge_check.py --pairs 64 --judge smollm2-135m --prefill "[["

The UltraFeedback held-out pairs (GPT-4-labelled, `../shared/data/ultrafeedback-sample/eval_clean.jsonl`) are
judged pairwise by `sera eval` with precomputed answers: model `chosen` (GPT-4's preferred response) against
model `rejected`, each pair in both orders. No generation runs. Prints the share of parseable verdicts, the
share of parsed verdicts that pick the first answer (0.5 for a judge without position bias), how often a
verdict agrees with GPT-4 in each order, and the win rate of `chosen` after the both-orders rule (ties 0.5).

    python tests/bench/judge_check.py --pairs 100 --logits

`--logits` asks whether the judge knows more than its text shows: no generation, one forward pass per order up to
the prefilled reply, then the judge's next-token log-probs of `A` and `B`. The order effect is removed as in
balanced position calibration (Wang et al. 2023, "Large Language Models are not Fair Evaluators"): the judge
prefers `chosen` when (lp_A - lp_B) with `chosen` first exceeds (lp_A - lp_B) with it second, so a constant
preference for the first answer cancels. Prints how often the first answer has the higher log-prob and how often
the calibrated preference agrees with GPT-4 (all pairs, and pairs whose GPT-4 scores differ by >= 2).
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
    ap.add_argument("--logits", action="store_true", help="position-calibrated next-token verdicts (no generation)")
    args = ap.parse_args()
    if args.logits:
        return calibrated(args)

    from sera_cli.stages.eval.api import evaluate
    from sera_cli.stages.eval.config import EvalConfig

    rows = _pairs(args.pairs)
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


def _pairs(n: int) -> list[dict]:
    """The first n held-out UltraFeedback pairs whose prompt is a string."""
    rows = [json.loads(x) for x in (SHARED / "ultrafeedback-sample" / "eval_clean.jsonl").read_text().splitlines()]
    return [r for r in rows if isinstance(r["prompt"], str)][:n]


def calibrated(args: argparse.Namespace) -> None:
    """Position-calibrated verdict log-probs of a local judge on GPT-4-labelled pairs (see the module text)."""
    import numpy as np
    import torch

    from sera_cli.backends.judges.local import LocalJudge
    from sera_cli.backends.models import load_model
    from sera_cli.stages.eval.protocol import judge_messages
    from sera_cli.stages.eval.questions import Question

    rows = _pairs(args.pairs)
    judge = LocalJudge(args.judge, max_tokens=args.max_tokens, prefill=args.prefill)  # its prompts, as `sera eval`'s
    model, tok = load_model(judge.ref, dtype="float32", device="cpu"), judge.tokenizer
    a, b = (tok(v, add_special_tokens=False)["input_ids"][-1] for v in ("A", "B"))
    t0, margins, mass = time.perf_counter(), [], []
    for i, r in enumerate(rows):
        q = Question(str(i), (r["prompt"],), "ultrafeedback")
        both = []
        for first, second in ((r["chosen"], r["rejected"]), (r["rejected"], r["chosen"])):
            _, msgs = judge_messages("pairwise", q, 1, [first[: args.max_chars]], [second[: args.max_chars]])
            with torch.no_grad():
                lp = model(torch.tensor([judge.prompt_ids(msgs)])).logits[0, -1].log_softmax(-1)
            both.append(float(lp[a] - lp[b]))
            mass.append(float(lp[a].exp() + lp[b].exp()))
        margins.append(both)
    m = np.asarray(margins)  # [:, 0] chosen shown first, [:, 1] chosen shown second
    pref = m[:, 0] - m[:, 1]
    gpt4 = np.asarray([r["metadata"]["score_chosen"] - r["metadata"]["score_rejected"] for r in rows], float)
    clear = np.abs(gpt4) >= 2
    print(f"judge {args.judge}, reply prefilled {args.prefill!r}, next-token log-probs of A and B; {len(rows)} "
          f"UltraFeedback held-out pairs x 2 orders; {time.perf_counter() - t0:,.0f} s")
    print(f"first answer more likely than second: {(m > 0).mean():.1%} of {m.size} judgments (50% = no position "
          f"bias); mean p(A) + p(B): {np.mean(mass):.2f}")
    print(f"calibrated preference agrees with GPT-4: {(pref > 0).mean():.1%} of {len(rows)} pairs; "
          f"{(pref[clear] > 0).mean():.1%} of the {clear.sum()} whose GPT-4 scores differ by >= 2 (50% = chance)")


if __name__ == "__main__":
    main()

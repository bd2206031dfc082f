"""Benchmark: how does the in-sample IRM's separation of flipped labels change with rows and learning rate?

The study (`study.py`) found that at 128 UltraFeedback pairs and lr 1e-5 the IRM of pi_1 on the pairs it was just
trained on does not find the flipped labels (AUROC about 0.5): pi_1 memorises the pairs, flipped or not. The
paper's regime is many pairs, each a tiny share of the gradient. This sweep trains one DPO iteration (the study's
`dpo` method and settings, 20% flips, seed 0) for each (rows, lr) of a grid, then scores the very pairs it trained
on with (pi_1, pi_0) and reports, per cell:

- the IRM's AUROC for flipped against clean pairs (a low IRM should mean flipped; 0.5 = chance), the share of the
  flips left in the top k1 = 0.7 (random keeps 70%), and its Spearman with GPT-4's score margin;
- the same for pi_0's own log-prob margin and random scores (selectors that do not train);
- pi_1's training reward accuracy and its held-out accuracy on the 200 GPT-4-labelled pairs.

Every cell is a study folder OUT/r<rows>-lr<lr>/ (the study's layout: `sera report`/`sera sql` read it), the
training pairs' scoring is OUT/r<rows>-lr<lr>/uf-flip20/dpo/iter-1/insample_scored.parquet, and all cells share
one log-prob cache, so pi_0 scores each sequence once. Rerun the same command to resume; the table goes to
OUT/sweep.md.

    python tests/bench/irm_sweep.py --out sweep/                               # 128, 256, 512 rows x lr 1e-5, 5e-5
    python tests/bench/irm_sweep.py --out sweep/ --rows 128 512 --lrs 1e-5     # a part of the grid
    python tests/bench/irm_sweep.py --out /tmp/sw --smoke                      # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
import study  # noqa: E402


def cell(out: Path, rows: int, lr: float, base: study.Scale, policy: str | None) -> Path:
    """One (rows, lr) cell: the study's dpo method at 20% flips, then the in-sample scoring."""
    folder = out / f"r{rows}-lr{lr:g}"
    scale = replace(base, methods=("dpo",), flips=(0.2,), run={**base.run, "lr": lr},
                    sets=tuple(replace(s, rows=rows) for s in base.sets))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "cache").exists():  # every cell shares one log-prob cache
        (out / "cache").mkdir(exist_ok=True)
        (folder / "cache").symlink_to(os.path.relpath(out / "cache", folder), target_is_directory=True)
    t0 = time.perf_counter()
    study.run_study(scale, folder, policy)
    run = json.loads((folder / "scale.json").read_text())["run"]
    train = folder / "data" / f"uf-{rows}-flip20.parquet"  # the pairs pi_1 was trained on
    study.heldout_score(folder / "uf-flip20" / "dpo", 1, train, run["policy"], run, name="insample_scored")
    study.log(f"== cell rows {rows}, lr {lr:g} done in {time.perf_counter() - t0:,.0f} s")
    return folder


def auroc_ci(scores: np.ndarray, flipped: np.ndarray, seed: int = 0, draws: int = 1000) -> tuple[float, float]:
    """95% percentile bootstrap interval (rows resampled) of the AUROC of a low score for the flipped rows."""
    from sera_cli.data.rankstats import auroc

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        i = rng.integers(0, len(scores), len(scores))
        if flipped[i].any() and not flipped[i].all():
            values.append(auroc(-scores[i], flipped[i]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def cell_rows(folder: Path, k1: float, seed: int) -> list[tuple[str, dict, dict]]:
    """(selector, stats, policy row) of one finished cell."""
    wd = folder / "uf-flip20" / "dpo"
    scored = wd / "iter-1" / "insample_scored.parquet"
    if not scored.exists():
        return []
    tab = pq.read_table(scored).to_pydict()
    pol = (study.policy_rows(wd) or [{}])[0]
    irm = np.asarray(tab["irm"], float)
    stats = study.selector_stats(irm, tab, k1)
    stats["flip_auroc_ci"] = auroc_ci(irm, np.asarray(tab["flipped"], bool), seed)
    rows = [("IRM of pi_1, in-sample", stats, pol)]
    rows += [(name, s, pol) for name, _, s in study.baseline_rows(wd, k1, seed)]
    return rows


def table(out: Path, k1: float, seed: int) -> str:
    lines = ["| rows | lr | selector | AUROC, flipped vs clean [95% CI] | flips left in top k1 | Spearman with GPT-4 margin "
             "| pi_1 train reward acc | pi_1 held-out acc [95% CI] | stage time (s) |",
             "|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    cells = sorted((p for p in out.glob("r*-lr*") if p.is_dir()),
                   key=lambda p: (int(p.name[1:].split("-")[0]), float(p.name.split("-lr")[1])))
    for folder in cells:
        rows, lr = folder.name[1:].split("-lr")
        for name, s, pol in cell_rows(folder, k1, seed):
            ci = pol.get("ci")
            acc = f"{study.f(pol.get('heldout'), '.1%')} [{study.f(ci[0], '.1%')}, {study.f(ci[1], '.1%')}]" \
                if ci else "-"
            first = name.startswith("IRM")
            auc = study.f(s.get('flip_auroc'), '.3f')
            if "flip_auroc_ci" in s:
                auc += f" [{s['flip_auroc_ci'][0]:.3f}, {s['flip_auroc_ci'][1]:.3f}]"
            lines.append(f"| {rows} | {lr} | {name} | {auc} | "
                         f"{study.f(s.get('flips_kept'), '.1%')} | {study.f(s.get('gpt4_spearman'), '+.3f')} | "
                         f"{study.f(pol.get('train_acc'), '.0%') if first else ''} | {acc if first else ''} | "
                         f"{study.f(pol.get('seconds'), ',.0f') if first else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="sweep folder (rerun the same command to resume)")
    ap.add_argument("--rows", nargs="+", type=int, default=[128, 512, 256])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 5e-5])
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a few rows: the plumbing only")
    ap.add_argument("--table", action="store_true", help="only print the table of the finished cells")
    args = ap.parse_args()
    base = study.SCALES["smoke" if args.smoke else "cpu"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        policy = study.tiny_policy(out) if args.smoke else None
        t0 = time.perf_counter()
        for rows in args.rows:  # the grid in the order given: the first rows at every lr, then the next
            for lr in args.lrs:
                cell(out, rows, lr, base, policy)
                text = table(out, base.run["k1"], base.run["seed"])
                (out / "sweep.md.partial").write_text(text)
                (out / "sweep.md.partial").rename(out / "sweep.md")
        study.log(f"sweep finished in {time.perf_counter() - t0:,.0f} s (this invocation)")
    print(table(out, base.run["k1"], base.run["seed"]))


if __name__ == "__main__":
    main()

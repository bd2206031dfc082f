"""The study across seeds: one table from several `tests/bench/study.py` folders run with different seeds.

Run: python tests/bench/study_seeds.py study-seed1/ study-seed2/ [--group uf-flip20]

Each folder is one seed (`study.py ... --set seed=S` draws another sample of pairs, other flips and another
training order). Per method: the held-out accuracy of its last iteration in each folder, their mean, and its
paired difference with one DPO iteration of the same folder (same pairs, same flips), with the number of seeds
where the method was above DPO; per selector: the flip AUROC in each folder and its mean. Only what the folders
hold is read (nothing is recomputed), so the table can be printed while a study is still running.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import METHODS, baseline_rows, policy_rows, selection_rows  # noqa: E402


def last_heldout(wd: Path) -> float | None:
    """Held-out accuracy of the last iteration of a method's workdir that has one."""
    rows = [r for r in policy_rows(wd) if "heldout" in r] if (wd / "run.json").exists() else []
    return rows[-1]["heldout"] if rows else None


def selectors(group: Path, k1: float, seed: int) -> dict[str, float]:
    """Flip AUROC of each selector of one study group (the IRM at iteration 2)."""
    out = {name: s.get("flip_auroc") for name, _, s in baseline_rows(group / "dpo", k1, seed)}
    for m, name in (("sera-select", "IRM, in-sample"), ("sera-select-xfit", "IRM, cross-fitted")):
        for _, t, s in selection_rows(group / m, k1, seed) if (group / m).exists() else []:
            if t == 2:
                out[name] = s.get("flip_auroc")
    return out


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(folders: list[Path], group: str) -> str:
    seeds, k1s = [], []
    for d in folders:
        run = json.loads((d / "scale.json").read_text())["run"]
        seeds.append(run["seed"])
        k1s.append(run["k1"])
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"## {group}: held-out accuracy of each method's last iteration", "",
             f"| method | {head} | mean | mean - dpo | seeds above dpo |", "|---|" + "---|" * (len(seeds) + 3)]
    dpo = [last_heldout(d / group / "dpo") for d in folders]
    for m in METHODS:
        accs = dpo if m == "dpo" else [last_heldout(d / group / m) for d in folders]
        if all(a is None for a in accs):
            continue
        have = [(a, b) for a, b in zip(accs, dpo, strict=True) if a is not None and b is not None]
        mean = np.mean([a for a in accs if a is not None])
        diff = np.mean([a - b for a, b in have]) if have and m != "dpo" else None
        above = f"{sum(a > b for a, b in have)} of {len(have)}" if m != "dpo" else "-"
        lines.append(f"| {m} | " + " | ".join(fmt(a, ".1%") for a in accs) +
                     f" | {mean:.1%} | {fmt(diff, '+.1%')} | {above} |")
    sel = [selectors(d / group, k1, s) for d, k1, s in zip(folders, k1s, seeds, strict=True)]
    names = list(dict.fromkeys(n for s in sel for n in s))
    lines += ["", f"## {group}: AUROC of each selector for flipped against clean pairs (0.5 = chance)", "",
              f"| selector | {head} | mean |", "|---|" + "---|" * (len(seeds) + 1)]
    for n in names:
        vals = [s.get(n) for s in sel]
        got = [v for v in vals if v is not None]
        lines.append(f"| {n} | " + " | ".join(fmt(v, ".3f") for v in vals) +
                     f" | {fmt(float(np.mean(got)) if got else None, '.3f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="study folders, one per seed")
    ap.add_argument("--group", default="uf-flip20", help="data set and flip rate, as the folders name it")
    args = ap.parse_args()
    missing = [str(d) for d in args.folders if not (d / "scale.json").exists()]
    if missing:
        raise SystemExit(f"not a study folder (no scale.json): {', '.join(missing)}; run tests/bench/study.py first")
    print(table(args.folders, args.group))


if __name__ == "__main__":
    main()

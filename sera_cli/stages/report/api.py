"""`sera report`: what each iteration of one or more `sera run` workdirs did, as a table, `report.md` and a PNG.

Per iteration: training rows, rows selected and generated, IRM statistics of the scored offline data, how well
the IRM finds flipped labels (when the data has a `flipped` column), train loss and reward accuracy (the
trainer's `metrics.jsonl`), and on the held-out split the accuracy of the cumulative implicit reward
beta * log(pi_t / pi_0) and its Spearman correlation with the length difference (chosen - rejected tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sera_cli.data.errors import InputError, described
from sera_cli.data.rankstats import auroc, spearman
from sera_cli.data.tables import atomic_path, check_writable
from sera_cli.stages.report.runs import Iteration, RunReport
from sera_cli.stages.run.layout import Layout
from sera_cli.stages.run.ledger import read_ledger

ROWS = [  # (label, attribute, format)
    ("training rows", "train_rows", "d"), ("selected (top k1)", "selected", "d"),
    ("generated candidates", "candidates", "d"), ("generated pairs kept (top k2)", "generated", "d"),
    ("IRM mean", "irm_mean", "+.3f"), ("IRM std", "irm_std", ".3f"), ("IRM > 0", "irm_positive", ".0%"),
    ("AUROC: low IRM finds flipped", "flip_auroc", ".3f"), ("flips kept in top k1", "flips_kept", ".0%"),
    ("train loss", "train_loss", ".4f"), ("train reward accuracy", "train_accuracy", ".0%"),
    ("held-out reward accuracy", "heldout_accuracy", ".1%"),
    ("held-out accuracy, true labels", "heldout_accuracy_true", ".1%"),
    ("held-out AUROC for flipped", "heldout_flip_auroc", ".3f"),
    ("reward-length Spearman (held-out)", "length_corr", "+.3f"),
    ("judge win rate vs pi_0", "eval_win_rate", ".1%"),
    ("judge LC win rate vs pi_0 (length-controlled)", "eval_lc_win_rate", ".1%"),
    ("judge mean grade (1-10)", "eval_grade", ".2f"), ("stage time (s)", "seconds", ".0f"),
    ("ensemble of candidates: time (s)", "ensemble_seconds", ".0f"),
    ("ensemble of candidates: peak memory (MiB)", "ensemble_memory", ".0f"),
]


def collect(workdir: str | Path) -> RunReport:
    """Read a workdir's run.json and artifacts into a report."""
    lay = Layout(Path(workdir))
    if not Path(workdir).is_dir():
        raise InputError(str(workdir), "no such folder" if not Path(workdir).exists() else "is a file, not a workdir",
                         hint="give the --workdir of a 'sera run'")
    if not lay.ledger.exists():
        raise InputError(str(workdir), "has no run.json: not a 'sera run' workdir (or the run has not started)")
    ledger = read_ledger(lay.ledger)
    config = ledger.get("config", {})
    iters, irm = [], {}
    t = 1
    while lay.iteration(t).exists():
        try:
            it, irm_t = _iteration(lay, t, ledger, config)
        except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as err:  # damaged stage outputs
            raise InputError(str(lay.iteration(t)), f"cannot be read: {described(err)}",
                             hint="rerun 'sera run' with the same settings to rebuild the damaged stage") from None
        irm = irm_t or irm
        iters.append(it)
        t += 1
    return RunReport(Path(workdir).name or str(workdir), Path(workdir), config, iters, irm)


def _flipped(columns: dict[str, list], path: Path) -> np.ndarray:
    """The `flipped` labels of a scored file; a null or NaN label is an error naming its row, not a clean pair."""
    from sera_cli.stages.inspect.column_values import flags

    return flags(pa.table({"flipped": columns["flipped"]}), "flipped", str(path))


def _rows(path: Path) -> int | None:
    return pq.read_metadata(path).num_rows if path.exists() else None


def _iteration(lay: Layout, t: int, ledger: dict, config: dict) -> tuple[Iteration, dict[str, np.ndarray]]:
    it = Iteration(t)
    train = ledger.get("stages", {}).get(f"iter-{t}/train", {}).get("input_specs", {}).get("data")
    it.train_rows = _rows(Path(train)) if train else None
    it.selected, it.generated = _rows(lay.selected(t)), _rows(lay.pairs(t))
    it.candidates = _rows(lay.candidates(t))
    irm: dict[str, np.ndarray] = {}
    if lay.scored(t).exists():
        scored = pq.read_table(lay.scored(t), columns=None).to_pydict()
        v = np.asarray(scored["irm"], float)
        it.irm_mean, it.irm_std, it.irm_positive = float(v.mean()), float(v.std()), float((v > 0).mean())
        irm = {"all": v}
        if "flipped" in scored:
            flipped = _flipped(scored, lay.scored(t))
            it.flip_auroc = auroc(-v, flipped)
            irm = {"clean": v[~flipped], "flipped": v[flipped]}
            if lay.selected(t).exists() and flipped.any():
                sel = _flipped(pq.read_table(lay.selected(t), columns=["flipped"]).to_pydict(), lay.selected(t))
                it.flips_kept = int(sel.sum()) / int(flipped.sum())
    it.losses, it.train_loss, it.train_accuracy = _metrics(lay.metrics(t))
    if lay.heldout_scored(t).exists():
        h = pq.read_table(lay.heldout_scored(t)).to_pydict()
        v = np.asarray(h["irm"], float)
        it.heldout_accuracy = float((v > 0).mean())
        it.length_corr = spearman(v, np.asarray(h["ntok_chosen"], float) - np.asarray(h["ntok_rejected"], float))
        if "flipped" in h:
            flipped = _flipped(h, lay.heldout_scored(t))
            it.heldout_accuracy_true = float(((v > 0) != flipped).mean())
            it.heldout_flip_auroc = auroc(-v, flipped)
    if lay.eval_summary(t).exists():
        ev = pq.read_table(lay.eval_summary(t)).to_pylist()[0]
        it.eval_win_rate, it.eval_lc_win_rate, it.eval_grade = ev["win_rate"], ev["lc_win_rate"], ev["mean_grade"]
    secs = [rec.get("seconds", 0.0) for key, rec in ledger.get("stages", {}).items()
            if key.startswith(f"iter-{t}/")]
    it.seconds = float(sum(secs)) if secs else None
    prev = ledger.get("stages", {}).get(f"iter-{t}/reward-prev")
    if prev:
        it.ensemble_seconds = prev.get("seconds")
        it.ensemble_memory = (prev.get("summary") or {}).get("peak_memory_mib")
    return it, irm


def _metrics(path: Path) -> tuple[list[float], float | None, float | None]:
    """Per-step losses, the mean loss and the mean reward accuracy of a trainer's metrics.jsonl."""
    if not path.exists():
        return [], None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and r.get("event", "step") == "step"]
    losses = [float(r["loss"]) for r in steps]
    accs = [float(r[k]) for r in steps for k in ("reward_accuracy", "rewards/accuracies", "accuracy") if k in r]
    return losses, _mean(losses), _mean(accs)


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def columns(reports: list[RunReport]) -> list[tuple[str, RunReport, Iteration]]:
    several = len(reports) > 1
    return [(f"{r.name} it{i.t}" if several else f"iter {i.t}", r, i) for r in reports for i in r.iterations]


def table_rows(reports: list[RunReport]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: one row per statistic, one column per run iteration."""
    cols = columns(reports)
    header = ["statistic"] + [c[0] for c in cols]
    body = []
    for label, attr, spec in ROWS:
        values = [getattr(i, attr) for _, _, i in cols]
        if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            continue
        body.append([label] + [_fmt(v, spec) for v in values])
    return header, body


def describe(r: RunReport) -> str:
    c = r.config
    data = ", ".join(c.get("data") or []) or "embedded demo set"
    return (f"{r.name}: method {c.get('method')}, policy {c.get('policy')}, data {data}, "
            f"{c.get('iterations')} iteration(s), loss {c.get('loss')}, beta {c.get('beta')}, k1 {c.get('k1')}, "
            f"k2 {c.get('k2')}, N {c.get('n')}, lambda {c.get('ensemble_lambda')}")


def markdown(reports: list[RunReport], figure: str | None) -> str:
    header, body = table_rows(reports)
    lines = ["# sera report", ""] + [f"- {describe(r)}" for r in reports] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", "Held-out reward: beta * log(pi_t / pi_0) on the held-out split; accuracy = share with "
              "r(chosen) > r(rejected). AUROC: how well a low IRM ranks the pairs whose labels were flipped."]
    if figure:
        lines += ["", f"![report]({figure})"]
    return "\n".join(lines) + "\n"


def rich_table(reports: list[RunReport]):
    from rich.table import Table

    header, body = table_rows(reports)
    table = Table(title="sera report", title_justify="left")
    table.add_column(header[0])
    for h in header[1:]:
        table.add_column(h, justify="right")
    for row in body:
        table.add_row(*row)
    return table


def as_json(reports: list[RunReport]) -> list[dict[str, Any]]:
    """The reports for machines: each run's name, workdir, config and per-iteration numbers (no IRM arrays)."""
    return [{"name": r.name, "workdir": str(r.workdir), "config": r.config,
             "iterations": [vars(i) for i in r.iterations]} for r in reports]


def figure(reports: list[RunReport], path: Path) -> None:
    """report.png: held-out accuracy per iteration, loss per step, and the IRM of clean vs flipped pairs."""
    from sera_cli.stages.report.plots import report_figure, save

    path.parent.mkdir(parents=True, exist_ok=True)
    save(report_figure(reports), path)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    figure: Path
    reports: list[RunReport]


def write(workdirs: list[str], output_dir: str | None = None) -> ReportFiles:
    """Collect the runs; write report.md and report.png (into the workdir, or `output_dir` for several runs)."""
    reports = [collect(w) for w in workdirs]
    if not any(r.iterations for r in reports):
        raise InputError(workdirs[0], "no iteration has finished yet: nothing to report")
    out = Path(output_dir) if output_dir else (Path(workdirs[0]) if len(workdirs) == 1 else Path("sera-report"))
    png, md = out / "report.png", out / "report.md"
    for path in (png, md):
        check_writable(str(path), [r.workdir / "run.json" for r in reports])
    made = not out.exists()
    try:
        figure(reports, png)
        with atomic_path(md) as tmp:
            tmp.write_text(markdown(reports, png.name))
    except BaseException:
        if made:  # a failed report leaves no folder of its own behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    return ReportFiles(md, png, reports)

"""What the margins of a scored file say: IRM distribution, reward accuracy, length bias (SeRA paper, Fig. 3),
and, where ground truth exists (a `flipped` column or external scores), how well IRM finds the bad labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.data.errors import ConfigError, InputError
from sera_cli.data.numbers import config_problems
from sera_cli.data.rankstats import auroc, quantiles, spearman
from sera_cli.stages.inspect.column_values import flags, floats, response_lengths
from trainers.config import Settings


@dataclass(frozen=True, kw_only=True)
class InspectConfig(Settings):
    """The settings of one `sera inspect`: a scored file's margins, and the plot to draw."""

    inputs: tuple[str, ...]
    k1: float = 0.7
    bins: int = 20
    plot: str | None = None

    def check(self) -> None:
        problems = config_problems(self)
        if not 0.0 < self.k1 <= 1.0:
            problems.append(f"--k1 must be a fraction in (0, 1], got {self.k1}")
        if self.bins < 1:
            problems.append(f"--bins must be >= 1, got {self.bins}")
        if self.plot and not self.plot.endswith(".png"):
            problems.append(f"--plot {self.plot}: give a .png file")
        if problems:
            raise ConfigError("; ".join(problems))



def histogram(x: np.ndarray, bins: int) -> dict[str, list]:
    counts, edges = np.histogram(x, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def flip_report(irm: np.ndarray, flipped: np.ndarray, in_top: np.ndarray) -> dict[str, Any]:
    """How IRM separates clean pairs (positives) from flipped ones; where the flipped land in the top k1
    (`in_top`, a boolean mask)."""
    n_flip = int(flipped.sum())
    return {"count": n_flip, "rate": _round(n_flip / len(irm)), "auroc": _round(auroc(irm, ~flipped)),
            "share_of_top_k1": _round(float(flipped[in_top].mean()) if in_top.any() else None),
            "kept_in_top_k1": _round(float(in_top[flipped].mean()) if n_flip else None)}


def margin_report(irm: np.ndarray, margin: np.ndarray) -> dict[str, Any]:
    """IRM against an external score margin (score_chosen - score_rejected); rows without both scores are
    left out."""
    known = np.isfinite(margin)
    irm, margin = irm[known], margin[known]
    agree, disagree, tied = margin > 0, margin < 0, margin == 0
    both = agree | disagree
    vs_ties = agree | tied
    return {"agree": int(agree.sum()), "disagree": int(disagree.sum()), "tied": int(tied.sum()),
            "auroc": _round(auroc(irm[both], agree[both])),
            "auroc_vs_ties": _round(auroc(irm[vs_ties], agree[vs_ties])),
            "spearman": _round(spearman(irm, margin))}


def pair_report(table: pa.Table, k1: float, bins: int) -> dict[str, Any]:
    from sera_cli.stages.select.api import fraction_count, top_mask

    irm = floats(table, "irm")
    (lc, lr), unit = response_lengths(table, ("chosen", "rejected"))
    diff = lc - lr
    out: dict[str, Any] = {"kind": "pairs", "score": "irm", "rows": len(irm), "mean": _round(float(irm.mean())),
                           "quantiles": {k: _round(v) for k, v in quantiles(irm).items()},
                           "histogram": histogram(irm, bins),
                           "reward_accuracy": _round(float((irm > 0).mean())), "ties": _round(float((irm == 0).mean())),
                           "length": {"unit": unit, "chosen_longer": _round(float((diff > 0).mean()))}}
    corr = {"irm_vs_length_diff": _round(spearman(irm, diff))}
    if {"reward_chosen", "reward_rejected"} <= set(table.column_names):
        rc, rr = floats(table, "reward_chosen"), floats(table, "reward_rejected")
        corr["reward_chosen_vs_length_diff"] = _round(spearman(rc, diff))
        corr["reward_rejected_vs_length_diff"] = _round(spearman(rr, diff))
        corr["reward_vs_length"] = _round(spearman(np.concatenate([rc, rr]), np.concatenate([lc, lr])))
    out["spearman"] = corr
    ids = table.column("id") if "id" in table.column_names else pa.array(np.arange(len(irm)))
    top = top_mask(irm, ids, fraction_count(k1, len(irm)))
    out["top_k1"] = {"k1": k1, "rows": int(top.sum()),  # what `sera select --top k1` keeps: irm >= irm_min
                     "irm_min": _round(float(irm[top].min())) if top.any() else None}
    out["flipped"] = flip_report(irm, floats(table, "flipped") > 0, top) \
        if "flipped" in table.column_names else None
    if out["flipped"] is not None:
        out["flipped"]["k1"] = k1
    out["score_margin"] = margin_report(irm, floats(table, "score_chosen") - floats(table, "score_rejected")) \
        if {"score_chosen", "score_rejected"} <= set(table.column_names) else None
    return out


def candidate_report(table: pa.Table, bins: int) -> dict[str, Any]:
    reward = floats(table, "reward")
    (length,), unit = response_lengths(table, ("response",))
    return {"kind": "candidates", "score": "reward", "rows": len(reward), "mean": _round(float(reward.mean())),
            "quantiles": {k: _round(v) for k, v in quantiles(reward).items()},
            "histogram": histogram(reward, bins), "length": {"unit": unit},
            "spearman": {"reward_vs_length": _round(spearman(reward, length))}}


def usable(name: str, table: pa.Table, score: str) -> tuple[pa.Table, int]:
    """The rows with a finite score, and how many were dropped."""
    if score not in table.column_names:
        raise InputError(name, f"has no '{score}' column", hint="inspect reads the output of 'sera score'")
    typ = table.schema.field(score).type
    if not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
        raise InputError(name, f"has type {typ}; expected numbers", column=score,
                         hint="inspect reads the output of 'sera score'")
    col = pc.cast(table.column(score), pa.float64())
    ok = pc.fill_null(pc.is_finite(col), False)
    kept = table.filter(ok)
    if kept.num_rows == 0:
        raise InputError(name, f"has no row with a finite '{score}'", column=score)
    return kept, table.num_rows - kept.num_rows


def precision_report(table: pa.Table, provs: list) -> dict[str, Any] | None:
    """The precision check that scored these pairs (`sera score --precision-check`), found in their provenance,
    with the share of these pairs whose |irm| lies under its noise floor; None when no check was recorded."""
    from sera_cli.stages.score.precision import find, under_floor

    check = find(provs)  # type: ignore[arg-type]  (a list of provenances is searched in order)
    if check is None:
        return None
    keys = ("dtype", "pairs", "sign_agreement", "median_abs_error", "noise_floor")
    return {**{k: check.get(k) for k in keys}, "under_floor": _round(under_floor(floats(table, "irm"),
                                                                                 check["noise_floor"]))}


def inspect(config: InspectConfig) -> dict[str, Any]:
    """The report of one scored file (pairs or candidates); draws the plot when asked."""
    from sera_cli.data.contract import is_candidates
    from sera_cli.data.tables import check_writable, inputs_of, read_inputs

    config.check()
    if config.plot:
        check_writable(config.plot, inputs_of(config))
    inputs = read_inputs(list(config.inputs))
    candidates = is_candidates(inputs.table) and "irm" not in inputs.table.column_names
    if not candidates and "flipped" in inputs.table.column_names:  # a null label is unknown, not clean
        flags(inputs.table, "flipped", inputs.name, inputs.locate)
    table, missing = usable(inputs.name, inputs.table, "reward" if candidates else "irm")
    report = candidate_report(table, config.bins) if candidates else pair_report(table, config.k1, config.bins)
    report = {"file": inputs.name, **report, "missing": missing}
    if not candidates:
        report["precision"] = precision_report(table, [src.prov for src in inputs.sources])
    if config.plot:
        from sera_cli.stages.report.plots import plot_report

        plot_report(table, report, config.plot)
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def histogram_lines(hist: dict[str, list], width: int = 40) -> list[str]:
    """A terminal histogram: one line per bin, '[lo, hi)  count  bar'."""
    counts, edges = hist["counts"], hist["edges"]
    top = max(counts) or 1
    return [f"  {lo:>9.3g} .. {hi:<9.3g} {c:>9,}  " + "█" * round(width * c / top)
            for lo, hi, c in zip(edges, edges[1:], counts, strict=False)]


def render(report: dict[str, Any]) -> list[str]:
    """The report as text lines for the terminal."""
    score, q = report["score"], report["quantiles"]
    kind = report["kind"]
    lines = [f"{report['file']}: {report['rows']:,} {kind}" +
             (f" ({report['missing']:,} rows without a finite {score} left out)" if report["missing"] else ""),
             f"{score}: mean {_num(report['mean'])}; " + ", ".join(f"{k} {_num(v)}" for k, v in q.items())]
    s = report["spearman"]
    if kind == "pairs":
        lines.append(f"reward accuracy (irm > 0) {_pct(report['reward_accuracy'])}; ties (irm = 0) "
                     f"{_pct(report['ties'])}; chosen longer {_pct(report['length']['chosen_longer'])} "
                     f"(in {report['length']['unit']})")
        corr = [f"irm {_num(s['irm_vs_length_diff'])}"]
        if "reward_chosen_vs_length_diff" in s:
            corr += [f"reward_chosen {_num(s['reward_chosen_vs_length_diff'])}",
                     f"reward_rejected {_num(s['reward_rejected_vs_length_diff'])}"]
        line = "Spearman with len(chosen) - len(rejected): " + ", ".join(corr)
        if "reward_vs_length" in s:
            line += f"; reward vs own length {_num(s['reward_vs_length'])}"
        lines.append(line)
    else:
        lines.append(f"Spearman of reward with response length ({report['length']['unit']}): "
                     f"{_num(s['reward_vs_length'])}")
    f = report.get("flipped")
    if f:
        lines.append(f"flipped {f['count']:,} ({_pct(f['rate'])}): AUROC of irm, clean above flipped "
                     f"{_num(f['auroc'])}; top k1 = {f['k1']:g} holds {_pct(f['share_of_top_k1'])} flipped rows "
                     f"and keeps {_pct(f['kept_in_top_k1'])} of the flipped")
    m = report.get("score_margin")
    if m:
        lines.append(f"external score margin: {m['agree']:,} agree, {m['disagree']:,} disagree, {m['tied']:,} tied; "
                     f"AUROC agree vs disagree {_num(m['auroc'])}, agree vs tied {_num(m['auroc_vs_ties'])}; "
                     f"Spearman {_num(m['spearman'])}")
    p = report.get("precision")
    if p:
        lines.append(f"noise floor {p['noise_floor']:.4g} (precision check of {p['pairs']} pairs, {p['dtype']} vs "
                     f"float32, sign agreement {_pct(p['sign_agreement'])}): {_pct(p['under_floor'])} of pairs have "
                     "|irm| under it")
    lines.append(f"histogram of {score}:")
    return lines + histogram_lines(report["histogram"])

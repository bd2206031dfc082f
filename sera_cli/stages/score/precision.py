"""How far the IRM of a low-precision score can be trusted: the precision check (`sera score --precision-check N`).

A score computed with bfloat16 (or float16) weights and arithmetic moves each summed log-prob by tenths of a nat,
which is as large as the margins a first iteration produces. The check rescores N randomly drawn pairs (seeded)
in float32 with the same models and compares the two IRMs of each pair:

- sign agreement: the share of the N pairs whose IRM has the same sign in both precisions;
- median |IRM error|: the median of |IRM_checked - IRM_float32|;
- noise floor: the 95th percentile of |IRM error| (`noise_floor`). A pair's sign can only flip when the rounding
  error of its IRM is larger than its |IRM|; at or above the floor, at most 5% of the measured errors are that
  large, so sign agreement is at least 95% there, and below it sign agreement can drop under 95%. The floor is
  in the units of the IRM (beta * nats), and the quantile is the empirical one that never interpolates: the
  smallest measured |error| that at least 95% of the errors do not exceed.

The pure functions here take arrays only (no torch), so `select` and `inspect`, light commands, can use them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LEVEL = 0.95  # sign agreement the noise floor guarantees above it


def noise_floor(irm_checked, irm_exact, level: float = LEVEL) -> float:
    """The |IRM| below which sign agreement may drop under `level`: the `level`-quantile of |IRM error|, taken as
    the smallest measured |error| that a share >= `level` of the errors do not exceed (no interpolation)."""
    err = np.sort(np.abs(np.asarray(irm_checked, dtype=np.float64) - np.asarray(irm_exact, dtype=np.float64)))
    if not len(err):
        raise ValueError("noise_floor needs at least one pair")
    return float(err[max(math.ceil(level * len(err)) - 1, 0)])


def precision_stats(irm_checked, irm_exact, level: float = LEVEL) -> dict[str, Any]:
    """The precision check's figures for pairs scored in a low precision (`irm_checked`) and in float32
    (`irm_exact`): pairs, sign agreement (a tie on both sides agrees), median |IRM error|, noise floor, and the
    sign agreement measured at and above the floor and below it (None where no pair is)."""
    a, b = np.asarray(irm_checked, dtype=np.float64), np.asarray(irm_exact, dtype=np.float64)
    same = np.sign(a) == np.sign(b)
    floor = noise_floor(a, b, level)
    above = np.abs(a) >= floor
    return {"pairs": int(len(a)), "sign_agreement": float(same.mean()),
            "median_abs_error": float(np.median(np.abs(a - b))), "noise_floor": floor, "level": level,
            "agreement_above_floor": float(same[above].mean()) if above.any() else None,
            "agreement_below_floor": float(same[~above].mean()) if (~above).any() else None}


def under_floor(irm, floor: float) -> float:
    """The share of pairs whose |IRM| is under the noise floor (their sign may be rounding noise)."""
    irm = np.asarray(irm, dtype=np.float64)
    irm = irm[np.isfinite(irm)]
    return float((np.abs(irm) < floor).mean()) if len(irm) else 0.0


def check_rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    """The rows the check rescores: min(n, n_rows) distinct rows drawn with `seed`, in increasing order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(n, n_rows), replace=False))


def find(prov: dict[str, Any] | None) -> dict[str, Any] | None:
    """The precision check recorded in a file's provenance or, for a derived file, in its parents'."""
    from sera_cli.data.lineage import find as find_key

    found = find_key(prov, "precision")
    return found if isinstance(found, dict) and found.get("noise_floor") is not None else None


def summary(check: dict[str, Any]) -> str:
    """One line of the check's figures."""
    return (f"precision check ({check['pairs']} pairs, {check['dtype']} vs float32): sign agreement "
            f"{check['sign_agreement']:.1%}, median |IRM error| {check['median_abs_error']:.4g}, noise floor "
            f"{check['noise_floor']:.4g}" +
            (f" ({check['under_floor']:.1%} of pairs under it)" if check.get("under_floor") is not None else ""))


def select_warning(cutoff: float | None, prov: dict[str, Any] | None) -> str | None:
    """One line when a selection's cut (the lowest IRM kept) lies under the noise floor of the scores' precision
    check: the pairs beside the cut are then ordered by rounding noise."""
    check = find(prov)
    if check is None or cutoff is None or not math.isfinite(cutoff) or abs(cutoff) >= check["noise_floor"]:
        return None
    return (f"warning: the cut (irm {cutoff:.4g}) falls under the noise floor {check['noise_floor']:.4g} that "
            f"the precision check measured in {check['dtype']}: pairs near it are ordered by rounding noise "
            "(rescore with --dtype float32)")


def check_pairs(table, cols: dict[str, Any], n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sequences the check rescores, as (chosen, rejected) indices into the flat sequences, and the IRM the
    score gave each pair. Pairs: n random rows. Candidates: n random prompts with two or more candidates, each
    with its highest- and lowest-reward candidate (the pair `select --pairs` builds from it)."""
    if "irm" in cols:
        rows = check_rows(table.num_rows, n, seed)
        return 2 * rows, 2 * rows + 1, np.asarray(cols["irm"], dtype=np.float64)[rows]
    reward = np.asarray(cols["reward"], dtype=np.float64)
    key = "prompt_id" if "prompt_id" in table.column_names else "prompt"
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(table.column(key).to_pylist()):
        groups.setdefault(str(g), []).append(i)
    multi = [rows for rows in groups.values() if len(rows) > 1]
    if not multi:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    picked = [multi[i] for i in check_rows(len(multi), n, seed)]
    chosen = np.array([rows[int(np.argmax(reward[rows]))] for rows in picked], dtype=np.int64)
    rejected = np.array([rows[int(np.argmin(reward[rows]))] for rows in picked], dtype=np.int64)
    return chosen, rejected, reward[chosen] - reward[rejected]


def precision_check(config, roles: dict[str, Any], toks: dict[str, Any], seqs: list, cols: dict[str, Any], table,
                    n: int, dtype: str) -> dict[str, Any] | None:
    """Rescore the check's pairs in float32 with the same models and settings; their figures, with the share of all
    the output's pairs under the noise floor (pairs only). None when no pair can be checked."""
    import gc

    from sera_cli.backends.logps.batched import sequences_logps
    from sera_cli.backends.models import load_model
    from sera_cli.data.console import console
    from trainers.losses import implicit_reward

    chosen, rejected, irm_checked = check_pairs(table, cols, n, config.precision_seed)
    if not len(chosen):
        return None
    idx = np.concatenate([chosen, rejected])
    exact: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for role, ref in roles.items():
        model = None
        try:
            with console.status(f"Precision check: rescoring {len(chosen)} pairs with {ref.spec} in float32"):
                model = load_model(ref, "float32", config.device, config.trust_remote_code)
                exact[role] = sequences_logps(model, [seqs[i] for i in idx], toks[role].pad_token_id,
                                              config.batch_tokens)
        except (MemoryError, RuntimeError) as err:  # a float32 copy is twice a bfloat16 model: the scores stand
            if not isinstance(err, MemoryError) and "out of memory" not in str(err).lower():
                raise
            console.print(f"precision check skipped: {ref.spec} does not fit in memory in float32 (the scores are "
                          "kept; pass --precision-check 0 to skip it)", soft_wrap=True, highlight=False,
                          markup=False)
            return None
        finally:
            del model
            gc.collect()
    pol, ntok = exact["policy"]
    ref_logp = exact["ref"][0] if "ref" in exact else np.full_like(pol, np.nan)
    reward = implicit_reward(config.reward, pol, ref_logp, np.asarray(ntok), config.beta)
    k = len(chosen)
    irm_exact = reward[:k] - reward[k:]
    stats = precision_stats(irm_checked, irm_exact)
    out = {"dtype": dtype, "seed": config.precision_seed, **stats}
    out["under_floor"] = under_floor(cols["irm"], stats["noise_floor"]) if "irm" in cols else None
    return out


def reference_dtype(plan, dtype: str, device: str) -> str | None:
    """The dtype the reference log-probs of a training run were (or will be) computed in: the stored ones' recorded
    dtype, else the dtype a reference loaded here gets (`--dtype`, 'auto' as `score` resolves it); None for
    reference-free losses or stored log-probs that record none."""
    if plan.source == "none":
        return None
    if plan.source == "input":
        return (plan.identity or {}).get("dtype")
    from sera_cli.backends.models import resolved_dtype

    return resolved_dtype(dtype, device)


def dtype_note(ref_dtype: str | None, policy_dtype: str) -> str | None:
    """One line when the reference log-probs and the policy's forward pass differ in dtype: then even a policy equal
    to its reference does not start at the loss of equal log-probs (ln 2 for DPO)."""
    if ref_dtype is None or ref_dtype == policy_dtype:
        return None
    return (f"note: the reference log-probs are {ref_dtype} and the policy's forward runs in {policy_dtype}: the "
            "step-0 loss is not ln 2 even where policy = reference (use one --dtype for both for exact numbers)")

"""The decisive SeRA study (issue 35): can IRM selection be told from chance? Resumable, one folder per study.

    python tests/bench/study.py --scale cpu-decisive --out decisive/                 # the real study, 2 CPU cores
    python tests/bench/study.py --scale cpu-decisive --out decisive/ --settings lr=1e-5,epochs=1 lr=3e-5,epochs=1
    python tests/bench/study.py --scale cpu-decisive --out decisive/ --seeds 3       # phases 3-6 for seeds 0, 1, 2
    python tests/bench/study.py --scale decisive-smoke --out dsmoke/                     # tiny random Llama, every phase (CI)

Phases (every step is skipped when its output exists; outputs are written under a temporary name, then renamed;
`sera train` checkpoints every 16 steps and resumes). Each phase writes OUT/results.json and OUT/tables.md.

1. data       the HH-RLHF helpful-base and helpful-rejection-sampled test splits (`sera convert`), ties dropped,
              pairs longer than the length limits (policy chat template) excluded, one seeded permutation into
              held-out / validation / train / gold pool; the training pairs get 30% flipped labels.
2. baseline   "the longer (or shorter) response wins", direction chosen on validation, reported on held-out.
3. pi_1       DPO from pi_0 on the training pairs, one per --settings entry, scored on validation and held-out;
              the setting is chosen on validation; gate: held-out accuracy >= length baseline + 5 points.
4. iteration 2   arms of equal steps S from pi_1 (ref pi_1): iterative-dpo, irm-top70, random-70, xfit-top70,
              oracle (the flipped pairs removed).
5. iteration 3   irm-top70 and xfit-top70 with the ensembled IRM (lambda 0.3), random-70 as their control.
6. metrics    held-out accuracy of every policy (against pi_0), paired differences against random-70, the
              selectors' flip AUROC, flips among the dropped pairs, reward-length Spearman, wall times.

sera is driven only through its command line (subprocesses), so this script does not depend on its internals;
the one exception is `tokenizer_dir`, which asks sera where the policy's tokenizer lives.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
import study  # noqa: E402  (the sibling bench script: SHARED, tiny_policy, bootstrap_ci, paired_diff, log)

ARMS2 = ("iterative-dpo", "irm-top70", "random-70", "xfit-top70", "oracle")
ARMS3 = ("irm-top70", "xfit-top70", "random-70")
SOURCES = ("hh-rlhf/helpful-base/test.jsonl.gz", "hh-rlhf/helpful-rejection-sampled/test.jsonl.gz")


@dataclass(frozen=True)
class Config:
    name: str
    policy: str | None            # pi_0 (None: a tiny random Llama built in the study folder)
    held: int
    val: int
    train: int
    steps: int                    # S: optimizer steps of every arm (one epoch over all training pairs)
    max_length: int
    max_prompt_length: int
    settings: tuple[str, ...]     # pi_1 settings tried, in order ("lr=1e-5,epochs=1")
    batch: int = 8
    micro_batch: int = 4
    beta: float = 0.1
    flip: float = 0.3
    top: float = 0.7
    lam: float = 0.3
    folds: int = 2
    gate: float = 0.05
    past_gate: bool = False
    note: str = ""
    sources: tuple[str, ...] = SOURCES  # HH-RLHF test files under the shared data folder


CONFIGS = {
    "cpu-decisive": Config("cpu-decisive", "smollm2-135m", 800, 256, 1024, 128, 512, 384, ("lr=1e-5,epochs=1",)),
    "decisive-smoke": Config("decisive-smoke", None, 16, 16, 32, 4, 64, 48, ("lr=1e-4,epochs=1",), past_gate=True,
                             note="tiny random Llama: checks the plumbing, not the method",
                             sources=SOURCES[:1]),  # one file: half the converting and tokenizing
}


# ------------------------------------------------------------------------------------------------ plumbing


class Study:
    """The study folder: its config, results.json (loaded once, saved after every step) and the step runner."""

    def __init__(self, cfg: Config, out: Path):
        self.cfg, self.out = cfg, out
        out.mkdir(parents=True, exist_ok=True)
        (out / "cache").mkdir(exist_ok=True)
        path = out / "results.json"
        self.results = json.loads(path.read_text()) if path.exists() else {}
        self.results.setdefault("times", {})
        self.policy = cfg.policy or study.tiny_policy(out)

    def save(self) -> None:
        self.results["config"] = {k: v for k, v in vars(self.cfg).items()}
        text = json.dumps(self.results, indent=1)  # insertion order, which a resumed run reads back
        write_atomic(self.out / "results.json", text)
        write_atomic(self.out / "tables.md", tables(json.loads(text), self.out))  # as a rerun would see it

    def step(self, path: Path, make: Callable[[Path], None]) -> Path:
        """Make `path` unless it exists: `make(tmp)` writes a temporary name (a model folder: the final name,
        which `sera train` fills through its own .partial folder), renamed here; the wall time is recorded."""
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path if path.suffix != ".parquet" else path.with_name(path.stem + ".partial.parquet")
        t0 = time.perf_counter()
        make(tmp)
        if tmp != path:
            tmp.rename(path)
        self.results["times"][str(path.relative_to(self.out))] = round(time.perf_counter() - t0, 1)
        self.save()
        return path

    # sera commands ------------------------------------------------------------------------------------
    def score(self, path: Path, data: Path, policy: str, ref: str, prev: Path | None = None) -> Path:
        c = self.cfg
        extra = ["--prev", str(prev), "--ensemble-lambda", str(c.lam)] if prev else []
        if policy == ref:  # one model at a time: the second pass then reads the first one's cached log-probs
            extra.append("--low-memory")
        return self.step(path, lambda tmp: sera(
            "score", str(data), "--policy", policy, "--ref", ref, "--beta", str(c.beta), "--dtype", "float32",
            "--max-length", str(c.max_length), "--max-prompt-length", str(c.max_prompt_length),
            "--cache", str(self.out / "cache"), "--resume", "-q", *extra, "-o", str(tmp)))

    def with_ref(self, path: Path, data: Path, ref: str) -> Path:
        """`data` with `ref`'s log-probs (`sera score` with policy = ref = `ref`): training reuses them, and through
        the study's cache so do later scorings (and this one reuses earlier ones). Subsets of this file (rows
        taken by id) are what the arms train on."""
        return self.score(path, data, ref, ref)

    def train(self, model: Path, ready: Path, policy: str, ref: str, lr: float, seed: int,
              epochs: int = 1, max_steps: int | None = None) -> Path:
        """DPO from `policy` with reference `ref` on `ready` (pairs that carry `ref`'s log-probs)."""
        if model.exists():
            return model
        c = self.cfg
        steps = ["--max-steps", str(max_steps)] if max_steps else []
        partial = model.with_name(model.name + ".partial")  # where `sera train` works and checkpoints
        resume = ["--resume"] if any((partial / n).exists() for n in ("checkpoint", "checkpoint.old",
                                                                      "checkpoint.tmp/state.json")) else []
        return self.step(model, lambda tmp: sera(
            "train", str(ready), "--policy", policy, "--ref", ref, "--loss", "dpo", "--beta", str(c.beta),
            "--lr", f"{lr:g}", "--batch-size", str(c.batch), "--micro-batch", str(c.micro_batch),
            "--epochs", str(epochs), *steps, "--seed", str(seed), "--max-length", str(c.max_length),
            "--max-prompt-length", str(c.max_prompt_length), "--dtype", "float32", "--save-steps", "16",
            *resume, "-q", "-o", str(tmp)))

    def subset(self, path: Path, src: Path, ids) -> Path:
        """The rows of `src` whose id is in `ids`, in `src`'s order."""
        def make(tmp: Path) -> None:
            table = pq.read_table(src)
            pq.write_table(table.filter(pc.is_in(table.column("id"), pa.array(sorted(set(ids))))), tmp)
        return self.step(path, make)


IN_PROCESS = [False]  # the smoke scale runs each command in this process (its command line, parsed the same way)


def sera(*args: str) -> None:
    """One `sera` command in a subprocess (this checkout's sera_cli), or in this process for the smoke scale
    (the same command line through the same Typer app, without a Python and torch start per command); the exact
    command is logged."""
    study.log("$ sera " + " ".join(shlex.quote(a) for a in args))
    if not IN_PROCESS[0]:
        subprocess.run([sys.executable, "-m", "sera_cli", *args], check=True)
        return
    from sera_cli.commands.app import app

    code = app(list(args), standalone_mode=False)
    if code:
        raise subprocess.CalledProcessError(code, ["sera", *args])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.rename(path)


def read(path: Path, *cols: str) -> dict:
    return pq.read_table(path, columns=list(cols) or None).to_pydict()


def parse_setting(text: str) -> dict:
    """"lr=1e-5,epochs=1" -> {"lr": 1e-5, "epochs": 1}."""
    out = {"lr": None, "epochs": 1}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value) if key.strip() == "epochs" else float(value)
    if out["lr"] is None:
        raise SystemExit(f"--settings {text!r}: no lr=")
    return out


def tag(setting: str) -> str:
    s = parse_setting(setting)
    return f"lr{s['lr']:g}-ep{s['epochs']}"


# ------------------------------------------------------------------------------------------------ measuring


def outcomes(irm) -> np.ndarray:
    """1 where the implicit reward prefers the chosen response, 0.5 on a tie, else 0."""
    irm = np.asarray(irm, float)
    return np.where(irm > 0, 1.0, np.where(irm == 0, 0.5, 0.0))


def ranks(x) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, r)
    return sums[inv] / counts[inv]


def auroc(scores, positive) -> float:
    """P(score of a positive > score of a negative), ties 0.5 (Mann-Whitney); NaN without both classes."""
    positive = np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    return float((ranks(scores)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc_ci(scores, positive, seed: int = 0, draws: int = 1000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUROC (pairs resampled)."""
    rng = np.random.default_rng(seed)
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    vals = [auroc(scores[i], positive[i]) for i in rng.integers(0, len(scores), (draws, len(scores)))]
    vals = [v for v in vals if not math.isnan(v)]
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals else (math.nan, math.nan)


def hierarchical_diff(per_seed: list[np.ndarray], seed: int = 0, draws: int = 2000) -> tuple[float, float, float]:
    """Mean paired difference over seeds and its 95% interval, resampling seeds, then pairs within each seed."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(draws):
        picked = rng.integers(0, len(per_seed), len(per_seed))
        means.append(np.mean([per_seed[s][rng.integers(0, len(per_seed[s]), len(per_seed[s]))].mean()
                              for s in picked]))
    return float(np.mean([d.mean() for d in per_seed])), float(np.percentile(means, 2.5)), float(
        np.percentile(means, 97.5))


def accuracy(path: Path) -> dict:
    """Held-out (or validation) accuracy of a scored file: mean outcome with its bootstrap CI, and the
    reward-length Spearman (IRM against chosen - rejected response tokens), as study.py computes it."""
    t = read(path, "id", "irm", "ntok_chosen", "ntok_rejected")
    o = outcomes(t["irm"])
    order = np.argsort(np.asarray(t["id"], dtype=object))
    return {"acc": float(o.mean()), "ci": list(study.bootstrap_ci(o)), "n": len(o),
            "length_rho": spearman(t["irm"], np.subtract(t["ntok_chosen"], t["ntok_rejected"], dtype=float)),
            "outcomes": o[order].tolist()}


def length_accuracy(lengths: dict) -> float:
    """Accuracy of "the longer response wins" (response token counts; ties 0.5)."""
    c, r = np.asarray(lengths["chosen"]), np.asarray(lengths["rejected"])
    return float(np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0)).mean())


def selector(scores, flipped, kept_ids, ids, seed: int) -> dict:
    """A selector's flip AUROC (low score = flipped) with its CI, and the share of the dropped pairs that are
    flips."""
    flipped = np.asarray(flipped, bool)
    dropped = ~np.isin(np.asarray(ids, dtype=object), np.asarray(sorted(kept_ids), dtype=object))
    out = {"dropped": int(dropped.sum()), "flips_in_dropped": float(flipped[dropped].mean()) if dropped.any() else None}
    if scores is not None:
        out["auroc"] = auroc(-np.asarray(scores, float), flipped)
        out["auroc_ci"] = list(auroc_ci(-np.asarray(scores, float), flipped, seed))
    return out


# ------------------------------------------------------------------------------------------------ phase 1


def tokenizer_dir(policy: str) -> str:
    """The folder of the policy's tokenizer (the one place this script imports sera_cli)."""
    from sera_cli.backends.models import resolve

    return resolve(policy).path


def token_lengths(path: Path, policy: str) -> dict[str, list[int]]:
    """Per pair: prompt tokens (chat template with the generation prompt) and the tokens of prompt + each
    response (chat template of the whole conversation), with the policy's tokenizer; responses = the difference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(policy))
    t = read(path, "prompt", "chosen", "rejected")

    def n(messages, gen: bool) -> int:
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    p = [n(m, True) for m in t["prompt"]]
    fc = [n(m + c, False) for m, c in zip(t["prompt"], t["chosen"], strict=True)]
    fr = [n(m + r, False) for m, r in zip(t["prompt"], t["rejected"], strict=True)]
    return {"prompt": p, "full_chosen": fc, "full_rejected": fr,
            "chosen": [a - b for a, b in zip(fc, p, strict=True)], "rejected": [a - b for a, b in zip(fr, p, strict=True)]}


def stats(x) -> dict:
    x = np.asarray(x, float)
    return {"median": float(np.median(x)), "p90": float(np.percentile(x, 90)), "max": float(x.max())}


def take(src: Path, rows: np.ndarray, dst: Path) -> None:
    """Rows of `src` (indices, written in sorted order) without their ids, for `sera convert` to renumber."""
    table = pq.read_table(src).take(np.sort(rows))
    pq.write_table(table.drop_columns(["id"]).replace_schema_metadata(None), dst)


def phase_data(s: Study) -> dict:
    c, d = s.cfg, s.out / "data"
    if "data" in s.results:
        return s.results["data"]
    allp = s.step(d / "all.parquet", lambda tmp: sera(
        "convert", *[str(study.SHARED / f) for f in c.sources], "--format", "conversational", "-o", str(tmp)))
    t = read(allp, "chosen", "rejected")
    ties = np.array([a == b for a, b in zip(t["chosen"], t["rejected"], strict=True)])
    lengths = token_lengths(allp, s.policy)
    longer = np.maximum(lengths["full_chosen"], lengths["full_rejected"])
    too_long = (np.asarray(lengths["prompt"]) > c.max_prompt_length) | (longer > c.max_length)
    keep = np.flatnonzero(~ties & ~too_long)
    need = c.held + c.val + c.train
    if len(keep) < need:
        raise SystemExit(f"only {len(keep)} pairs fit the length limits; {need} needed")
    order = keep[np.random.default_rng(0).permutation(len(keep))]
    parts = {"held": order[:c.held], "val": order[c.held:c.held + c.val],
             "train-clean": order[c.held + c.val:need], "gold": order[need:]}
    for name, rows in parts.items():
        raw = d / f"{name}-rows.parquet"
        s.step(raw, lambda tmp, rows=rows: take(allp, rows, tmp))
        s.step(d / f"{name}.parquet", lambda tmp, raw=raw: sera("convert", str(raw), "-o", str(tmp)))
    s.step(d / "eval.parquet", lambda tmp: pq.write_table(pa.concat_tables(
        [pq.read_table(d / "val.parquet"), pq.read_table(d / "held.parquet")]), tmp))  # both, for one scoring
    s.step(d / "train.parquet", lambda tmp: sera("convert", str(d / "train-clean.parquet"), "--flip", str(c.flip),
                                                 "--seed", "0", "-o", str(tmp)))
    flips = int(np.sum(read(d / "train.parquet", "flipped")["flipped"]))
    if flips != round(c.flip * c.train):
        raise SystemExit(f"sera convert --flip {c.flip} swapped {flips} labels, not {round(c.flip * c.train)}")
    n = len(ties)
    s.results["data"] = {
        "pairs": n, "ties": int(ties.sum()), "excluded": int((too_long & ~ties).sum()),
        "excluded_share": float((too_long & ~ties).sum() / (~ties).sum()), "kept": len(keep),
        "truncated_share_after": 0.0, "sizes": {k: len(v) for k, v in parts.items()}, "flipped": flips,
        "tokens_all": {k: stats(np.asarray(lengths[k])[~ties]) for k in ("prompt", "chosen", "rejected")},
        "tokens_kept": {k: stats(np.asarray(lengths[k])[keep]) for k in ("prompt", "chosen", "rejected")}}
    s.save()
    return s.results["data"]


# ------------------------------------------------------------------------------------------------ phase 2


def phase_baseline(s: Study) -> dict:
    if "baseline" not in s.results:
        acc = {}
        for split in ("val", "held"):
            longer = length_accuracy(token_lengths(s.out / "data" / f"{split}.parquet", s.policy))
            acc[split] = {"longer": longer, "shorter": 1 - longer}
        direction = "longer" if acc["val"]["longer"] >= acc["val"]["shorter"] else "shorter"
        s.results["baseline"] = {**acc, "direction": direction, "heldout": acc["held"][direction]}
        s.save()
    return s.results["baseline"]


# ------------------------------------------------------------------------------------------------ phase 3


def phase_pi1(s: Study, seed: int) -> dict:
    """Train and score every pi_1 setting; choose on validation; apply the gate on held-out."""
    c, d, root = s.cfg, s.out / "data", s.out / f"seed-{seed}"
    res = s.results.setdefault("seeds", {}).setdefault(str(seed), {})
    tried = res.setdefault("pi1", {})
    ready = s.with_ref(root / "train-ref-pi0.parquet", d / "train.parquet", s.policy)
    for setting in c.settings:
        p, key = parse_setting(setting), tag(setting)
        wd = root / f"pi1-{key}"
        model = s.train(wd / "model", ready, s.policy, s.policy, p["lr"], seed, p["epochs"])
        both = s.score(wd / "val+held.parquet", d / "eval.parquet", str(model), s.policy)  # one call
        val = accuracy(s.subset(wd / "val.parquet", both, ids_of(d / "val.parquet")))
        held = accuracy(s.subset(wd / "held.parquet", both, ids_of(d / "held.parquet")))
        tried[key] = {"setting": setting, "val": val, "held": held, "steps": train_steps(model),
                      "passes": held["acc"] >= s.results["baseline"]["heldout"] + c.gate}
    best = max(tried, key=lambda k: tried[k]["val"]["acc"])  # validation only, never held-out
    res["chosen"] = best
    res["gate"] = {"passed": tried[best]["passes"], "heldout": tried[best]["held"]["acc"],
                   "needed": s.results["baseline"]["heldout"] + c.gate}
    s.save()
    return res


def train_steps(model: Path) -> int:
    lines = (model / "metrics.jsonl").read_text().splitlines()
    return sum(1 for x in lines if x.strip() and "loss" in json.loads(x) and json.loads(x).get("event", "step") == "step")


# ------------------------------------------------------------------------------------------------ phase 4, 5


def schedule(c: Config, pairs: int) -> tuple[int, int]:
    """(epochs, max steps) for S steps over `pairs`: enough epochs (reshuffled each) to reach S."""
    return max(1, math.ceil(c.steps * c.batch / pairs)), c.steps


def ids_of(path: Path) -> list[str]:
    return read(path, "id")["id"]


def random_ids(ids: list[str], count: int, seed: int) -> list[str]:
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:count]]


def run_arm(s: Study, wd: Path, data: Path, policy: str, lr: float, seed: int) -> Path:
    """Train one arm's policy from `policy` (ref `policy`) for S steps on `data` (pairs with `policy`'s
    log-probs); score it on held-out."""
    epochs, steps = schedule(s.cfg, len(ids_of(data)))
    model = s.train(wd / "model", data, policy, policy, lr, seed, epochs, steps)
    s.score(wd / "held.parquet", s.out / "data" / "held.parquet", str(model), s.policy)
    return model


def phase_iter2(s: Study, seed: int, pi1: Path, lr: float) -> dict[str, Path]:
    c, d, root = s.cfg, s.out / "data", s.out / f"seed-{seed}" / "iter-2"
    train = d / "train.parquet"
    ids = ids_of(train)
    insample = s.score(root / "train-irm.parquet", train, str(pi1), s.policy)  # (pi_1, pi_0)
    top = s.step(root / "irm-top70-selected.parquet", lambda tmp: sera(
        "select", str(insample), "--top", str(c.top), "-o", str(tmp)))
    n70 = len(ids_of(top))
    # cross-fitting: a fold model from pi_0 on each half scores the other half
    halves = np.array_split(np.random.default_rng([seed, 1]).permutation(len(ids)), c.folds)
    fold_scores = []
    ref0 = s.out / f"seed-{seed}" / "train-ref-pi0.parquet"
    for k, rows in enumerate(halves):
        half = s.subset(root / f"xfit-{k}" / "train.parquet", ref0, [ids[i] for i in rows])
        other = s.subset(root / f"xfit-{k}" / "other.parquet", train, [ids[i] for i in np.setdiff1d(
            np.arange(len(ids)), rows)])
        fold = s.train(root / f"xfit-{k}" / "model", half, s.policy, s.policy, lr, seed)
        fold_scores.append(s.score(root / f"xfit-{k}" / "scored.parquet", other, str(fold), s.policy))
    xfit = s.step(root / "xfit-irm.parquet", lambda tmp: pq.write_table(
        pa.concat_tables([pq.read_table(p) for p in fold_scores], promote_options="default"), tmp))
    xtop = s.step(root / "xfit-top70-selected.parquet", lambda tmp: sera(
        "select", str(xfit), "--top", str(c.top), "-o", str(tmp)))
    flipped = dict(zip(ids, read(train, "flipped")["flipped"], strict=True))
    chosen = {"iterative-dpo": ids, "irm-top70": ids_of(top), "random-70": random_ids(ids, n70, 1000 + seed),
              "xfit-top70": ids_of(xtop), "oracle": [i for i in ids if not flipped[i]]}
    ready = s.with_ref(root / "train-ref-pi1.parquet", train, str(pi1))  # cached by the (pi_1, pi_0) scoring
    models = {}
    for arm in ARMS2:
        data = s.subset(root / arm / "data.parquet", ready, chosen[arm])
        models[arm] = run_arm(s, root / arm, data, str(pi1), lr, seed)
    return models


def phase_iter3(s: Study, seed: int, models2: dict[str, Path], lr: float) -> dict[str, Path]:
    c, d = s.cfg, s.out / "data"
    root2, root = s.out / f"seed-{seed}" / "iter-2", s.out / f"seed-{seed}" / "iter-3"
    train = d / "train.parquet"
    ids = ids_of(train)
    prev = {"irm-top70": root2 / "train-irm.parquet", "xfit-top70": root2 / "xfit-irm.parquet"}
    models = {}
    for arm in ARMS3:
        pi2 = str(models2[arm])
        if arm in prev:  # (pi_2, pi_1), ensembled with the arm's iteration-2 IRM
            scored = s.score(root / f"{arm}-irm.parquet", train, pi2, str(s.out / f"seed-{seed}" / pi1_dir(s, seed)
                                                                          / "model"), prev[arm])
            sel = s.step(root / f"{arm}-selected.parquet", lambda tmp, scored=scored: sera(
                "select", str(scored), "--top", str(c.top), "-o", str(tmp)))
            keep = ids_of(sel)
        else:
            keep = random_ids(ids, len(ids_of(root2 / "random-70" / "data.parquet")), 2000 + seed)
        ready = s.with_ref(root / f"{arm}-train-ref-pi2.parquet", train, pi2)
        data = s.subset(root / arm / "data.parquet", ready, keep)
        models[arm] = run_arm(s, root / arm, data, pi2, lr, seed)
    return models


def pi1_dir(s: Study, seed: int) -> str:
    return f"pi1-{s.results['seeds'][str(seed)]['chosen']}"


# ------------------------------------------------------------------------------------------------ phase 6


def phase_metrics(s: Study, seed: int) -> dict:
    """Every policy's held-out numbers and paired differences against random-70; the selectors' statistics."""
    root, train = s.out / f"seed-{seed}", s.out / "data" / "train.parquet"
    res = s.results["seeds"][str(seed)]
    t = read(train, "id", "flipped")
    ids, flipped = t["id"], t["flipped"]
    arms = {}
    for it, names in ((2, ARMS2), (3, ARMS3)):
        for arm in names:
            wd = root / f"iter-{it}" / arm
            if (wd / "held.parquet").exists():
                arms[f"{arm}@{it}"] = {"iter": it, "arm": arm, "pairs": len(ids_of(wd / "data.parquet")),
                                       "steps": train_steps(wd / "model"), **accuracy(wd / "held.parquet")}
    for row in arms.values():
        base = arms.get(f"random-70@{row['iter']}")
        if base and row["arm"] != "random-70":
            row["vs_random"] = list(study.paired_diff(np.asarray(row["outcomes"]), np.asarray(base["outcomes"])))
    res["arms"] = arms

    def scores_of(path: Path) -> np.ndarray:
        sc = dict(zip(*read(path, "id", "irm").values(), strict=True))
        return np.array([sc[i] for i in ids], float)

    sel = {}
    r2, r3 = root / "iter-2", root / "iter-3"
    specs = [("IRM in-sample (pi_1, pi_0)", 2, r2 / "train-irm.parquet", r2 / "irm-top70" / "data.parquet"),
             ("IRM cross-fitted K=2", 2, r2 / "xfit-irm.parquet", r2 / "xfit-top70" / "data.parquet"),
             ("random", 2, None, r2 / "random-70" / "data.parquet"),
             ("oracle", 2, None, r2 / "oracle" / "data.parquet"),
             ("IRM ensembled (pi_2, pi_1), irm-top70", 3, r3 / "irm-top70-irm.parquet", r3 / "irm-top70" / "data.parquet"),
             ("IRM ensembled (pi_2, pi_1), xfit-top70", 3, r3 / "xfit-top70-irm.parquet",
              r3 / "xfit-top70" / "data.parquet"),
             ("random", 3, None, r3 / "random-70" / "data.parquet")]
    for name, it, scored, data in specs:
        if data.exists() and (scored is None or scored.exists()):
            scores = scores_of(scored) if scored else None
            if name == "random":  # the random arm's score: kept pairs above dropped ones, in a random order
                kept = set(ids_of(data))
                scores = np.array([(i in kept) + 0.5 * u for i, u in
                                   zip(ids, np.random.default_rng(seed).random(len(ids)), strict=True)])
            sel[f"{name}@{it}"] = {"name": name, "iter": it, **selector(scores, flipped, ids_of(data), ids, seed)}
    res["selectors"] = sel
    s.save()
    return res


# ------------------------------------------------------------------------------------------------ tables


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))]
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "?"
    return f"CPU {model}; flags {' '.join(keep) or '-'}; torch {torch}"


def pct(v, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:+.1f}" if signed else f"{v:.1%}"


def ci_cell(acc: float, ci) -> str:
    return f"{pct(acc)} [{pct(ci[0])}, {pct(ci[1])}]"


def tables(r: dict, out: Path) -> str:
    """OUT/tables.md: data summary, gate, settings tried, arms and selectors, from results.json."""
    c = r.get("config", {})
    lines = [f"# Decisive SeRA study, scale {c.get('name')}", "", f"Machine: {r.get('machine', '-')}.", ""]
    if c.get("note"):
        lines += [f"_{c['note']}_", ""]
    lines += [f"Settings: policy {c.get('policy') or 'tiny random Llama'} (pi_0), DPO, beta {c.get('beta')}, batch "
              f"{c.get('batch')} (micro-batch {c.get('micro_batch')}), max length {c.get('max_length')} (prompt "
              f"{c.get('max_prompt_length')}), float32 for training and scoring, S = {c.get('steps')} steps per "
              f"arm, flips {c.get('flip')}, top {c.get('top')}, lambda {c.get('lam')}, cross-fit K = "
              f"{c.get('folds')}; pi_1 settings tried: {', '.join(c.get('settings', []))}.", ""]
    d = r.get("data")
    if d:
        lines += ["## Data", "", f"{d['pairs']} pairs converted; {d['ties']} ties dropped; {d['excluded']} excluded by "
                  f"length ({d['excluded_share']:.1%} of the untied pairs; the truncated share of the rest is then "
                  f"0); {d['kept']} kept. Split: " + ", ".join(f"{k} {v}" for k, v in d["sizes"].items()) +
                  f"; {d['flipped']} training labels flipped.", "",
                  "| tokens | median (all) | p90 (all) | max (all) | median (kept) | p90 (kept) | max (kept) |",
                  "|---|---|---|---|---|---|---|"]
        for k in ("prompt", "chosen", "rejected"):
            a, b = d["tokens_all"][k], d["tokens_kept"][k]
            lines.append(f"| {k} | {a['median']:.0f} | {a['p90']:.0f} | {a['max']:.0f} | {b['median']:.0f} | "
                         f"{b['p90']:.0f} | {b['max']:.0f} |")
        lines.append("")
    b = r.get("baseline")
    if b:
        lines += ["## Length-only baseline (token counts; ties 0.5)", "", "| rule | validation | held-out |",
                  "|---|---|---|", f"| longer wins | {pct(b['val']['longer'])} | {pct(b['held']['longer'])} |",
                  f"| shorter wins | {pct(b['val']['shorter'])} | {pct(b['held']['shorter'])} |", "",
                  f"Baseline (direction chosen on validation: {b['direction']}): {pct(b['heldout'])} held-out.", ""]
    seeds = r.get("seeds", {})
    for seed, res in sorted(seeds.items()):
        lines += [f"## Seed {seed}", "", "### pi_1 settings tried (chosen on validation)", "",
                  "| setting | steps | validation acc [95% CI] | held-out acc [95% CI] | passes gate |",
                  "|---|---|---|---|---|"]
        for key, t in res.get("pi1", {}).items():
            mark = " (chosen)" if key == res.get("chosen") else ""
            lines.append(f"| {t['setting']}{mark} | {t['steps']} | {ci_cell(t['val']['acc'], t['val']['ci'])} | "
                         f"{ci_cell(t['held']['acc'], t['held']['ci'])} | {'yes' if t['passes'] else 'no'} |")
        g = res.get("gate")
        if g:
            verdict = "PASSED" if g["passed"] else "FAILED"
            lines += ["", f"Gate {verdict}: pi_1 held-out {pct(g['heldout'])}, needed >= {pct(g['needed'])} "
                      "(length baseline + 5 points)."]
            if not g["passed"]:
                lines.append("The study stops here (phases 4-6 not run)." if not res.get("past_gate") else
                             "**Phases 4-6 ran past the failed gate (--past-gate): read them as plumbing only.**")
            lines.append("")
        if res.get("arms"):
            lines += ["### Arms: held-out accuracy (implicit reward against pi_0)", "",
                      "| arm | iter | pairs | steps | held-out acc [95% CI] | minus random-70, same iter [95% "
                      "paired CI] | reward-length Spearman |", "|---|---|---|---|---|---|---|"]
            order = {arm: i for i, arm in enumerate(ARMS2)}  # a fixed order, however the runs were resumed
            for a in sorted(res["arms"].values(), key=lambda a: (a["iter"], order.get(a["arm"], 99))):
                v = a.get("vs_random")
                diff = f"{pct(v[0], True)} [{pct(v[1], True)}, {pct(v[2], True)}] points" if v else "-"
                rho = a.get("length_rho")
                lines.append(f"| {a['arm']} | {a['iter']} | {a['pairs']} | {a['steps']} | {ci_cell(a['acc'], a['ci'])} "
                             f"| {diff} | {'-' if rho is None or math.isnan(rho) else f'{rho:+.3f}'} |")
            lines.append("")
        if res.get("selectors"):
            lines += ["### Selectors on the training pairs", "",
                      "| selector | iter | flip AUROC [95% CI] | dropped | flips among the dropped |",
                      "|---|---|---|---|---|"]
            for sname in sorted(res["selectors"].values(), key=lambda x: (x["iter"], x["name"])):
                au = sname.get("auroc")
                cell = "-" if au is None else f"{au:.3f} [{sname['auroc_ci'][0]:.3f}, {sname['auroc_ci'][1]:.3f}]"
                lines.append(f"| {sname['name']} | {sname['iter']} | {cell} | {sname['dropped']} | "
                             f"{pct(sname['flips_in_dropped'])} |")
            lines.append("")
    if r.get("hierarchical"):
        lines += ["## Over seeds: paired difference against random-70 (hierarchical bootstrap: seeds, then pairs)",
                  "", "| arm | iter | seeds | mean difference [95% CI] |", "|---|---|---|---|"]
        for key, h in r["hierarchical"].items():
            lines.append(f"| {key.split('@')[0]} | {key.split('@')[1]} | {h['seeds']} | {pct(h['diff'][0], True)} "
                         f"[{pct(h['diff'][1], True)}, {pct(h['diff'][2], True)}] points |")
        lines.append("")
    times = r.get("times", {})
    if times:
        lines += ["## Wall time of every step (s)", "", "| output | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:,.1f} |" for k, v in sorted(times.items())]
        lines.append("")
    lines += ["Accuracy: share of held-out pairs whose implicit-reward margin (against pi_0) is > 0 (0 counts "
              "0.5). Flip AUROC: how well a low score ranks the flipped pairs (0.5 = chance). Random keeps "
              "flips among the dropped at about the flip rate; the oracle drops only flips."]
    return "\n".join(lines) + "\n"


def hierarchical(s: Study) -> None:
    seeds = [res for res in s.results.get("seeds", {}).values() if res.get("arms")]
    if len(seeds) < 2:
        s.results.pop("hierarchical", None)
        return
    out = {}
    for key in seeds[0]["arms"]:
        arm, it = key.split("@")
        if arm == "random-70":
            continue
        diffs = [np.asarray(r["arms"][key]["outcomes"]) - np.asarray(r["arms"][f"random-70@{it}"]["outcomes"])
                 for r in seeds if key in r["arms"] and f"random-70@{it}" in r["arms"]]
        if len(diffs) > 1:
            out[key] = {"seeds": len(diffs), "diff": list(hierarchical_diff(diffs))}
    s.results["hierarchical"] = out


# ------------------------------------------------------------------------------------------------ main


def run(cfg: Config, out: Path, seeds: int = 1, tables_only: bool = False) -> dict:
    IN_PROCESS[0] = cfg.policy is None  # the smoke scale (a tiny model): in process, from main or from a test
    s = Study(cfg, out)
    s.results["machine"] = machine()
    if tables_only:
        s.save()
        return s.results
    phase_data(s)
    phase_baseline(s)
    for seed in range(seeds):
        res = phase_pi1(s, seed)
        passed = res["gate"]["passed"]
        res["past_gate"] = not passed and cfg.past_gate
        if not passed and not cfg.past_gate:
            study.log(f"seed {seed}: the gate failed ({res['gate']}); stopping after phase 3")
            s.save()
            continue
        setting = parse_setting(next(v["setting"] for k, v in res["pi1"].items() if k == res["chosen"]))
        pi1 = s.out / f"seed-{seed}" / pi1_dir(s, seed) / "model"
        models2 = phase_iter2(s, seed, pi1, setting["lr"])
        phase_iter3(s, seed, models2, setting["lr"])
        phase_metrics(s, seed)
    hierarchical(s)
    s.save()
    return s.results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    ap.add_argument("--settings", nargs="+", help="pi_1 settings tried in order, e.g. lr=1e-5,epochs=1 "
                    "lr=3e-5,epochs=1 (the one chosen is the best on validation)")
    ap.add_argument("--seeds", type=int, default=1, help="repeat phases 3-6 with seeds 0..N-1 (OUT/seed-K)")
    ap.add_argument("--past-gate", action="store_true", help="run phases 4-6 even if the gate fails (marked)")
    ap.add_argument("--tables", action="store_true", help="only re-render the tables of what has run")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.scale]
    cfg = replace(cfg, settings=tuple(args.settings or cfg.settings), past_gate=cfg.past_gate or args.past_gate)
    for setting in cfg.settings:
        parse_setting(setting)
    t0 = time.perf_counter()
    run(cfg, Path(args.out), args.seeds, args.tables)
    study.log(f"decisive {cfg.name} finished in {time.perf_counter() - t0:,.0f} s (this invocation)")
    print((Path(args.out) / "tables.md").read_text())


if __name__ == "__main__":
    main()

"""Study: does SeRA beat DPO and iterative DPO on real preference data? One command per scale, resumable.

    python tests/bench/study.py --scale cpu --out study/          # 2 CPU cores (README: wall time)
    python tests/bench/study.py --scale cpu-512 --out study-512/  # the same at 4x the rows (~2 h on 2 cores)
    python tests/bench/study.py --scale smoke --out /tmp/smoke    # tiny random model, a few rows (CI)
    python tests/bench/study.py --scale gpu --out study-gpu/      # one large GPU, vLLM, bfloat16
    python tests/bench/study.py --scale gpu --dry-run --out /tmp/gpu-dry   # the GPU plumbing on CPU
    python tests/bench/study.py --scale cpu --out study/ --tables # only print the tables of what has run
    python tests/bench/study.py --scale cpu-decisive --out decisive/     # the decisive study (tests/bench/decisive.py)
    python tests/bench/study.py --scale decisive-smoke --out dsmoke/     # its plumbing, tiny random Llama (CI)

Data: the UltraFeedback sample (`../shared/data/ultrafeedback-sample`, GPT-4-labelled), a seeded sample of its
training pairs converted with `sera convert --format conversational --flip F` (so round(F * rows) labels are
swapped and marked `flipped`), and its 200 held-out pairs, never trained on. The GPU scale adds the three
HH-RLHF test splits, with a held-out share of each (`sera run --heldout`).

Methods, per data set and flip rate, all with the same policy, seeds, lengths and optimiser settings:

    dpo             one DPO iteration on all offline rows (reference pi_0)
    iterative-dpo   DPO on all offline rows each iteration, reference = the previous policy
    sera-select     SeRA with k2 = 0: keep the top k1 of the offline rows by in-sample IRM
    sera            SeRA: selection + bootstrapped pairs (k1, k2, N, lambda)
    sera-select-xfit  sera-select with the cross-fitted IRM (`sera run --cross-fit K`)
    cdpo, rdpo      one iteration of conservative / robust DPO with eps = the flip rate (flips > 0 only)

Every method is a `sera run` workdir under OUT/<set>-flip<F>/<method>; they share one log-prob cache, and
iteration 1 (identical for every method that uses DPO) is trained once in the `dpo` workdir and copied (hard
links) into the others, whose ledgers then skip it. Each iteration's policy pi_t is scored against pi_0 on the
held-out pairs into `iter-t/heldout_scored.parquet`, so `sera report` and `sera sql` read everything back. A
rerun of the same command skips everything that is done. The tables go to OUT/tables.md; since every policy is
scored on the same held-out pairs, they include each final policy's paired difference against dpo and
iterative-dpo.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

SHARED = Path(os.environ.get("SERA_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
METHODS = ("dpo", "iterative-dpo", "sera-select", "sera", "sera-select-xfit", "cdpo", "rdpo")
ORDER = ("dpo", "iterative-dpo", "sera-select", "sera", "sera-select-xfit", "cdpo", "rdpo")  # if time runs out
ITER1_SHARED = ("iterative-dpo", "sera-select", "sera", "sera-select-xfit")  # iteration 1 = the dpo run


@dataclass(frozen=True)
class DataSet:
    name: str
    train: tuple[str, ...]           # files under the shared data folder, converted with `sera convert`
    rows: int | None                 # seeded sample of the converted training pairs (None: all)
    eval: str | None = None          # separate held-out pairs; None: `sera run --heldout`
    eval_rows: int | None = None
    heldout: float = 0.0


@dataclass(frozen=True)
class Scale:
    name: str
    sets: tuple[DataSet, ...]
    flips: tuple[float, ...]
    iterations: int
    methods: tuple[str, ...]
    run: dict                        # `sera run` settings shared by every method
    cross_fit: int = 2
    note: str = ""
    tiny: bool = False               # a tiny random Llama stands in for the policy (smoke, dry runs)
    clean_methods: tuple[str, ...] | None = None  # at flip rate 0 only these (None: all but cdpo and rdpo)


UF = "ultrafeedback-sample"
HH = tuple(f"hh-rlhf/{s}/test.jsonl.gz" for s in ("helpful-base", "helpful-online", "helpful-rejection-sampled"))

# The CPU settings were fixed on clean data before any comparison (README "Does it work?"): full
# fine-tuning, max length 256, lr 1e-5 (pi_1 ranked 59.5% of the 200 held-out pairs right, 95% interval
# 53.0-66.0%, after 16 steps on 128 clean pairs). dtype auto: training under bfloat16 autocast where the CPU does
# bfloat16 natively (AVX512_BF16 or AMX), scoring and generation in float32 on CPU. The runs reported before
# scored in bfloat16 too, whose IRM signs can agree with float32 on little more than half the pairs early on
# (README, "Precision: the IRM's noise floor").
CPU_RUN = {"policy": "smollm2-135m", "lr": 1e-5, "lora_r": 0, "batch_size": 8, "micro_batch": 4, "epochs": 1,
           "beta": 0.1, "max_length": 256, "max_prompt_length": 128, "dtype": "auto", "seed": 0,
           "k1": 0.7, "k2": 0.3, "n": 4, "ensemble_lambda": 0.3, "gen_prompts": 64, "max_new_tokens": 96,
           "engine": "hf", "batch_tokens": 2048}

CLEAN = ("dpo", "iterative-dpo", "sera-select", "sera")  # at 0% flips: no noisy-label baselines, no cross-fit

SCALES = {
    "smoke": Scale("smoke", (DataSet("uf", (f"{UF}/train_clean.jsonl",), 24, f"{UF}/eval_clean.jsonl", 12),),
                   (0.2,), 2, METHODS,
                   {**CPU_RUN, "dtype": "float32", "max_length": 64, "max_prompt_length": 32, "batch_size": 4,
                    "micro_batch": 4, "lr": 1e-4, "gen_prompts": 4, "max_new_tokens": 8, "batch_tokens": 1024},
                   note="tiny random Llama: checks the plumbing, not the method", tiny=True),
    # Every method at 20% flips, then the clean-data learning check (dpo at 0% flips).
    "cpu": Scale("cpu", (DataSet("uf", (f"{UF}/train_clean.jsonl",), 128, f"{UF}/eval_clean.jsonl", None),),
                 (0.2, 0.0), 2, METHODS, CPU_RUN, clean_methods=CLEAN),
    # The same study on HH-RLHF helpful-base (no GPT-4 scores there): 128 training pairs and 200 held-out
    # pairs drawn from one seeded order of the test split, so the two never share a row.
    "cpu-hh": Scale("cpu-hh", (DataSet("hh", (HH[0],), 128, HH[0], 200),), (0.2, 0.0), 2, METHODS, CPU_RUN,
                    clean_methods=CLEAN),
    # The cpu study at 4x the rows (after the training and generation speed-ups), 20% flips: 512 pairs, 64 steps
    # per iteration, generation for half the prompts as at 128 rows. Its iteration 1 is irm_sweep.py's 512-row,
    # lr 1e-5 cell (the same settings, data and seed).
    "cpu-512": Scale("cpu-512", (DataSet("uf", (f"{UF}/train_clean.jsonl",), 512, f"{UF}/eval_clean.jsonl", None),),
                     (0.2,), 2, METHODS, {**CPU_RUN, "gen_prompts": 256}, clean_methods=CLEAN),
    # Not measured yet (no GPU so far): sized by estimate for ~10 min of one H200; --rows shrinks it.
    "gpu": Scale("gpu", (DataSet("uf", (f"{UF}/train_clean.jsonl",), None, f"{UF}/eval_clean.jsonl", None),
                         DataSet("hh", HH, 3000, None, None, heldout=0.05)),
                 (0.2,), 3, METHODS,
                 {**CPU_RUN, "dtype": "bfloat16", "engine": "vllm", "device": "cuda", "max_length": 1024,
                  "max_prompt_length": 512, "batch_size": 32, "micro_batch": 8, "lr": 5e-6, "gen_prompts": None,
                  "max_new_tokens": 512, "batch_tokens": 16384}),
}


def dry(scale: Scale) -> Scale:
    """The GPU scale's plumbing on CPU: every data set, method and iteration, a tiny model and a few rows."""
    sets = tuple(replace(s, rows=16, eval_rows=8 if s.eval else None, heldout=0.25 if s.heldout else 0.0)
                 for s in scale.sets)
    run = {**scale.run, "dtype": "float32", "engine": "hf", "device": "cpu", "max_length": 64,
           "max_prompt_length": 32, "batch_size": 4, "micro_batch": 4, "gen_prompts": 4, "max_new_tokens": 8,
           "batch_tokens": 1024}
    return replace(scale, name=f"{scale.name}-dry-run", sets=sets, run=run, tiny=True,
                   note="dry run of the GPU scale: tiny random Llama, CPU, float32, hf engine")


# --------------------------------------------------------------------------------------------------- running


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sera(*args: str) -> None:
    """Run one light `sera` command (no torch) in a subprocess; the exact command is logged."""
    log("$ sera " + " ".join(shlex.quote(a) for a in args))
    subprocess.run([sys.executable, "-m", "sera_cli", *args], check=True)


def _show(stage, event: str, record) -> None:
    if event == "start":
        log(f"  {stage.key}: {stage.title}")
    elif event == "ran":
        log(f"  {stage.key}: {record['seconds']:,.0f} s {record.get('summary') or ''}")


def sera_run(data: Path, settings: dict) -> None:
    """`sera run DATA --no-report <settings>`, in this process (one torch import for the whole study)."""
    from sera_cli.stages.run.api import run
    from sera_cli.stages.run.config import build

    log("$ sera run " + " ".join(shlex.quote(a) for a in [str(data), "--no-report", *flags(settings)]))
    run(build(None, {**settings, "data": (str(data),)}), on_stage=_show)


def tiny_policy(out: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (as tests/conftest.py makes), built once."""
    path = out / "tiny-policy"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from sera_cli.backends.models import resolve

        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                             initializer_range=0.2)
        torch.manual_seed(1)
        tmp = out / "tiny-policy.partial"
        LlamaForCausalLM(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(resolve("smollm2-135m").path).save_pretrained(tmp)
        tmp.rename(path)
    return str(path)


def sample(src: Path, rows: int | None, seed: int, out: Path, skip: int = 0) -> None:
    """A seeded sample of `rows` converted pairs, without their ids (convert gives them new ones).

    `skip` leaves out the first `skip` rows of the same seeded order: the held-out pairs of a data set whose
    training and held-out pairs come from one file are then disjoint from its training sample."""
    if out.exists():
        return
    table = pq.read_table(src)
    if skip or (rows is not None and rows < table.num_rows):
        order = np.random.default_rng(seed).permutation(table.num_rows)[skip:]
        table = table.take(np.sort(order[:rows] if rows is not None else order))
    tmp = out.with_suffix(".partial")
    pq.write_table(table.drop_columns(["id"]).replace_schema_metadata(None), tmp)
    tmp.rename(out)


def prepare(scale: Scale, ds: DataSet, flip: float, data: Path, seed: int) -> tuple[Path, Path | None]:
    """The training pairs (sampled, with `flip` of the labels swapped) and the held-out pairs of a data set."""
    data.mkdir(parents=True, exist_ok=True)
    full = data / f"{ds.name}-all.parquet"
    if not full.exists():
        sera("convert", *[str(SHARED / f) for f in ds.train], "--format", "conversational", "-o", str(full))
    tag = f"{ds.name}-{ds.rows or 'all'}"
    base = data / f"{tag}-sample.parquet"
    sample(full, ds.rows, seed, base)
    train = data / f"{tag}-flip{round(flip * 100)}.parquet"
    if not train.exists():
        sera("convert", str(base), *(["--flip", str(flip), "--seed", str(seed)] if flip else []), "-o", str(train))
    if ds.eval is None:
        return train, None
    held = data / f"{ds.name}-heldout-{ds.eval_rows or 'all'}.parquet"
    if not held.exists():
        same = ds.train == (ds.eval,)  # one file: the held-out pairs follow the training sample's rows
        whole = full if same else data / f"{ds.name}-heldout-all-pairs.parquet"
        if not whole.exists():
            sera("convert", str(SHARED / ds.eval), "--format", "conversational", "-o", str(whole))
        part = data / f"{ds.name}-heldout-{ds.eval_rows or 'all'}-sample.parquet"
        sample(whole, ds.eval_rows, seed, part, skip=ds.rows if same else 0)
        sera("convert", str(part), "-o", str(held))
    return train, held


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        if v is None:
            continue
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def method_settings(scale: Scale, m: str, flip: float, ds: DataSet) -> dict:
    """The `sera run` settings of one method (on top of the scale's shared ones)."""
    s = {**scale.run, "heldout": ds.heldout, "iterations": scale.iterations}
    if m in ("dpo", "cdpo", "rdpo"):
        s.update(method="dpo", iterations=1, loss="dpo" if m == "dpo" else m)
        if m != "dpo":
            s["eps"] = flip
    elif m == "sera-select-xfit":
        s.update(method="sera-select", cross_fit=scale.cross_fit)
    else:
        s["method"] = m
    return s


def seed_from(src: Path, dst: Path) -> None:
    """Give a new workdir the dpo run's split and iteration 1 (hard links), so its ledger skips them."""
    if (dst / "run.json").exists() or not (src / "run.json").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    keep = ("split/", "iter-1/reference", "iter-1/train")
    ledger = json.loads((src / "run.json").read_text())
    stages = {k: v for k, v in ledger["stages"].items() if k.startswith(keep)}
    for rec in stages.values():
        path = src / rec["output"]
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(f, target)
    (dst / "run.json").write_text(json.dumps({"stages": stages, "log": []}, indent=2))


def link_cache(wd: Path, out: Path) -> None:
    """wd/cache -> out/cache, the study's one log-prob cache; relative, so that a relative --out works and the
    study folder can move; a dangling link (an older absolute one) is replaced."""
    link = wd / "cache"
    if link.is_symlink() and not link.exists():
        link.unlink()
    if not link.exists():
        link.symlink_to(os.path.relpath(out / "cache", wd), target_is_directory=True)


def heldout_score(wd: Path, t: int, held: Path, policy: str, run: dict, name: str = "heldout_scored") -> Path:
    """Score pairs (the held-out ones by default) with (pi_t, pi_0) into iter-t/<name>.parquet (redone if pi_t
    changed)."""
    from sera_cli.stages.run.ledger import content_hash

    out, model = wd / f"iter-{t}" / f"{name}.parquet", wd / f"iter-{t}" / "model"
    stamp = out.with_suffix(".model")
    fp = content_hash(model)
    if out.exists() and stamp.exists() and stamp.read_text() == fp:
        return out
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    sc = ScoreConfig(inputs=(str(held),), output=str(out), policy=str(model), ref=policy, beta=run["beta"],
                     dtype=run["dtype"], device=run.get("device", "auto"), max_length=run["max_length"],
                     max_prompt_length=run["max_prompt_length"], batch_tokens=run["batch_tokens"],
                     cache=str(wd / "cache"), resume=True)
    log(f"$ sera score {held} --policy {model} --ref {policy} --beta {run['beta']} --dtype {run['dtype']} "
        f"--max-length {run['max_length']} --max-prompt-length {run['max_prompt_length']} --cache {wd / 'cache'} "
        f"--resume -o {out}")
    s = score(sc)
    log(f"  {name}: {s.rows} rows, {s.computed} computed, {s.cached} cached")
    stamp.write_text(fp)
    return out


def run_study(scale: Scale, out: Path, policy: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run = dict(scale.run)
    if scale.tiny:
        run["policy"] = policy or tiny_policy(out)
    elif policy:
        run["policy"] = policy
    (out / "cache").mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"scale": scale.name, "run": run, "flips": scale.flips,
                                                "iterations": scale.iterations, "methods": scale.methods,
                                                "sets": [vars(s) for s in scale.sets]}, indent=2))
    for ds in scale.sets:
        for flip in scale.flips:
            train, held = prepare(scale, ds, flip, out / "data", run["seed"])
            group = out / f"{ds.name}-flip{round(flip * 100)}"
            methods = [m for m in ORDER if m in scale.methods and (flip > 0 or m not in ("cdpo", "rdpo"))
                       and (flip > 0 or scale.clean_methods is None or m in scale.clean_methods)]
            for m in methods:
                wd = group / m
                if m in ITER1_SHARED:
                    seed_from(group / "dpo", wd)
                wd.mkdir(parents=True, exist_ok=True)
                link_cache(wd, out)
                s = {**run, **method_settings(replace(scale, run=run), m, flip, ds)}
                t0 = time.perf_counter()
                log(f"== {group.name}/{m}")
                sera_run(train, {**s, "workdir": str(wd)})
                if held is not None:
                    t = 1
                    while (wd / f"iter-{t}" / "model").exists():
                        heldout_score(wd, t, held, run["policy"], run)
                        t += 1
                log(f"== {group.name}/{m} done in {time.perf_counter() - t0:,.0f} s")
                write_tables(scale, out)


# -------------------------------------------------------------------------------------------------- measuring


def bootstrap_ci(correct: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of a mean (of 0/1 outcomes, or of their paired differences)."""
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), (draws, len(correct)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff(a: np.ndarray, b: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float, float]:
    """Mean of a - b (0/1 outcomes of two policies on the same pairs) and its 95% paired bootstrap interval:
    the pairs are resampled together, so what both policies get right or wrong cancels."""
    d = a - b
    return (float(d.mean()), *bootstrap_ci(d, seed, draws))


def kept_share(scores: np.ndarray, flipped: np.ndarray, k1: float) -> float:
    """Share of the flipped rows among the top k1 by score (ties broken by row order)."""
    keep = np.argsort(-scores, kind="stable")[:int(np.floor(k1 * len(scores) + 1e-9))]
    return float(flipped[keep].sum() / flipped.sum())


def selector_stats(scores: np.ndarray, t: dict, k1: float) -> dict:
    """How a selection score (high = keep) agrees with the flips and with GPT-4's score margin."""
    from sera_cli.data.rankstats import auroc, spearman

    out = {}
    if "flipped" in t:
        flipped = np.asarray(t["flipped"], bool)
        if flipped.any():
            out["flip_auroc"], out["flips_kept"] = auroc(-scores, flipped), kept_share(scores, flipped, k1)
    if "score_chosen" in t:
        margin = np.asarray(t["score_chosen"], float) - np.asarray(t["score_rejected"], float)
        ok = ~np.isnan(margin)
        out["gpt4_spearman"] = spearman(scores[ok], margin[ok])
        clear = ok & (np.abs(margin) >= 2)
        if clear.any() and (margin[clear] > 0).any() and (margin[clear] < 0).any():
            out["gpt4_auroc"] = auroc(scores[clear], margin[clear] > 0)
    return out


def selection_rows(wd: Path, k1: float, seed: int) -> list[tuple[str, int, dict]]:
    """(selector, iteration, stats) for the IRM of every scoring of the offline rows in a workdir."""
    rows = []
    t = 2
    while (wd / f"iter-{t}" / "scored.parquet").exists():
        tab = pq.read_table(wd / f"iter-{t}" / "scored.parquet").to_pydict()
        rows.append((wd.name, t, selector_stats(np.asarray(tab["irm"], float), tab, k1)))
        t += 1
    return rows


def baseline_rows(wd: Path, k1: float, seed: int) -> list[tuple[str, int, dict]]:
    """The reference log-prob margin of pi_0 (no training) and random scores, on the offline rows."""
    ref = wd / "iter-1" / "reference.parquet"
    if not ref.exists():
        return []
    tab = pq.read_table(ref).to_pydict()
    margin = np.asarray(tab["logp_ref_chosen"], float) - np.asarray(tab["logp_ref_rejected"], float)
    rows = [("reference log-prob of pi_0", 1, selector_stats(margin, tab, k1))]
    rng = np.random.default_rng(seed)
    draws = [selector_stats(rng.random(len(margin)), tab, k1) for _ in range(200)]
    rows.append(("random (mean of 200)", 1, {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}))
    return rows


def policy_rows(wd: Path) -> list[dict]:
    """Per iteration: training rows, train loss and reward accuracy, held-out accuracy with its interval."""
    from sera_cli.data.rankstats import spearman

    out = []
    t = 1
    while (wd / f"iter-{t}" / "model").exists():
        it = wd / f"iter-{t}"
        row: dict = {"t": t}
        metrics = [json.loads(x) for x in (it / "model" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps = [m for m in metrics if "loss" in m and m.get("event", "step") == "step"]
        if steps:
            row["steps"], row["pairs"] = len(steps), None
            row["loss_first"], row["loss_last"] = steps[0]["loss"], float(np.mean([s["loss"] for s in steps[-3:]]))
            accs = [s[k] for s in steps for k in ("reward_accuracy", "rewards/accuracies", "accuracy") if k in s]
            row["train_acc"] = float(np.mean(accs)) if accs else None
        ledger = json.loads((wd / "run.json").read_text())
        rec = ledger["stages"].get(f"iter-{t}/train", {})
        row["pairs"] = (rec.get("summary") or {}).get("pairs")
        row["seconds"] = sum(r.get("seconds", 0) for k, r in ledger["stages"].items() if k.startswith(f"iter-{t}/"))
        h = it / "heldout_scored.parquet"
        if h.exists():
            tab = pq.read_table(h).to_pydict()
            irm = np.asarray(tab["irm"], float)
            correct = (irm > 0).astype(float)
            row["heldout"], row["ci"], row["n_heldout"] = float(correct.mean()), bootstrap_ci(correct), len(irm)
            row["correct_by_id"] = correct[np.argsort(np.asarray(tab["id"], dtype=object))]  # for paired tests
            if "score_chosen" in tab:
                margin = np.asarray(tab["score_chosen"], float) - np.asarray(tab["score_rejected"], float)
                clear = np.abs(margin) >= 2
                row["heldout_clear"] = float(((irm > 0) == (margin > 0))[clear].mean()) if clear.any() else None
            row["length_rho"] = spearman(irm, np.asarray(tab["ntok_chosen"], float) -
                                         np.asarray(tab["ntok_rejected"], float))
        out.append(row)
        t += 1
    return out


def f(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def paired_cell(final: dict[str, np.ndarray], m: str, base: str) -> str:
    """Method m's held-out accuracy minus base's, with its paired interval, in points ("-" without a base)."""
    if base == m or base not in final:
        return "-"
    d, lo, hi = paired_diff(final[m], final[base])
    return f"{d * 100:+.1f} points [{lo * 100:+.1f}, {hi * 100:+.1f}]"


def tables(scale: Scale, out: Path) -> str:
    """The study's markdown tables, from whatever the workdirs hold now."""
    meta = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    run = meta.get("run", scale.run)
    lines = [f"# SeRA study, scale {scale.name}", ""]
    if scale.note:
        lines += [f"_{scale.note}_", ""]
    lines += [f"Policy {run['policy']}; lr {run['lr']:g}, LoRA r {run['lora_r']} (0 = full fine-tuning), batch "
              f"{run['batch_size']}, {run['epochs']} epoch(s) per iteration, beta {run['beta']}, max length "
              f"{run['max_length']} (prompt {run['max_prompt_length']}), dtype {run['dtype']}; SeRA k1 {run['k1']}, "
              f"k2 {run['k2']}, N {run['n']}, lambda {run['ensemble_lambda']}, generation for "
              f"{run['gen_prompts'] or 'all'} prompts x {run['max_new_tokens']} new tokens; cross-fit K = "
              f"{scale.cross_fit}.", ""]
    for group in sorted(p for p in out.iterdir() if p.is_dir() and (p / "dpo").exists()):
        lines += [f"## {group.name}", "", "### Policy: held-out preference accuracy (implicit reward of pi_t "
                  "against pi_0, 95% bootstrap interval)", "",
                  "| method | iter | pairs trained | train loss first -> last | train reward acc | held-out acc "
                  "[95% CI] | acc, GPT-4 margin >= 2 | reward-length Spearman | stage time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        final = {}  # method -> its last scored policy's held-out outcomes, for the paired table
        for m in METHODS:
            wd = group / m
            if not (wd / "run.json").exists():
                continue
            for r in policy_rows(wd):
                if "correct_by_id" in r:
                    final[m] = r["correct_by_id"]
                ci = r.get("ci")
                acc = f"{f(r.get('heldout'), '.1%')} [{f(ci[0], '.1%')}, {f(ci[1], '.1%')}]" if ci else "-"
                lines.append(f"| {m} | {r['t']} | {f(r.get('pairs'), 'd')} | {f(r.get('loss_first'), '.3f')} -> "
                             f"{f(r.get('loss_last'), '.3f')} | {f(r.get('train_acc'), '.0%')} | {acc} | "
                             f"{f(r.get('heldout_clear'), '.1%')} | {f(r.get('length_rho'), '+.3f')} | "
                             f"{f(r.get('seconds'), ',.0f')} |")
        if len(final) > 1 and "dpo" in final:
            lines += ["", "### Paired: each final policy against one DPO iteration and iterative DPO, on the same "
                      "held-out pairs (difference in accuracy, 95% paired bootstrap interval)", "",
                      "| method | minus dpo | minus iterative-dpo |", "|---|---|---|"]
            lines += [f"| {m} | {paired_cell(final, m, 'dpo')} | {paired_cell(final, m, 'iterative-dpo')} |"
                      for m in final if m != "dpo"]
        lines += ["", "### Selection: does the score find the flipped labels and agree with GPT-4?", "",
                  "| selector | scored at iter | AUROC, flipped vs clean | flips left in top k1 | Spearman with "
                  "GPT-4 margin | AUROC, GPT-4 margin >= 2 |", "|---|---|---|---|---|---|"]
        rows = baseline_rows(group / "dpo", run["k1"], run["seed"])
        for m, name in (("sera-select", "IRM, in-sample (sera-select)"), ("sera", "IRM, in-sample (sera)"),
                        ("sera-select-xfit", f"IRM, cross-fitted K={scale.cross_fit} (sera-select-xfit)")):
            if (group / m).exists():
                rows += [(name, t, s) for _, t, s in selection_rows(group / m, run["k1"], run["seed"])]
        for name, t, s in rows:
            lines.append(f"| {name} | {t} | {f(s.get('flip_auroc'), '.3f')} | {f(s.get('flips_kept'), '.1%')} | "
                         f"{f(s.get('gpt4_spearman'), '+.3f')} | {f(s.get('gpt4_auroc'), '.3f')} |")
        lines.append("")
    lines += ["AUROC, flipped vs clean: how well a low score ranks the flipped pairs (0.5 = chance). Flips left "
              "in top k1: share of the flipped pairs a top-k1 selection keeps (random keeps k1). GPT-4 margin: "
              "score_chosen - score_rejected of the (possibly flipped) pair. The reference log-prob selector is "
              "pi_0's log pi(chosen) - log pi(rejected), no training (Curry-DPO style)."]
    return "\n".join(lines) + "\n"


def write_tables(scale: Scale, out: Path) -> str:
    text = tables(scale, out)
    tmp = out / "tables.md.partial"
    tmp.write_text(text)
    tmp.rename(out / "tables.md")
    return text


def _value(text: str):
    """A --set value as the type it reads as: int, float, none or a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text.lower() == "none" else text


def override(scale: Scale, args: argparse.Namespace) -> Scale:
    """The scale with the command line's overrides (the study folder records what ran in scale.json)."""
    run = dict(scale.run)
    for item in args.set:
        key, _, value = item.partition("=")
        run[key.replace("-", "_")] = _value(value)
    methods = scale.methods
    if args.methods:
        methods = tuple(m for m in METHODS if m in args.methods or (m == "dpo" and set(args.methods) & set(ITER1_SHARED)))
    sets = tuple(replace(s, rows=args.rows or s.rows, eval_rows=args.eval_rows or s.eval_rows) for s in scale.sets)
    clean = None if args.methods else scale.clean_methods  # methods named on the command line run at 0% too
    return replace(scale, run=run, methods=methods, sets=sets, flips=tuple(args.flips or scale.flips),
                   clean_methods=clean)


DECISIVE = ("cpu-decisive", "decisive-smoke")  # tests/bench/decisive.py (issue 35): its own phases and options


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--scale")
    if pre.parse_known_args()[0].scale in DECISIVE:
        sys.path.insert(0, str(Path(__file__).parent))
        import decisive

        decisive.main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES) + list(DECISIVE), default="cpu")
    ap.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    ap.add_argument("--dry-run", action="store_true", help="the scale's plumbing with a tiny model on CPU")
    ap.add_argument("--policy", default=None, help="pi_0 instead of the scale's (smoke: a tiny model)")
    ap.add_argument("--tables", action="store_true", help="only print the tables of what has run")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help="a subset of the methods (dpo always runs "
                    "first when a method shares its iteration 1)")
    ap.add_argument("--flips", nargs="+", type=float, help="flip rates instead of the scale's")
    ap.add_argument("--rows", type=int, help="training pairs per data set instead of the scale's")
    ap.add_argument("--eval-rows", type=int, help="held-out pairs instead of the scale's")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="`sera run` settings instead of the scale's, e.g. lr=2e-5 lora_r=16 dtype=bfloat16")
    args = ap.parse_args()
    scale = dry(SCALES[args.scale]) if args.dry_run else SCALES[args.scale]
    scale = override(scale, args)
    out = Path(args.out)
    if not args.tables:
        t0 = time.perf_counter()
        run_study(scale, out, args.policy)
        log(f"study {scale.name} finished in {time.perf_counter() - t0:,.0f} s (this invocation)")
    print(write_tables(scale, out))


if __name__ == "__main__":
    main()

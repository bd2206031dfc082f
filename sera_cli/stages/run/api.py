"""The SeRA loop (Algorithm 1) and its baselines: the schedule of stages, run one after another in a workdir.

Iteration 1 trains pi_1 from pi_0 = the SFT policy on the offline training split, reference pi_0 (no aligned
model exists yet, so every IRM would be zero). Iteration t >= 2 (methods that select or bootstrap):

    score    the offline data with (pi_{t-1}, pi_{t-2}); IRM ensembled with the previous one (lambda, Eq. 7)
    select   the top k1 by IRM
    generate N responses per prompt with pi_{t-1}
    reward   them with (pi_{t-1}, pi_{t-2}); from t = 3 also with (pi_{t-2}, pi_{t-3}), and ensembled:
             lambda * r_prev + (1 - lambda) * r_now per candidate (Eq. 7, applied to generated samples too)
    pair     max- vs min-reward response per prompt; keep the top k2 (as a fraction of the offline rows)
    mix      selected + pairs
    train    pi_t from pi_{t-1}, reference pi_{t-1}

and every iteration ends by scoring the held-out split with (pi_t, pi_0). All scoring shares one log-prob cache,
so no model scores the same rows twice; in particular the offline rows' log-probs under pi_{t-1}, computed to
select them, are the reference log-probs of training pi_t. Each stage is skipped when its output is up to date
(see `stages`).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sera_cli.data.chunk_store import partial_dirs
from sera_cli.stages.run import stage_configs
from sera_cli.stages.run.config import RunConfig
from sera_cli.stages.run.data import data_files, write_prompts, write_reference, write_split
from sera_cli.stages.run.layout import Layout
from sera_cli.stages.run.ledger import Ledger, Stage, workdir_lock
from sera_cli.stages.run.methods import Method, method
from trainers.losses import LOSSES, REWARDS


@dataclass(frozen=True)
class RunSummary:
    workdir: str
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    seconds: float

    def line(self) -> str:
        return (f"ran {len(self.ran)} stage(s), skipped {len(self.skipped)} up to date, in {self.seconds:,.0f} s "
                f"-> {self.workdir}")


def model_spec(lay: Layout, config: RunConfig, t: int) -> str:
    """pi_t: the trained model of iteration t, or the SFT policy for t = 0."""
    return config.policy if t == 0 else str(lay.model(t))


def _score_settings(config: RunConfig, **extra: Any) -> dict[str, Any]:
    return {"reward": stage_configs.reward(config), "beta": config.beta, "dtype": config.dtype,
            "max_length": config.max_length, "max_prompt_length": config.max_prompt_length, **extra}


def _score_stage(key: str, config: RunConfig, lay: Layout, data: Path, output: Path, policy: str, ref: str,
                 title: str, prev: Path | None = None, cost: bool = False) -> Stage:
    """Score `data` with (policy, ref), ensembled with `prev`; with `cost`, the record also says the process's
    peak memory after the stage (the ensemble's price, in the run's report)."""
    use_ref = REWARDS[stage_configs.reward(config)].needs_ref
    sc = stage_configs.score_config(config, lay, data=data, output=output, policy=policy, ref=ref, prev=prev)
    inputs = {"data": str(data), "policy": policy, **({"ref": ref} if use_ref else {})}
    if prev:
        inputs["prev"] = str(prev)
    settings = _score_settings(config, ensemble_lambda=config.ensemble_lambda if prev else None)

    def run() -> dict:
        s = _scored(sc)
        out = {"rows": s.rows, "computed": s.computed, "cached": s.cached, "truncated": s.truncated}
        if cost:
            out["peak_memory_mib"] = peak_memory_mib()
        return out

    return Stage(key, output, inputs, settings, run, title)


def peak_memory_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the platform does not say)."""
    try:
        import resource
        import sys
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _scored(sc):
    """`score` (which runs on the Ray cluster of --ray-address when the run has one)."""
    from sera_cli.stages.score.api import score

    return score(sc)


def _train_stage(key: str, config: RunConfig, lay: Layout, data: Path, t: int, output: Path | None = None) -> Stage:
    """Train pi_t from pi_{t-1} (reference pi_{t-1}) on `data`, into `output` (default: the iteration's model)."""
    policy, ref = model_spec(lay, config, t - 1), model_spec(lay, config, t - 1)
    needs_ref = LOSSES[config.loss].needs_ref
    output = output or lay.model(t)
    tc = stage_configs.train_config(config, key=key, data=data, output=output, policy=policy, ref=ref, t=t)
    inputs = {"data": str(data), "policy": policy, **({"ref": ref} if needs_ref else {})}
    settings = {k: v for k, v in tc.as_dict().items()
                if k not in ("inputs", "output", "policy", "ref", "progress", "overwrite", "resume", "device",
                             "ref_batch_tokens", "trust_remote_code", "report_to", "logging_dir")}

    def run() -> dict:
        from sera_cli.stages.train.api import train

        s = train(tc)
        return {"steps": s.steps, "pairs": s.pairs, "ref_source": s.ref_source, "first_loss": s.first["loss"],
                "last_loss": s.last["loss"]}

    title = f"train pi_{t} from pi_{t - 1} on {data.name}, reference pi_{t - 1} ({config.loss})"
    return Stage(key, output, inputs, settings, run, title)


def _reference_stage(config: RunConfig, lay: Layout, data: Path, t: int) -> Stage:
    """The training rows with their log-probs under pi_{t-1}, the reference of training pi_t, as the trainer's
    `logp_ref_*` columns. Scored through the cache, so rows that pi_{t-1} already scored (the offline rows it
    selected, the candidates it rewarded) cost nothing and its model is not even loaded."""
    ref = model_spec(lay, config, t - 1)
    out = lay.reference(t)
    sc = stage_configs.reference_config(config, lay, data=data, output=out, ref=ref)

    def run() -> dict:
        s = _scored(sc)
        write_reference(out)
        return {"rows": s.rows, "computed": s.computed, "cached": s.cached}

    settings = {"dtype": config.dtype, "max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    return Stage(f"iter-{t}/reference", out, {"data": str(data), "ref": ref}, settings, run,
                 f"reference log-probs of pi_{t - 1} on the training rows (from the cache where known)")


def _bootstrap_stages(config: RunConfig, lay: Layout, t: int, n_offline: int, ensemble: bool = False) -> Iterator[Stage]:
    """Generate N responses per prompt with pi_{t-1}, reward them with (pi_{t-1}, pi_{t-2}), keep the top k2.
    With `ensemble` (from t = 3), the rewards are lambda * r_prev + (1 - lambda) * r_now, r_prev under
    (pi_{t-2}, pi_{t-3}) (Eq. 7): the max/min pairing and the top k2 rank by the ensembled margin."""
    pol, ref = model_spec(lay, config, t - 1), model_spec(lay, config, t - 2)
    yield Stage(f"iter-{t}/prompts", lay.prompts(t), {"train": str(lay.train)},
                {"gen_prompts": config.gen_prompts, "seed": config.seed},
                lambda: write_prompts(lay.train, config.gen_prompts, config.seed, t, lay.prompts(t)),
                "choose the prompts to generate for")
    gc = stage_configs.generate_config(config, prompts=lay.prompts(t), output=lay.candidates(t), policy=pol, t=t)

    def generate() -> dict:
        from sera_cli.stages.generate.api import generate as here

        s = here(gc)
        return {"prompts": s.prompts, "responses": s.responses, "new_tokens": s.tokens,
                "short_prompts": s.short_prompts, "engine": s.engine}

    yield Stage(f"iter-{t}/generate", lay.candidates(t), {"prompts": str(lay.prompts(t)), "policy": pol},
                {"sampling": gc.sampling(), "engine": config.engine, "dtype": config.dtype}, generate,
                f"generate {config.n} responses per prompt with pi_{t - 1}")
    prev = None
    if ensemble and t >= 3:
        prev = lay.candidates_prev_scored(t)
        yield _score_stage(f"iter-{t}/reward-prev", config, lay, lay.candidates(t), prev, ref,
                           model_spec(lay, config, t - 3),
                           f"reward the candidates with (pi_{t - 2}, pi_{t - 3}), for the ensemble (Eq. 7)",
                           cost=True)
    yield _score_stage(f"iter-{t}/reward", config, lay, lay.candidates(t), lay.candidates_scored(t), pol, ref,
                       f"reward the candidates with (pi_{t - 1}, pi_{t - 2})"
                       + (f", ensemble with (pi_{t - 2}, pi_{t - 3}) (lambda {config.ensemble_lambda})" if prev
                          else ""), prev)
    keep = math.floor(config.k2 * n_offline + 1e-9)
    sel = stage_configs.pair_config(candidates=lay.candidates_scored(t), output=lay.pairs(t), count=keep)

    def pair() -> dict:
        from sera_cli.stages.select.api import select

        s = select(sel)
        return {"pairs_built": s.pairs.pairs if s.pairs else None, "kept": s.rows_out,
                "too_few": s.pairs.too_few if s.pairs else None}

    yield Stage(f"iter-{t}/pair", lay.pairs(t), {"candidates": str(lay.candidates_scored(t))}, {"count": keep},
                pair, f"pair max- vs min-reward responses, keep the top {keep} (k2 = {config.k2})")


def _train_data(config: RunConfig, lay: Layout, m: Method, t: int) -> Path:
    """What pi_t trains on: the reference stage's output, or (SimPO, no reference) the mixed or offline rows."""
    if LOSSES[config.loss].needs_ref:
        return lay.reference(t)
    return lay.mixed(t) if t >= 2 and m.select else lay.train


def _crossfit_stages(config: RunConfig, lay: Layout, m: Method, t: int, prev: Path | None) -> Iterator[Stage]:
    """Cross-fitted `iter-t/score` (see `crossfit`): per fold k, train a model as pi_{t-1} was trained but
    without fold k's rows, score fold k with (that model, pi_{t-2}), then put the folds back in row order."""
    from sera_cli.stages.run import crossfit

    k_all, seed = config.cross_fit, config.seed + t
    source = _train_data(config, lay, m, t - 1)
    scored = []
    for k in range(k_all):
        d = lay.xfit(t, k)
        settings = {"k": k_all, "fold": k, "seed": seed}
        train, rows, out = d / "train.parquet", d / "fold.parquet", d / "scored.parquet"
        yield Stage(f"iter-{t}/xfit-{k}/split", train, {"data": str(source)}, {**settings, "side": "out"},
                    lambda k=k, train=train: crossfit.write_fold(source, k_all, k, seed, False, train),
                    f"fold {k}: iteration {t - 1}'s training rows outside fold {k}")
        yield _train_stage(f"iter-{t}/xfit-{k}/train", config, lay, train, t - 1, output=d / "model")
        yield Stage(f"iter-{t}/xfit-{k}/fold", rows, {"data": str(lay.train)}, {**settings, "side": "in"},
                    lambda k=k, rows=rows: crossfit.write_fold(lay.train, k_all, k, seed, True, rows),
                    f"fold {k}: the offline rows in fold {k}")
        yield _score_stage(f"iter-{t}/xfit-{k}/score", config, lay, rows, out, str(d / "model"),
                           model_spec(lay, config, t - 2),
                           f"score fold {k} with (the model that did not see it, pi_{t - 2})", prev)
        scored.append(out)
    yield Stage(f"iter-{t}/score", lay.scored(t), {"data": str(lay.train)} | {f"fold{i}": str(p)
                                                                           for i, p in enumerate(scored)},
                {"cross_fit": k_all}, lambda: crossfit.combine(lay.train, scored, lay.scored(t)),
                f"cross-fitted IRM of the offline data ({k_all} folds)")


def _iteration(config: RunConfig, lay: Layout, m: Method, t: int, n_offline: int) -> Iterator[Stage]:
    """The stages of iteration t, in order."""
    data = lay.train
    if t >= 2 and m.select:
        prev = lay.scored(t - 1) if m.ensemble and t >= 3 else None
        if config.cross_fit:
            yield from _crossfit_stages(config, lay, m, t, prev)
        else:
            yield _score_stage(f"iter-{t}/score", config, lay, lay.train, lay.scored(t),
                               model_spec(lay, config, t - 1), model_spec(lay, config, t - 2),
                               f"score the offline data with (pi_{t - 1}, pi_{t - 2})"
                               + (f", ensemble with iteration {t - 1} (lambda {config.ensemble_lambda})"
                                  if prev else ""), prev)
        sel = stage_configs.select_config(config, scored=lay.scored(t), output=lay.selected(t))

        def select() -> dict:
            from sera_cli.stages.select.api import select as run

            s = run(sel)
            return {"rows_in": s.rows_in, "kept": s.rows_out, "cutoff": s.choice.cutoff}

        yield Stage(f"iter-{t}/select", lay.selected(t), {"scored": str(lay.scored(t))}, {"k1": config.k1}, select,
                    f"select the top k1 = {config.k1} by IRM")
        k2 = config.k2 if m.bootstrap else 0.0
        if m.bootstrap:
            yield from _bootstrap_stages(config, lay, t, n_offline, m.ensemble)
        mc = stage_configs.mix_config(config, selected=lay.selected(t), pairs=lay.pairs(t) if m.bootstrap else None,
                                      output=lay.mixed(t), k2=k2, n=n_offline, t=t)

        def mix() -> dict:
            from sera_cli.stages.mix import mix as run

            s = run(mc)
            return {"rows": s.rows, "offline": int(len(s.plan.offline)), "generated": int(len(s.plan.generated)),
                    "want_generated": s.want_generated, "duplicates": s.plan.duplicates}

        inputs = {"selected": str(lay.selected(t)), **({"pairs": str(lay.pairs(t))} if m.bootstrap else {})}
        yield Stage(f"iter-{t}/mix", lay.mixed(t), inputs, {"k1": config.k1, "k2": k2, "n": n_offline,
                                                            "seed": config.seed + t}, mix,
                    "mix the selected and generated pairs")
        data = lay.mixed(t)
    if LOSSES[config.loss].needs_ref:
        yield _reference_stage(config, lay, data, t)
        data = lay.reference(t)
    yield _train_stage(f"iter-{t}/train", config, lay, data, t)
    if config.heldout > 0:
        yield _score_stage(f"iter-{t}/heldout", config, lay, lay.heldout, lay.heldout_scored(t),
                           model_spec(lay, config, t), model_spec(lay, config, 0),
                           f"score the held-out split with (pi_{t}, pi_0)")
    if config.eval:  # `sera eval` of pi_t against pi_0 (sera_cli/stages/run/eval_step.py)
        from sera_cli.stages.run.eval_step import eval_stage

        yield eval_stage(config, lay, t, model_spec(lay, config, t), model_spec(lay, config, 0))


def schedule(config: RunConfig, lay: Layout) -> Iterator[Stage]:
    """Every stage of the run, in order. Built lazily: a stage's inputs exist when it is built."""
    m = method(config.method)
    data = data_files(config.data)
    split_inputs = {f"data{i}": f for i, f in enumerate(data)}
    split_settings = {"rows": config.rows, "heldout": config.heldout, "seed": config.seed}
    sides = (("train", lay.train), ("heldout", lay.heldout)) if config.heldout > 0 else (("train", lay.train),)
    for side, path in sides:
        yield Stage(f"split/{side}", path, split_inputs, split_settings,
                    lambda side=side, path=path: write_split(config.data, config.rows, config.heldout,
                                                             config.seed, side, path),
                    f"split the offline data: {side} rows")
    import pyarrow.parquet as pq

    n_offline = pq.read_metadata(lay.train).num_rows
    iterations = min(config.iterations, m.max_iterations or config.iterations)
    for t in range(1, iterations + 1):
        yield from _iteration(config, lay, m, t, n_offline)


def _clear(path: Path) -> None:
    """Remove a stale output before its stage runs again (only ever inside the workdir)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_start(config: RunConfig) -> None:
    """What can fail before the workdir is made: a file in its place, missing data files, an unknown policy."""
    from sera_cli.backends.models import resolve
    from sera_cli.data.errors import InputError
    from sera_cli.data.hub_data import is_dataset_name
    from sera_cli.data.tables import STDIO, check_folder_writable, expand, read_schema

    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(config.workdir, "is a file; --workdir names the folder the run keeps its files in")
    check_folder_writable(config.workdir, what="--workdir")  # before the model is resolved (and perhaps converted)
    for path in expand(list(data_files(config.data))):
        if is_dataset_name(path):
            continue  # a Hub dataset split, read (or refused in one line) by the split stage
        if path == STDIO or not Path(path).is_file():
            problem = ("cannot be read from standard input: a run reads its data again on resume" if path == STDIO
                       else "is a folder, not a Parquet file" if Path(path).is_dir() else "no such file")
            raise InputError(path, problem, hint="give the offline pairs as Parquet files ('sera convert' makes them)")
        read_schema(path)  # a file that is not Parquet fails here, before the run starts
    if config.logging_dir:
        from sera_cli.data.tables import inputs_of

        check_folder_writable(config.logging_dir, inputs_of(config), what="logging-dir")
    resolve(config.policy)


def run(config: RunConfig, on_stage: Callable[[Stage, str, Any], None] | None = None) -> RunSummary:
    """Run (or resume) the whole schedule in `config.workdir`.

    `on_stage(stage, event, record)` is called with event "start" (record None) before a stage runs, then with
    "ran" or "skipped" and the stage's record in run.json (its summary, seconds, hashes).
    """
    from sera_cli.data.tables import inputs_of, refuse_overwrite

    t0 = time.perf_counter()
    refuse_overwrite(config.workdir, inputs_of(config), folder=True)  # stages replace files in it
    check_start(config)
    lay = Layout(Path(config.workdir))
    lay.root.mkdir(parents=True, exist_ok=True)
    ran, skipped = [], []

    def start(s: Stage, resumable: bool) -> None:
        _clear(s.output)
        if not resumable:  # partial work of an unfinished run with other inputs (say, a retrained model)
            for stale in partial_dirs(s.output):
                _clear(stale)
        if on_stage:
            on_stage(s, "start", None)

    with workdir_lock(lay.root):
        ledger = Ledger.open(lay.root, config.as_dict())
        ledger.save()
        for stage in schedule(config, lay):
            action, _ = ledger.execute(stage, on_start=start)
            (ran if action == "ran" else skipped).append(stage.key)
            if on_stage:
                on_stage(stage, action, ledger.data["stages"][stage.key])
    return RunSummary(str(lay.root), tuple(ran), tuple(skipped), time.perf_counter() - t0)

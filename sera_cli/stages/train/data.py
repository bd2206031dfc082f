"""What `sera train` feeds the trainer: the pairs read, checked and tokenized, and the reference log-probs.

Reference log-probs come, in order of preference, from the input (columns `logp_ref_chosen` and
`logp_ref_rejected` written by `sera score`, or TRL's `ref_chosen_logps`/`ref_rejected_logps`, when their
provenance names the same model and settings as `--ref`), from one pass of the reference model before the
loop (the function `score` uses), or not at all (reference-free losses). A reference that cannot be checked
is an error, never a silent guess. The provenance is resolved for every input file and, for a derived file,
through every parent: log-probs of several references, or some of no recorded reference, are never reused
together. TRL's columns with no provenance (TRL tokenizes
and truncates its own way) are computed again with `--ref`, unless `--trust-stored-ref` says to use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sera_cli.data import lineage
from sera_cli.data.contract import check_pairs, with_ids
from sera_cli.data.errors import InputError
from sera_cli.data.hashing import digest
from sera_cli.data.tables import Inputs, read_inputs
from trainers.config import TrainConfig
from trainers.encode import Encoded

REF_COLUMNS = ("logp_ref_chosen", "logp_ref_rejected")
TRL_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the same numbers, as TRL's DPOTrainer names them
_KEYS = ("fingerprint", "chat_template", "eos", "max_length", "max_prompt_length", "dtype")  # of a log-prob identity
_HINT = "pass --recompute-ref to compute them with --ref, or drop --ref to use them as they are"


@dataclass(frozen=True)
class Pairs:
    """The validated input: its rows encoded with the policy's tokenizer (TRL conventions)."""

    inputs: Inputs
    encoded: list[Encoded]
    ids: list[str]
    parents: list[dict[str, Any]]  # one entry per input file (sera_cli.data.lineage.parents)
    trl_named: bool = False  # the reference log-probs came as TRL's columns
    pad_id: int = 0  # the policy tokenizer's pad token

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True)
class TrainModels:
    """The policy and reference of one training run, resolved once (`backends.models.resolve`) and passed down,
    so the stage reads its models' files once however many steps look at them."""

    policy: Any
    ref: Any | None

    @classmethod
    def of(cls, config: TrainConfig) -> TrainModels:
        from sera_cli.backends.models import resolve

        return cls(resolve(config.policy), resolve(config.ref) if config.ref else None)


def read_pairs(config: TrainConfig, tok, models: TrainModels | None = None) -> Pairs:
    from sera_cli.backends.logps.batched import encode_rows
    from sera_cli.backends.models import check_context

    inputs, trl_named = sera_named(read_inputs(list(config.inputs)))
    check_pairs(inputs)
    table = with_ids(inputs.table)
    cols = [table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")]
    encoded = encode_rows(tok, cols[0], list(zip(cols[1], cols[2], strict=True)), config.max_length,
                          config.max_prompt_length, inputs.locate)
    models = models or TrainModels.of(config)
    models = [m for m in (models.policy, models.ref) if m]
    check_context(models, [len(e.prompt) + max(map(len, e.responses)) for e in encoded], inputs.locate,
                  config.trust_remote_code,
                  max_ids=[max(max(e.prompt, default=0), *(max(r, default=0) for r in e.responses)) for e in encoded])
    return Pairs(inputs, encoded, table.column("id").to_pylist(), lineage.parents(inputs), trl_named,
                 tok.pad_token_id)


def sera_named(inputs: Inputs) -> tuple[Inputs, bool]:
    """The inputs with TRL's `ref_chosen_logps`/`ref_rejected_logps` read as `logp_ref_chosen`/`logp_ref_rejected`
    (when sera's columns are absent), and whether they were."""
    names = inputs.table.column_names
    if not set(TRL_REF_COLUMNS) <= set(names) or set(REF_COLUMNS) & set(names):
        return inputs, False
    rename = dict(zip(TRL_REF_COLUMNS, REF_COLUMNS, strict=True))
    return Inputs(inputs.table.rename_columns([rename.get(c, c) for c in names]), inputs.sources), True


@dataclass(frozen=True)
class RefPlan:
    """Where the reference log-probs come from: 'none', 'input', 'computed' (some or all rows) or 'live'."""

    source: str
    chosen: np.ndarray | None = None  # summed log-probs per row; NaN where still to compute
    rejected: np.ndarray | None = None
    identity: dict[str, Any] | None = None
    model: Any = field(default=None, compare=False)  # the resolved ModelRef of --ref, if given

    def todo(self) -> np.ndarray:
        """Rows whose reference log-probs must still be computed."""
        return np.flatnonzero(np.isnan(self.chosen) | np.isnan(self.rejected))


def ref_groups(inputs: Inputs) -> list[tuple[dict[str, Any] | None, list[str]]]:
    """The distinct reference identities behind the `logp_ref_*` columns, each with the files they come from,
    resolved per input file and through every parent of a derived file (None: no identity recorded)."""
    groups: dict[str, tuple[dict[str, Any] | None, list[str]]] = {}
    for source in inputs.sources:
        for file, identity in lineage.ref_sources(source.prov, source.name):
            files = groups.setdefault(digest(identity) if identity else "", (identity, []))[1]
            if file not in files:
                files.append(file)
    return list(groups.values())


def _mixed(inputs: Inputs, groups: list[tuple[dict[str, Any] | None, list[str]]]) -> InputError:
    """One line naming each origin of the reference log-probs by the setting that tells them apart."""
    known = [g for g, _ in groups if g]
    key = next((k for k in _KEYS if len({repr(g.get(k)) for g in known}) > 1), "fingerprint")
    parts = [f"{', '.join(files)}: " + (f"{key} {_short(g.get(key))!r}" if g else "no reference recorded")
             for g, files in groups]
    whose = "its" if len(inputs.sources) == 1 else "their"
    return InputError(inputs.name, f"{whose} reference log-probs come from different references: {'; '.join(parts)}",
                      hint="pass --recompute-ref with --ref MODEL to compute them all with one reference")


def _short(value: Any) -> Any:
    return value[:12] if isinstance(value, str) and len(value) > 16 else value


def _difference(stored: dict[str, Any], wanted: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first setting that differs, as 'key <stored> in its provenance, <wanted> here'."""
    for key in keys:
        if stored.get(key) != wanted.get(key):
            return f"{key} {_short(stored.get(key))!r} in its provenance, {_short(wanted.get(key))!r} here"
    return None


def plan_reference(config: TrainConfig, pairs: Pairs, tok, models: TrainModels | None = None) -> RefPlan:
    """Decide where the reference log-probs come from (see the module docstring); raise on any mismatch."""
    from sera_cli.backends.logps.identity import logp_identity
    from sera_cli.backends.models import (
        chat_template_hash,
        check_same_tokenizer,
        check_same_vocab,
        load_tokenizer,
        resolved_dtype,
    )

    if not config.spec.needs_ref:
        return RefPlan("none")
    name, table = pairs.inputs.name, pairs.inputs.table
    ref = identity = None
    if config.ref:
        models = models or TrainModels.of(config)
        ref, policy = models.ref, models.policy
        same = (ref.path, ref.adapter) == (policy.path, policy.adapter)  # one tokenizer: load it once
        ref_tok = tok if same else load_tokenizer(ref, config.trust_remote_code)
        check_same_tokenizer(tok, ref_tok, config.policy, config.ref)
        check_same_vocab(policy, ref, config.trust_remote_code)
        identity = logp_identity(ref, ref_tok, config.max_length, config.max_prompt_length,
                                 resolved_dtype(config.dtype, config.device))  # as `score` records it
    n = len(pairs)
    if config.live_ref:
        return RefPlan("live", identity=identity, model=ref)
    present = set(REF_COLUMNS) <= set(table.column_names) and not all(
        table.column(c).null_count == n for c in REF_COLUMNS)  # all null: scored reference-free (SimPO)
    if not present:
        if ref is None:
            raise InputError(name, "has no reference log-probs (columns 'logp_ref_chosen', 'logp_ref_rejected')",
                             hint="give --ref MODEL to compute them, or score the pairs with 'sera score --ref'")
        return RefPlan("computed", np.full(n, np.nan), np.full(n, np.nan), identity, ref)
    chosen, rejected = (np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                        for c in REF_COLUMNS)
    groups = ref_groups(pairs.inputs)
    stored = [g for g, _ in groups if g]
    whose = "its" if len(pairs.inputs.sources) == 1 else "their"
    if pairs.trl_named and not stored and not config.trust_stored_ref:  # TRL's own numbers: its tokens, not ours
        if ref is None:
            raise InputError(name, f"{whose} TRL reference log-probs ({', '.join(TRL_REF_COLUMNS)}) carry no "
                             "provenance", hint="give --ref MODEL to compute them again, or pass "
                                                "--trust-stored-ref to use them as they are")
        return RefPlan("computed", np.full(n, np.nan), np.full(n, np.nan), identity, ref)
    if ref is not None:
        if config.recompute_ref:
            return RefPlan("computed", np.full(n, np.nan), np.full(n, np.nan), identity, ref)
        if len(groups) > 1:
            raise _mixed(pairs.inputs, groups)
        if not stored and config.trust_stored_ref:
            return RefPlan("input", chosen, rejected, None, ref)
        if not stored:
            raise InputError(name, f"{whose} reference log-probs carry no provenance to check against --ref",
                             hint=_HINT)
        if diff := _difference(stored[0], identity, _KEYS):
            raise InputError(name, f"{whose} reference log-probs are not those of --ref {config.ref}: {diff}",
                             hint=_HINT)
        _check_infinite(pairs, chosen, rejected)
        return RefPlan("input", chosen, rejected, identity, ref)  # NaN rows (null) are computed with --ref
    _check_infinite(pairs, chosen, rejected)
    bad = np.isnan(chosen) | np.isnan(rejected)
    if bad.any():
        row = int(np.argmax(bad))
        file, local = pairs.inputs.locate(row)
        column = REF_COLUMNS[0] if np.isnan(chosen[row]) else REF_COLUMNS[1]
        problem = "is null" if table.column(column)[row].as_py() is None else "is NaN"
        raise InputError(file, problem, row=local, column=column, hint="give --ref MODEL to compute it")
    if len(groups) > 1:  # several references, or some rows without one: none of them can be trusted
        raise _mixed(pairs.inputs, groups)
    if stored:  # without --ref the model is trusted, but the tokens must be the ones trained on
        here = {"chat_template": chat_template_hash(tok), "eos": tok.eos_token, "max_length": config.max_length,
                "max_prompt_length": config.max_prompt_length}
        if diff := _difference(stored[0], here, tuple(here)):
            raise InputError(name, f"{whose} reference log-probs cover other tokens: {diff}",
                             hint="train with the --max-length/--max-prompt-length it was scored with")
    return RefPlan("input", chosen, rejected, stored[0] if stored else None)


def _check_infinite(pairs: Pairs, chosen: np.ndarray, rejected: np.ndarray) -> None:
    """A stored reference log-prob of +/-inf would make the loss of its pair (and then every weight) NaN."""
    bad = np.isinf(chosen) | np.isinf(rejected)
    if bad.any():
        row = int(np.argmax(bad))
        file, local = pairs.inputs.locate(row)
        column = REF_COLUMNS[0] if np.isinf(chosen[row]) else REF_COLUMNS[1]
        value = chosen[row] if column == REF_COLUMNS[0] else rejected[row]
        raise InputError(file, f"is {value}, not a finite log-prob", row=local, column=column,
                         hint="score the pairs again, or give --ref MODEL with --recompute-ref")


def compute_reference(plan: RefPlan, pairs: Pairs, rows: np.ndarray, config: TrainConfig, device) -> RefPlan:
    """Fill the reference log-probs of `rows` with one pass of the reference model (as `score` does), on the
    pairs as encoded for training: `plan_reference` checked that --ref has the policy's tokenizer (vocabulary,
    special tokens, chat template), so the reference's own tokenizer would give the same ids."""
    import contextlib
    import gc

    from sera_cli.backends.logps.batched import flat_sequences, sequences_logps
    from sera_cli.backends.models import load_model
    from sera_cli.data.console import console

    if not len(rows):
        return plan
    model = load_model(plan.model, config.dtype, str(device), config.trust_remote_code)
    status = console.status(f"Computing reference log-probs of {len(rows):,} pairs once")
    with status if config.progress else contextlib.nullcontext():
        # padding is masked out, so any id in the vocabulary pads (pairs.pad_id: the policy tokenizer's)
        logp, _ = sequences_logps(model, flat_sequences([pairs.encoded[i] for i in rows]), pairs.pad_id,
                                  config.ref_batch_tokens, pack=config.pack_pairs)
    del model
    gc.collect()
    chosen, rejected = plan.chosen.copy(), plan.rejected.copy()
    chosen[rows], rejected[rows] = logp[0::2], logp[1::2]
    source = "computed" if plan.source == "computed" else "input+computed"
    return RefPlan(source, chosen, rejected, plan.identity, plan.model)


def ref_source(plan: RefPlan, config: TrainConfig, device):
    """A function (rows, batch) -> (reference log-probs of the chosen [B], of the rejected [B]) on `device`:
    a table lookup, the reference model run on the batch ('live', the baseline), or zeros (reference-free)."""
    import torch

    if plan.source == "none":
        return lambda rows, batch: (torch.zeros(len(rows), device=device),) * 2
    if plan.source == "live":
        from sera_cli.backends.models import load_model
        from trainers.logps import sequence_logps

        model = load_model(plan.model, config.dtype, str(device), config.trust_remote_code)

        def live(rows, batch):
            with torch.no_grad():
                logps, _ = sequence_logps(model, **batch)
            return logps[:len(rows)], logps[len(rows):]

        return live
    chosen, rejected = torch.tensor(plan.chosen), torch.tensor(plan.rejected)
    return lambda rows, batch: (chosen[rows].to(device), rejected[rows].to(device))

"""Batched log-probs of many sequences with one model: length-sorted, token-budgeted batches, no gradient.

Every number comes from `sera_cli.logps.sequence_logps`, the function the trainer also uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sera_cli.encode import Encoded, encode


def encode_rows(tok, prompts: Sequence[Any], responses: Sequence[Sequence[Any]], max_length: int | None,
                max_prompt_length: int | None) -> list[Encoded]:
    """Encode each prompt with its responses (TRL conventions, see `sera_cli.encode`)."""
    return [encode(tok, p, rs, max_length, max_prompt_length) for p, rs in zip(prompts, responses, strict=True)]


def batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that each batch's padded size stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def group_batches(groups: Sequence[tuple[int, list[int]]], batch_tokens: int) -> list[list[int]]:
    """Prompt groups (prompt length, response lengths) packed so that the padded prompt block plus the padded
    response block of a batch stay within `batch_tokens`; longest first."""
    order = sorted(range(len(groups)), key=lambda g: (-(groups[g][0] + max(groups[g][1])), g))
    out: list[list[int]] = []
    for g in order:
        if out:
            trial = out[-1] + [g]
            lp = max(groups[i][0] for i in trial)
            r = max(max(groups[i][1]) for i in trial)
            if len(trial) * lp + sum(len(groups[i][1]) for i in trial) * r <= batch_tokens:
                out[-1].append(g)
                continue
        out.append([g])
    return out


def sequences_logps(model, sequences: Sequence[tuple[list[int], int]], pad_id: int, batch_tokens: int = 1024,
                    on_batch: Callable[[int, int], None] | None = None,
                    share_prompts: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and response token counts of (ids, prompt_len) sequences, in input order.

    Sequences that share a prompt (a pair's chosen and rejected, a prompt's candidates) run the prompt once
    (`sera_cli.prefix_sharing`); the others run as length-sorted padded batches. `on_batch(n_sequences,
    n_tokens)` is called after each batch with the sequences' full token counts (for progress bars).
    """
    import torch

    from sera_cli.logps import collate, sequence_logps
    from sera_cli.prefix_sharing import can_share, shared_prompt_logps

    logp = np.zeros(len(sequences), dtype=np.float64)
    ntok = np.zeros(len(sequences), dtype=np.int64)
    device = next(model.parameters()).device
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, plen) in enumerate(sequences):
        by_prompt.setdefault(tuple(ids[:plen]), []).append(i)
    share = share_prompts and can_share(model)
    groups = [(p, idx) for p, idx in by_prompt.items() if share and len(idx) > 1 and len(p) > 0]
    single = sorted(i for p, idx in by_prompt.items() if not (share and len(idx) > 1 and len(p) > 0) for i in idx)
    with torch.inference_mode():
        shape = [(len(p), [len(sequences[i][0]) - len(p) for i in idx]) for p, idx in groups]
        for gb in group_batches(shape, batch_tokens) if groups else []:
            members = [i for g in gb for i in groups[g][1]]
            owner = [k for k, g in enumerate(gb) for _ in groups[g][1]]
            lp, n = shared_prompt_logps(model, [list(groups[g][0]) for g in gb],
                                        [sequences[i][0][sequences[i][1]:] for i in members], owner, pad_id)
            logp[members] = lp.double().cpu().numpy()
            ntok[members] = n.cpu().numpy()
            if on_batch:
                on_batch(len(members), sum(len(sequences[i][0]) for i in members))
        for b in batches([len(sequences[i][0]) for i in single], batch_tokens) if single else []:
            idx = [single[j] for j in b]
            batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], pad_id).items()}
            lp, n = sequence_logps(model, **batch)
            logp[idx] = lp.double().cpu().numpy()
            ntok[idx] = n.cpu().numpy()
            if on_batch:
                on_batch(len(idx), int(batch["attention_mask"].sum()))
    return logp, ntok


def flat_sequences(encoded: Sequence[Encoded]) -> list[tuple[list[int], int]]:
    """All (ids, prompt_len) sequences of encoded rows, row-major (a pair gives chosen then rejected)."""
    return [(e.sequence(j), len(e.prompt)) for e in encoded for j in range(len(e.responses))]


def pair_logps(model, tok, prompts, chosens, rejecteds, *, max_length: int | None, max_prompt_length: int | None,
               batch_tokens: int = 1024) -> dict[str, np.ndarray]:
    """Log-probs of each pair's chosen and rejected response under `model`."""
    enc = encode_rows(tok, prompts, list(zip(chosens, rejecteds, strict=True)), max_length, max_prompt_length)
    logp, ntok = sequences_logps(model, flat_sequences(enc), tok.pad_token_id, batch_tokens)
    return {"logp_chosen": logp[0::2], "logp_rejected": logp[1::2], "ntok_chosen": ntok[0::2],
            "ntok_rejected": ntok[1::2], "truncated": np.array([e.truncated for e in enc])}


def response_logps(model, tok, prompts, responses, *, max_length: int | None, max_prompt_length: int | None,
                   batch_tokens: int = 1024) -> dict[str, np.ndarray]:
    """Log-probs of one response per prompt under `model`."""
    enc = encode_rows(tok, prompts, [[r] for r in responses], max_length, max_prompt_length)
    logp, ntok = sequences_logps(model, flat_sequences(enc), tok.pad_token_id, batch_tokens)
    return {"logp": logp, "ntok": ntok, "truncated": np.array([e.truncated for e in enc])}

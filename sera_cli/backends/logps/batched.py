"""Batched log-probs of many sequences with one model: length-sorted, token-budgeted batches, no gradient.

Every number comes from `trainers.logps`, the functions the trainer also uses: `sequence_logps` over whole
sequences, or its vocabulary projection `projected_logps` after a shared prompt's keys and values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trainers.encode import Encoded, TemplateError, encode


def encode_rows(tok, prompts: Sequence[Any], responses: Sequence[Sequence[Any]], max_length: int | None,
                max_prompt_length: int | None, locate: Callable[[int], tuple[str, int]] | None = None) -> list[Encoded]:
    """Encode each prompt with its responses (TRL conventions, see `trainers.encode`). A row the chat template
    cannot format is a one-line error naming it (`locate(i)` gives its file and row); string prompts that carry
    the BOS the tokenizer adds again get a one-line warning."""
    from sera_cli.backends.chat_templates import template_problem, warn_double_bos

    out = []
    for i, (p, rs) in enumerate(zip(prompts, responses, strict=True)):
        try:
            out.append(encode(tok, p, rs, max_length, max_prompt_length))
        except TemplateError as err:
            raise template_problem(err, *(locate(i) if locate else ("<table>", i))) from None
    warn_double_bos(tok, [i for i, e in enumerate(out) if e.double_bos], locate)
    return out


PROMPT_WINDOW_TOKENS = 16384  # prompt tokens whose keys and values are held at once when prompts are shared


def sequences_logps(model, sequences: Sequence[tuple[list[int], int]], pad_id: int, batch_tokens: int = 1024,
                    on_batch: Callable[[int, int], None] | None = None,
                    share_prompts: bool = True, pack: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and response token counts of (ids, prompt_len) sequences, in input order.

    Each distinct prompt runs once and its responses are scored from its keys and values
    (`trainers.prefix_sharing`: a pair's chosen and rejected, a prompt's candidates); prompts and responses are
    batched apart, each by its own length. Sequences without a prompt, models whose logits are not a plain
    projection, and `share_prompts=False` run as whole sequences in length-sorted padded batches. With `pack`,
    a model that `trainers.packing.can_pack` covers runs each prompt with its responses as one packed row instead
    (one pass, no cache; what `train` uses for its reference pass, as its training forward packs the pairs).
    `on_batch(n_sequences, n_tokens)` is called after each batch with the sequences' full token counts (for
    progress bars).
    """
    import torch

    from trainers.batching import length_batches
    from trainers.logps import collate, sequence_logps
    from trainers.prefix_sharing import can_share, shared_logps

    logp = np.zeros(len(sequences), dtype=np.float64)
    ntok = np.zeros(len(sequences), dtype=np.int64)
    device = next(model.parameters()).device
    share = share_prompts and can_share(model)
    if share and pack:
        from trainers.packing import can_pack

        if can_pack(model, max((len(ids) for ids, _ in sequences), default=0)):
            return _packed_logps(model, sequences, pad_id, batch_tokens, on_batch)
    shared = [i for i, (_, plen) in enumerate(sequences) if share and plen > 0]
    single = [i for i, (_, plen) in enumerate(sequences) if not (share and plen > 0)]
    with torch.inference_mode():
        if shared:
            prompt_index: dict[tuple[int, ...], int] = {}
            owner = [prompt_index.setdefault(tuple(sequences[i][0][:sequences[i][1]]), len(prompt_index))
                     for i in shared]

            def done(idx: list[int]) -> None:
                if on_batch:
                    on_batch(len(idx), sum(len(sequences[shared[k]][0]) for k in idx))

            lp, n = shared_logps(model, [list(p) for p in prompt_index],
                                 [sequences[i][0][sequences[i][1]:] for i in shared], owner, pad_id, batch_tokens,
                                 PROMPT_WINDOW_TOKENS, done)
            logp[shared] = lp.double().cpu().numpy()
            ntok[shared] = n.cpu().numpy()
        for b in length_batches([len(sequences[i][0]) for i in single], batch_tokens):
            idx = [single[j] for j in b]
            batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], pad_id).items()}
            lp, n = sequence_logps(model, **batch)
            logp[idx] = lp.double().cpu().numpy()
            ntok[idx] = n.cpu().numpy()
            if on_batch:
                on_batch(len(idx), int(batch["attention_mask"].sum()))
    return logp, ntok


def _packed_logps(model, sequences: Sequence[tuple[list[int], int]], pad_id: int, batch_tokens: int,
                  on_batch: Callable[[int, int], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """`sequences_logps` with each prompt and its responses as one packed row (`trainers.packing`), rows in
    length-sorted batches of about `batch_tokens`; sequences without a prompt run as whole sequences."""
    import torch

    from trainers.batching import length_batches
    from trainers.packing import packed_length, packed_logps, split_responses

    logp = np.zeros(len(sequences), dtype=np.float64)
    ntok = np.zeros(len(sequences), dtype=np.int64)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, plen) in enumerate(sequences):
        if plen > 0:
            groups.setdefault(tuple(ids[:plen]), []).append(i)
    rows = [(list(p), [idx[k] for k in part]) for p, idx in groups.items()
            for part in split_responses(len(p), [len(sequences[i][0]) - len(p) for i in idx])]
    responses = [[sequences[i][0][len(p):] for i in idx] for p, idx in rows]
    with torch.inference_mode():
        for b in length_batches([packed_length(p, rs) for (p, _), rs in zip(rows, responses, strict=True)],
                                batch_tokens):
            lp, n = packed_logps(model, [(rows[r][0], responses[r]) for r in b], pad_id)
            lp, n = lp.double().cpu().numpy(), n.cpu().numpy()
            for j, r in enumerate(b):
                for k, i in enumerate(rows[r][1]):
                    logp[i], ntok[i] = lp[k * len(b) + j], n[k * len(b) + j]
            if on_batch:
                on_batch(sum(len(rows[r][1]) for r in b),
                         sum(len(rows[r][0]) * len(rows[r][1]) + packed_length([], responses[r]) for r in b))
    rest = [i for i, (_, plen) in enumerate(sequences) if plen == 0]
    if rest:
        lp, n = sequences_logps(model, [sequences[i] for i in rest], pad_id, batch_tokens, on_batch, False)
        logp[rest], ntok[rest] = lp, n
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


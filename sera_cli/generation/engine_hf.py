"""The transformers engine: each prompt prefilled once, its keys/values shared by its samples, then a decoding loop
over a preallocated key/value cache.

Sequences are batched as before (rows sorted by prompt length, `batch_size` sequences to a batch, left padded to
the batch's longest prompt), so a batch holds the same rows at the same widths as a batched `model.generate`
would (`sera_cli.generation.engine_hf_reference`, kept as the baseline). Within a batch, the distinct prompts are
prefilled once (last position's logits only); the cache rows are then copied to each of the prompt's samples into
buffers sized for the whole generation, and each step writes its keys/values in place, attending to a view as
long as the sequence so far (no per-step copy of the cache, no `generate` machinery). Rows that finished leave
the batch once they are an eighth of it, so a batch of short answers does not keep decoding them. On CPU, decoding
steps attend with plain matmuls (`sera_cli.generation.decode_attention`) and project onto the vocabulary in column
blocks into a reused buffer (`BufferedHead`, bit for bit the same logits); `fast_decode=False` keeps sdpa and
one `linear`.

Sampling (temperature, then top-p) draws each sequence's token by Gumbel-max with noise keyed by (sequence seed,
step, token id), so a sequence's random numbers do not depend on its batch. Its decoding steps run the same
operations on the same shapes as `model.generate`'s batch of that sequence; the prefill has fewer rows, which
float32 matmuls on x86 CPUs (MKL) do not notice, so there the tokens are the baseline's (tests/test_generate.py
checks it token for token). bfloat16 matmuls on CPU (oneDNN) can round a row differently when the row count
changes, so a shared prefill may flip a near-tied bf16 sample, after which the sequence diverges from the
baseline's (a GPU's kernels may do the same in any dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sera_cli.generation.decode_attention import use_decode_attention
from sera_cli.generation.sampling import Request, row_seed, uniforms
from trainers.prefix_sharing import cache_kwarg, left_pad

# Candidates tried before a full sort of the vocabulary: a sort of 64 x 49,152 probabilities costs more than a
# forward pass of a 135M model on 2 CPU cores, and a trained model's top-p nucleus is usually far smaller.
_TOPK = (64, 1024)
# Finished rows leave a decoding batch once they are this share of it: dropping them copies the others' cache
# (about one step's attention reads), and a dropped row saves its share of every later step.
_COMPACT = 1 / 8

Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows [R], token ids [R, K]) -> Gumbel noise [R, K]


def nucleus_sample(logits: torch.Tensor, noise: Noise, temperature: float, top_p: float) -> torch.Tensor:
    """Token ids [B] drawn from softmax(logits / temperature) cut to its top-p nucleus, by Gumbel-max.

    The nucleus is the most probable tokens whose preceding mass is below top_p (so it always holds the top
    token). Within it the sample is argmax(logits / temperature + noise), with noise Gumbel(0, 1) per token id;
    temperature 0 is greedy.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    rows_all = torch.arange(logits.shape[0], device=logits.device)
    vocab = logits.shape[1]
    if top_p >= 1.0:
        ids = torch.arange(vocab, device=logits.device).expand(logits.shape[0], vocab)
        return (scaled + noise(rows_all, ids)).argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    todo = rows_all
    for k in (*(k for k in _TOPK if k < vocab), vocab):  # widen the candidates until they hold the nucleus
        rest = probs if len(todo) == len(probs) else probs[todo]  # no copy of the whole table at the first try
        p, idx = rest.topk(k, dim=-1) if k < vocab else rest.sort(dim=-1, descending=True)
        cum = p.double().cumsum(dim=-1)
        done = cum[:, -1] >= top_p if k < vocab else torch.ones_like(todo, dtype=torch.bool)
        rows, idx, p, cum = todo[done], idx[done], p[done], cum[done]
        inside = (cum - p.double()) < top_p
        score = scaled[rows.unsqueeze(1), idx] + noise(rows, idx)
        tokens[rows] = idx.gather(1, score.masked_fill(~inside, float("-inf")).argmax(dim=-1, keepdim=True))[:, 0]
        todo = todo[~done]
        if len(todo) == 0:
            break
    return tokens


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def seeded_noise(seeds: Sequence[int] | np.ndarray, step: int) -> Noise:
    """Gumbel noise of step `step` for rows drawn with `seeds` (one seed per row), as `nucleus_sample` asks for it."""
    table = np.asarray(seeds, dtype=np.uint64)

    def noise(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        u = uniforms(table[rows.cpu().numpy()], step, ids.cpu().numpy())
        return gumbel(torch.from_numpy(u)).to(device=ids.device, dtype=torch.float32)

    return noise


def load_generator(ref, tok, dtype: str, device: str, max_new_tokens: int, stop_ids: Sequence[int],
                   trust_remote_code: bool):
    """The model, with a generation config that only sera's flags shape (a model's own generation defaults,
    such as a repetition penalty, are dropped)."""
    from transformers import GenerationConfig

    from sera_cli.models import load_model

    model = load_model(ref, dtype, device, trust_remote_code)
    contiguous_head_input(model)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return model


def contiguous_head_input(model) -> None:
    """Give the output projection a contiguous input.

    With `logits_to_keep=1` (a prefill, and `generate`'s) the head sees `hidden[:, -1:]`, a strided [B, 1, H]
    view. In bfloat16 on CPU, torch 2.13 multiplies such a view by the [H, V] weight as a `bmm` against the
    weight expanded to [B, H, V] and copied: 14.5 GB and about a minute for 256 SmolLM2 prompts, where the
    contiguous input is one small `mm`. Float32 has no such path, and its numbers for the strided view differ
    from the contiguous input's in the last bits, so float32 keeps the view (and the samples it always gave).
    """
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dtype != torch.float32:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


class BufferedHead:
    """The vocabulary projection of a decoding step, in column blocks into one reused output buffer.

    On 2 CPU cores a [256 x 576] x [576 x 49,152] float32 `linear` takes about 140 ms, and 102 ms as 12 `mm`s of
    4,096 vocabulary columns each (the weight block stays in cache while the rows stream past it) writing into a
    buffer kept from the last step (a fresh 50 MB output takes page faults). Each logit is the same dot product
    over the hidden size, so the logits are bit for bit those of `linear` (tests/test_generate.py checks it).
    Active only inside `decoding()`, for one-position inputs of a float32 head without bias (the engine attaches it
    on CPU only); everything else calls the module's own forward. The logits it returns are overwritten by the next step's.
    """

    BLOCK = 4096

    def __init__(self, head: torch.nn.Linear):
        self.head, self.forward, self.active = head, head.forward, False
        self.buffer = torch.empty(0)
        head.forward = self

    @classmethod
    def attach(cls, model) -> BufferedHead | None:
        head = model.get_output_embeddings()
        ok = type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32
        return cls(head) if ok else None

    @contextmanager
    def decoding(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or x.dim() != 3 or x.shape[1] != 1 or not x.is_contiguous() or torch.is_grad_enabled():
            return self.forward(x)
        rows, w = x.shape[0], self.head.weight
        if self.buffer.shape[0] < rows or self.buffer.shape[1] != w.shape[0]:
            self.buffer = x.new_empty((rows, w.shape[0]))
        out, x2 = self.buffer[:rows], x.view(rows, x.shape[2])
        for b in range(0, w.shape[0], self.BLOCK):
            torch.mm(x2, w[b:b + self.BLOCK].t(), out=out[:, b:b + self.BLOCK])
        return out.view(rows, 1, w.shape[0])


class HFEngine:
    """Generate with a transformers causal LM on CPU or one GPU."""

    name = "hf"

    def __init__(self, ref, tok, *, dtype: str, device: str, batch_size: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop_ids: Sequence[int], trust_remote_code: bool = False,
                 cache_tokens: int | None = None, fast_decode: bool = True):
        self.model = load_generator(ref, tok, dtype, device, max_new_tokens, stop_ids, trust_remote_code)
        # on CPU: matmul attention for decoding steps and a blocked vocabulary projection; GPUs keep sdpa and `linear`
        cpu_kernels = fast_decode and self.model.device.type == "cpu"
        if cpu_kernels:
            use_decode_attention(self.model)
        self.head = BufferedHead.attach(self.model) if cpu_kernels else None
        self.pad_id, self.stops, self.max_new_tokens = tok.pad_token_id, list(stop_ids), max_new_tokens
        self.batch_size, self.temperature, self.top_p = batch_size, temperature, top_p
        self.cache_tokens = cache_tokens  # None: batches of batch_size rows, however long their prompts
        self.device = next(self.model.parameters()).device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self._cache_kwarg = cache_kwarg(self.model)  # `cache` in transformers 5.20+, `past_key_values` before
        self.compactions = 0  # times finished rows left a decoding batch

    def generate(self, requests: Sequence[Request], on_batch: Callable[[list[list[int]]], None] | None = None
                 ) -> list[list[list[int]]]:
        """Generated token ids for each request's samples (padding after a stop token is left to the caller)."""
        rows = [(i, j) for i, r in enumerate(requests) for j in range(r.count)]
        rows.sort(key=lambda ij: (-len(requests[ij[0]].prompt_ids), ij))
        out: list[list[list[int]]] = [[[] for _ in range(r.count)] for r in requests]
        widths = [len(requests[i].prompt_ids) + self.max_new_tokens for i, _ in rows]
        for b, e in decode_batches(widths, self.batch_size, self.cache_tokens):
            batch = rows[b:e]
            distinct = list(dict.fromkeys(i for i, _ in batch))
            owner = [distinct.index(i) for i, _ in batch]
            seeds = [row_seed(requests[i].seed, j) for i, j in batch]
            generated = self._batch([requests[i].prompt_ids for i in distinct], owner, seeds)
            for (i, j), ids in zip(batch, generated, strict=True):
                out[i][j] = ids
            if on_batch:
                on_batch(generated)
        return out

    def _batch(self, prompts: list[list[int]], owner: list[int], seeds: list[int]) -> list[list[int]]:
        """Sequence k continues prompts[owner[k]] with seed seeds[k]."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        rows = torch.tensor(owner, device=self.device)
        with torch.inference_mode():
            prefill = DynamicCache(config=self.model.config)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                                **{self._cache_kwarg: prefill}).logits[:, -1]
            cache = preallocated(prefill, rows, self.max_new_tokens - 1)
            if cache is None:  # a sliding-window or recurrent layer: let `generate` manage its cache
                from sera_cli.generation.engine_hf_reference import generate_rows

                return generate_rows(self.model, self.pad_id, [prompts[o] for o in owner], seeds,
                                     self.temperature, self.top_p)
            with self.head.decoding() if self.head is not None else nullcontext():
                return self._decode(logits.index_select(0, rows), mask.index_select(0, rows), cache, seeds)

    def _decode(self, logits: torch.Tensor, mask: torch.Tensor, cache, seeds: list[int]) -> list[list[int]]:
        """Sample up to max_new_tokens per row; a finished row is given padding, as `generate` gives it.

        Finished rows leave the batch once they are at least `_COMPACT` of it (their cache rows are dropped, the
        others moved up), so the steps after a short answer do not run it; until then they are fed padding.
        Dropping rows changes no other row's numbers where a matmul does not round a row by the row count
        (float32 on x86 CPUs); `compactions` counts the times it happened.
        """
        stops = torch.tensor(self.stops, device=self.device)
        live = torch.arange(len(seeds), device=self.device)  # the original row of each row in the batch
        live_seeds = np.array(seeds, dtype=np.uint64)  # the seed of each row in the batch
        done = torch.zeros(len(seeds), dtype=torch.bool, device=self.device)
        out = torch.full((len(seeds), self.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        for step in range(self.max_new_tokens):
            token = nucleus_sample(logits, seeded_noise(live_seeds, step), self.temperature,
                                   self.top_p).masked_fill(done, self.pad_id)
            out[live, step] = token
            done |= torch.isin(token, stops)
            finished = int(done.sum())
            if step + 1 == self.max_new_tokens or finished == len(live):
                break
            if finished >= max(1, _COMPACT * len(live)):
                keep = (~done).nonzero()[:, 0]
                for layer in cache.layers:
                    layer.keep(keep)
                live, mask, token, done = live[keep], mask[keep], token[keep], done[keep]
                live_seeds = live_seeds[keep.cpu().numpy()]
                self.compactions += 1
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits = self.model(input_ids=token[:, None], attention_mask=mask, use_cache=True,
                                **{self._cache_kwarg: cache}).logits[:, -1]
        return out[:, :step + 1].tolist()


def decode_batches(widths: Sequence[int], batch_size: int, cache_tokens: int | None) -> list[tuple[int, int]]:
    """[start, end) of each batch of rows whose cache widths (prompt + new tokens) come longest first.

    A batch takes up to `batch_size` rows while rows x its first (longest) width stays within `cache_tokens`;
    a single row wider than that is a batch of its own. Widths are at least 1 (they count the new tokens).
    """
    out, b = [], 0
    while b < len(widths):
        rows = batch_size if cache_tokens is None else max(1, min(batch_size, cache_tokens // widths[b]))
        out.append((b, min(b + rows, len(widths))))
        b = out[-1][1]
    return out


def preallocated(prefill, rows: torch.Tensor, room: int):
    """A cache holding row rows[k] of `prefill` as its row k, with room for `room` more positions; None when a
    layer is not a plain growing one (sliding windows, recurrent states)."""
    if not prefill.layers or any(type(layer) is not DynamicLayer for layer in prefill.layers):
        return None
    cache = DynamicCache(config=None)
    cache.layers = [_Buffered(layer.keys, layer.values, rows, room) for layer in prefill.layers]
    cache.layer_class_to_replicate = None
    return cache


class _Buffered(DynamicLayer):
    """One layer's keys/values in buffers sized for the whole generation; `keys` and `values` are views of the
    filled part, so attention sees the same shapes as with a growing cache, without copying it at each step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, room: int):
        super().__init__()
        n = keys.shape[2]
        self._k = keys.new_empty((len(rows), keys.shape[1], n + room, keys.shape[3]))
        self._v = values.new_empty((len(rows), values.shape[1], n + room, values.shape[3]))
        self._k[:, :, :n] = keys.index_select(0, rows)
        self._v[:, :, :n] = values.index_select(0, rows)
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        self.device, self.is_initialized = keys.device, True

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only rows `rows` (ascending), moved to the front of the buffers."""
        n, r = self.keys.shape[-2], len(rows)
        self._k[:r, :, :n] = self.keys.index_select(0, rows)
        self._v[:r, :, :n] = self.values.index_select(0, rows)
        self._k, self._v = self._k[:r], self._v[:r]
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.keys.shape[-2], key_states.shape[-2]
        self._k[:, :, n:n + m] = key_states
        self._v[:, :, n:n + m] = value_states
        self.keys, self.values = self._k[:, :, :n + m], self._v[:, :, :n + m]
        return self.keys, self.values

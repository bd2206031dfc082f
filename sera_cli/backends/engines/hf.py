"""The transformers engine: each prompt prefilled once, its keys/values shared by its samples, then a decoding loop
over a preallocated key/value cache.

Sequences are batched as before (rows sorted by prompt length, `batch_size` sequences to a batch, left padded to
the batch's longest prompt), so a batch holds the same rows at the same widths as a batched `model.generate`
would (`sera_cli.backends.engines.hf_baseline`, kept as the baseline). Within a batch, the distinct prompts are
prefilled once (last position's logits only); the cache rows are then copied to each of the prompt's samples into
buffers sized for the whole generation, and each step writes its keys/values in place, attending to a view as
long as the sequence so far (no per-step copy of the cache, no `generate` machinery). Rows that finished leave
the batch once they are an eighth of it, so a batch of short answers does not keep decoding them. On CPU, decoding
steps attend with plain matmuls (`sera_cli.backends.engines.decode_attention`), the linear layers run through oneDNN
with weights packed once (`sera_cli.backends.engines.packed_linear`), the vocabulary projection runs in packed column
blocks into a reused buffer (`BufferedHead`), and the sampler keeps its vocabulary
tables between steps (`SamplerBuffers`, on every device); `fast_decode=False` keeps sdpa, one `linear` and fresh
tables.

Sampling (temperature, then top-p) draws each sequence's token by Gumbel-max with noise keyed by (sequence seed,
step, token id), so a sequence's random numbers do not depend on its batch, and neither do its float32 numbers
on CPU: MKL's `linear` and the packed oneDNN layers give a row the same result whatever the row count (the shared
prefill has fewer rows than `model.generate`'s). The CPU kernels round differently from the baseline's `linear`
and sdpa (about 1e-6, relative), which changes a token only where two candidates' noisy scores tie to within
that: on the benchmark (64 prompts x 4 samples x 128 tokens) every sample was the baseline's, token for token,
and tests/test_generate.py checks the same on a tiny model and on SmolLM2. bfloat16 matmuls on CPU (oneDNN) can
round a row differently when the row count changes, so a shared prefill may flip a near-tied bf16 sample, after
which the sequence diverges from the baseline's (a GPU's kernels may do the same in any dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sera_cli.backends.engines.decode_attention import use_decode_attention
from sera_cli.backends.engines.decode_cache import KWARG, SharedPromptLayer, groups_of, preallocated, unshare
from sera_cli.backends.engines.nucleus import SamplerBuffers, nucleus_sample, seeded_noise
from sera_cli.backends.engines.packed_linear import pack, pack_linears, packed_linear
from sera_cli.backends.engines.sampling import Request, row_seed
from trainers.prefix_sharing import cache_kwarg, left_pad

# Finished rows leave a decoding batch once they are this share of it: dropping them copies the others' cache
# (about one step's attention reads), and a dropped row saves its share of every later step.
_COMPACT = 1 / 8
# Prompts per prefill call: calls of prompts of similar lengths pad less (prompts come sorted by length).
_PREFILL_PROMPTS = 16


def load_generator(ref, tok, dtype: str, device: str, max_new_tokens: int, stop_ids: Sequence[int],
                   trust_remote_code: bool):
    """The model, with a generation config that only sera's flags shape (a model's own generation defaults,
    such as a repetition penalty, are dropped)."""
    from transformers import GenerationConfig

    from sera_cli.backends.models import load_model

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
    With `rows`, each block's weight is packed once for oneDNN (`packed_linear`; 72 ms against MKL's 87 ms on
    an AMD EPYC Zen 4, logits within float32 rounding of `linear`'s); where oneDNN is missing, the `mm`s stay.
    Active only inside `decoding()`, for one-position inputs of a float32 head without bias (the engine attaches it
    on CPU only); everything else calls the module's own forward. The logits it returns are overwritten by the next step's.
    """

    BLOCK = 4096

    def __init__(self, head: torch.nn.Linear, rows: int | None = None):
        self.head, self.forward, self.active = head, head.forward, False
        self.buffer = torch.empty(0)
        w = head.weight
        blocks = [pack(w[b:b + self.BLOCK], rows) for b in range(0, w.shape[0], self.BLOCK)] if rows else []
        self.blocks = blocks if blocks and all(p is not None for p in blocks) else None
        head.forward = self

    @classmethod
    def attach(cls, model, rows: int | None = None) -> BufferedHead | None:
        head = model.get_output_embeddings()
        ok = type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32
        return cls(head, rows) if ok else None

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
        for i, b in enumerate(range(0, w.shape[0], self.BLOCK)):
            if self.blocks is None:
                torch.mm(x2, w[b:b + self.BLOCK].t(), out=out[:, b:b + self.BLOCK])
            else:
                out[:, b:b + self.BLOCK] = packed_linear(x2, self.blocks[i], None)
        return out.view(rows, 1, w.shape[0])


class HFEngine:
    """Generate with a transformers causal LM on CPU or one GPU."""

    name = "hf"

    def __init__(self, ref, tok, *, dtype: str, device: str, batch_size: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop_ids: Sequence[int], trust_remote_code: bool = False,
                 cache_tokens: int | None = None, fast_decode: bool = True, onednn: bool = True):
        self.model = load_generator(ref, tok, dtype, device, max_new_tokens, stop_ids, trust_remote_code)
        # on CPU: matmul attention for decoding steps and a blocked vocabulary projection; GPUs keep sdpa and `linear`
        cpu_kernels = fast_decode and self.model.device.type == "cpu"
        self.packed_layers = 0  # linear layers running through oneDNN with packed weights
        self.share_prompts = False  # decoding keeps each prompt's keys/values once for its samples
        if cpu_kernels:
            self.share_prompts = use_decode_attention(self.model)
            if onednn:
                self.packed_layers = pack_linears(self.model, batch_size, skip=self.model.get_output_embeddings())
        self.head = BufferedHead.attach(self.model, batch_size if onednn else None) if cpu_kernels else None
        self.fast_decode = fast_decode  # also: the sampler's vocabulary tables kept between steps, on any device
        self.pad_id, self.stops, self.max_new_tokens = tok.pad_token_id, list(stop_ids), max_new_tokens
        self.batch_size, self.temperature, self.top_p = batch_size, temperature, top_p
        self.cache_tokens = cache_tokens  # None: batches of batch_size rows, however long their prompts
        self.device = next(self.model.parameters()).device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self._cache_kwarg = cache_kwarg(self.model)  # `cache` in transformers 5.20+, `past_key_values` before
        self.compactions = 0  # times finished rows left a decoding batch
        self.shared_batches = 0  # batches decoded with each prompt's keys/values kept once

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
        rows = torch.tensor(owner, device=self.device)
        with torch.inference_mode():
            logits, prefill, mask = self._prefill(prompts)
            group = groups_of(owner, len(prompts)) if self.share_prompts else 0
            self.shared_batches += bool(group)
            cache = preallocated(prefill, rows, self.max_new_tokens - 1, group)
            if cache is None:  # a sliding-window or recurrent layer: let `generate` manage its cache
                from sera_cli.backends.engines.hf_fallback import generate_rows

                return generate_rows(self.model, self.pad_id, [prompts[o] for o in owner], seeds,
                                     self.temperature, self.top_p)
            with self.head.decoding() if self.head is not None else nullcontext():
                return self._decode(logits.index_select(0, rows), mask.index_select(0, rows), cache, seeds)

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Each prompt's last-position logits [P, V], their keys/values left-padded to the longest prompt (W) and
        the padding mask [P, W].

        Prompts run in length order, `_PREFILL_PROMPTS` to a call, each call padded to its own longest prompt and
        given the positions a single call would give its rows (the last ones of W), so a row's numbers are a
        single call's but for the attention's rounding over fewer padded positions (64 Vicuna prompts, 50 tokens
        on average and 68 at most: 4.4 s against 6.3-7.1 s in one call on 2 CPU cores). Keys/values are placed
        right-aligned in a zeroed [P, H, W, D] cache; a model whose cache is not made of plain growing layers
        gets its first call's cache back, which `preallocated` turns down."""
        _, mask = left_pad(prompts, self.pad_id, self.device)
        width = mask.shape[1]
        if len(prompts) <= _PREFILL_PROMPTS:  # one call, rows in order
            return (*self._prefill_call(prompts, width), mask)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        parts = []
        for c in range(0, len(order), _PREFILL_PROMPTS):
            at = order[c:c + _PREFILL_PROMPTS]
            out, part = self._prefill_call([prompts[i] for i in at], width)
            if any(type(layer) is not DynamicLayer for layer in part.layers):
                return out, part, mask  # a cache `preallocated` turns down
            parts.append((torch.tensor(at, device=self.device), out, part))
        logits = parts[0][1].new_empty((len(prompts), parts[0][1].shape[-1]))
        cache = DynamicCache(config=None)
        cache.layers = [DynamicLayer() for _ in parts[0][2].layers]
        for n, layer in enumerate(cache.layers):
            k, v = parts[0][2].layers[n].keys, parts[0][2].layers[n].values
            layer.keys = k.new_zeros((len(prompts), k.shape[1], width, k.shape[3]))
            layer.values = v.new_zeros((len(prompts), v.shape[1], width, v.shape[3]))
            layer.is_initialized = True
        for at, out, part in parts:
            logits[at] = out
            for layer, got in zip(cache.layers, part.layers, strict=True):
                layer.keys[at, :, width - got.keys.shape[2]:] = got.keys
                layer.values[at, :, width - got.values.shape[2]:] = got.values
        return logits, cache, mask

    def _prefill_call(self, prompts: list[list[int]], width: int) -> tuple[torch.Tensor, DynamicCache]:
        """One prefill call, left-padded to its longest prompt, at the last positions of `width`."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        positions = torch.arange(width - ids.shape[1], width, device=self.device).expand_as(ids)
        part = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_kwarg: part}).logits[:, -1]
        return logits, part

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
        buffers = SamplerBuffers() if self.fast_decode else None
        shared = isinstance(cache.layers[0], SharedPromptLayer)
        for step in range(self.max_new_tokens):
            token = nucleus_sample(logits, seeded_noise(live_seeds, step), self.temperature, self.top_p,
                                   buffers).masked_fill(done, self.pad_id)
            out[live, step] = token
            done |= torch.isin(token, stops)
            finished = int(done.sum())
            if step + 1 == self.max_new_tokens or finished == len(live):
                break
            if finished >= max(1, _COMPACT * len(live)):
                keep = (~done).nonzero()[:, 0]
                unshare(cache)  # the rows left are no longer whole groups of a prompt's samples
                shared = False
                for layer in cache.layers:
                    layer.keep(keep)
                live, mask, token, done = live[keep], mask[keep], token[keep], done[keep]
                live_seeds = live_seeds[keep.cpu().numpy()]
                self.compactions += 1
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits = self._step(token, mask, cache, shared)
            if shared and step == 0 and not all(layer.reads for layer in cache.layers):
                # the model did not hand the cache to sera's attention (a model class that drops call keywords):
                # take the step back and decode this batch, and the next ones, with one row per sample
                for layer in cache.layers:
                    layer.drop_last()
                unshare(cache)
                shared = self.share_prompts = False
                logits = self._step(token, mask, cache, shared)
        return out[:, :step + 1].tolist()

    def _step(self, token: torch.Tensor, mask: torch.Tensor, cache, shared: bool) -> torch.Tensor:
        return self.model(input_ids=token[:, None], attention_mask=mask, use_cache=True,
                          **{self._cache_kwarg: cache}, **({KWARG: cache} if shared else {})).logits[:, -1]


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

"""The decoding caches of the transformers engine: keys/values in buffers sized for the whole generation.

- `BufferedLayer`: one row per sample. The prefill's rows are copied to each of the prompt's samples, and each
  step writes its keys/values in place; `keys`/`values` are views of the filled part, so attention sees the
  same shapes as with a growing cache, without copying it at each step.
- `SharedPromptLayer`: each prompt's keys/values once for all its samples. With N samples per prompt, one row
  per sample holds every prompt N times, and each decoding step reads all of it: on 2 CPU cores a step's
  attention is bound by those reads (256 SmolLM2 rows at a 50-token prompt and 64 generated tokens: 127 ms a
  step over 30 layers, the cache cold as in a real step). Here the prompt part stays as the prefill left it,
  one row per prompt, and only the generated positions have a row per sample; the decoding attention
  (`decode_attention.shared_prompt_attention`) scores the prompt part with all of a prompt's samples' queries at
  once and takes one softmax over prompt and generated positions together: 104 ms against 127 in the same
  measurement. For batches whose rows are whole groups of `group` consecutive samples of one prompt each (the
  usual N samples per prompt), on CPU; a batch becomes one row per sample (`unshare`) once finished rows leave it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KWARG = "sera_shared_prompts"  # the model call's keyword that hands a shared-prompt cache to the attention


class BufferedLayer(DynamicLayer):
    """One layer's keys/values, row k holding row rows[k] of `keys`/`values`, with room for `room` positions."""

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

    def room(self) -> int:
        return self._k.shape[2] - self.keys.shape[2]

    def drop_last(self) -> None:
        """Forget the last position written (a step taken back)."""
        n = self.keys.shape[-2] - 1
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


class SharedPromptLayer(BufferedLayer):
    """Prompt keys/values [prompts, H, P, D] (as prefilled, left-padded) kept once, and the generated ones of
    [prompts x group] rows in the buffers; `keys`/`values` (what `update` returns) are the generated part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, group: int, room: int):
        rows = torch.arange(keys.shape[0], device=keys.device).repeat_interleave(group)
        super().__init__(keys[:, :, :0], values[:, :, :0], rows, room)
        self.prompt_keys, self.prompt_values, self.group = keys, values, group
        self.reads = 0  # decoding steps whose attention read the prompt part (the engine checks the first one)

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.keys.shape[-2]

    def keep(self, rows: torch.Tensor) -> None:
        raise RuntimeError("rows leave a shared-prompt cache only after `unshare`")

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values with one row per sample: each prompt's repeated for its samples, then the generated."""
        def cat(prompt, gen):
            return torch.cat([prompt.repeat_interleave(self.group, dim=0), gen], dim=2)

        return cat(self.prompt_keys, self.keys), cat(self.prompt_values, self.values)


def groups_of(owner: list[int], prompts: int) -> int:
    """The group size when rows are `group` consecutive samples of each prompt in turn, else 0."""
    if not prompts or len(owner) % prompts:
        return 0
    group = len(owner) // prompts
    return group if all(o == k // group for k, o in enumerate(owner)) else 0


def preallocated(prefill, rows: torch.Tensor, room: int, group: int = 0):
    """A cache holding row rows[k] of `prefill` as its row k, with room for `room` more positions; None when a
    layer is not a plain growing one (sliding windows, recurrent states). With `group` (rows are `group`
    consecutive samples of each prefilled prompt in turn), the prompts' keys/values are kept once."""
    if not prefill.layers or any(type(layer) is not DynamicLayer for layer in prefill.layers):
        return None
    cache = DynamicCache(config=None)
    if group:
        cache.layers = [SharedPromptLayer(layer.keys.contiguous(), layer.values.contiguous(), group, room)
                        for layer in prefill.layers]
    else:
        cache.layers = [BufferedLayer(layer.keys, layer.values, rows, room) for layer in prefill.layers]
    cache.layer_class_to_replicate = None
    return cache


def unshare(cache) -> None:
    """Give a shared-prompt cache one row per sample (with the room it had left); other caches stay as they are."""
    if isinstance(cache.layers[0], SharedPromptLayer):
        layers = []
        for layer in cache.layers:
            keys, values = layer.whole()
            rows = torch.arange(keys.shape[0], device=keys.device)
            layers.append(BufferedLayer(keys, values, rows, layer.room()))
        cache.layers = layers

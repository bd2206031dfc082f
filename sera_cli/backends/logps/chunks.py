"""Chunked, resumable, cached log-prob computation for several models over one list of sequences."""

from __future__ import annotations

import gc
import time
from typing import Any, Protocol

import numpy as np

from sera_cli.data.chunk_store import ChunkStore, chunk_key, progress, token_digest
from sera_cli.data.console import console


class LogpSettings(Protocol):
    """What the computation reads of a stage's config (`ScoreConfig` has these fields)."""

    policy: str
    ref: str | None
    chunk_rows: int
    low_memory: bool
    cache: str | None
    progress: bool
    batch_tokens: int
    trust_remote_code: bool
    dtype: str
    device: str


class ChunkedLogps:
    """The log-prob work of one run: chunks x models, with resume files and the cache.

    For each model (role), each chunk's log-probs are saved in the chunk store as soon as they are done, keyed by
    the role's log-prob identity (model fingerprint, template, lengths, dtype) and the chunk's token ids; a chunk
    saved with that key is not recomputed (resume). With `--low-memory`, models run one after the other.
    `loaded` (the caller's dict, by model path) keeps loaded models for the caller's next run.
    """

    def __init__(self, config: LogpSettings, store: ChunkStore, n_rows: int, seqs, per_row: int,
                 identities: dict[str, Any], loaded: dict[str, Any] | None = None):
        self.config, self.seqs, self.per_row, self.identities = config, seqs, per_row, identities
        self.loaded = loaded
        self.store = store
        self.n_chunks = -(-n_rows // config.chunk_rows)
        self.computed = self.cached = self.resumed = self.tokens = self.sequences_done = 0
        # a sequence is (ids, prompt_len): where the response starts is part of what a chunk computes
        tokens = [token_digest([self.seqs[i][1], *self.seqs[i][0]] for i in self._chunk_seqs(c))
                  for c in range(self.n_chunks)]
        self.keys = {role: [chunk_key(identity, t) for t in tokens] for role, identity in identities.items()}
        self.done: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {role: {} for role in identities}

    def _chunk_seqs(self, c: int) -> range:
        size = self.config.chunk_rows * self.per_row
        return range(c * size, min((c + 1) * size, len(self.seqs)))

    @staticmethod
    def _file(role: str, c: int) -> str:
        return f"{role}-{c:06d}.npz"

    def run(self, roles: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        phases = [[r] for r in roles] if self.config.low_memory else [list(roles)]
        for phase in phases:
            self._run_phase(phase, roles)
        out = {}
        for role in roles:
            parts = [self.done[role][c] for c in range(self.n_chunks)]
            out[role] = (np.concatenate([p[0] for p in parts]) if parts else np.zeros(0),
                         np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64))
        return out

    def _run_phase(self, phase: list[str], roles: dict[str, Any]) -> None:
        from sera_cli.backends.logps.cache import LogpCache

        todo: dict[str, list[int]] = {}
        for role in phase:
            for c in range(self.n_chunks):
                saved = self.store.load(self._file(role, c), self.keys[role][c])
                if saved is not None:
                    self.done[role][c] = (saved["logp"], saved["ntok"])
                    self.resumed += len(self._chunk_seqs(c))
            todo[role] = [c for c in range(self.n_chunks) if c not in self.done[role]]
        caches = {r: LogpCache(self.config.cache, self.identities[r]) for r in phase} if self.config.cache else {}
        hits: dict[str, dict[str, tuple[float, int]]] = {}
        keys: dict[str, dict[int, list[str | None]]] = {}  # each to-do chunk's cache keys, computed once
        for role in phase:
            keys[role] = {c: caches[role].keys([self.seqs[i] for i in self._chunk_seqs(c)]) if caches
                          else [None] * len(self._chunk_seqs(c)) for c in todo[role]}
            hits[role] = caches[role].get([k for c in todo[role] for k in keys[role][c]]) if caches else {}
        missing = {role: sum(1 for c in todo[role] for k in keys[role][c] if k not in hits[role])
                   for role in phase}
        models = {role: self._load(roles[role]) for role in phase if missing[role]}
        total_tokens = sum(len(self.seqs[i][0]) for role in phase for c in todo[role] for i in self._chunk_seqs(c))
        with progress(self.config.progress) as bar:
            task = bar.add_task(f"log-probs of {self._models(phase)}", total=max(total_tokens, 1), rate="",
                                unit="tokens")
            t0 = time.perf_counter()
            for c in sorted({c for role in phase for c in todo[role]}):
                for role in phase:
                    if c in todo[role]:
                        self._chunk(role, c, models.get(role), caches.get(role), keys[role][c], hits[role], bar,
                                    task, t0)
        for role in list(models):
            del models[role]
        gc.collect()
        for cache in caches.values():
            cache.close()

    def _models(self, phase: list[str]) -> str:
        """The models a progress line counts tokens for, as the user named them: "policy X + reference Y", or
        "model X" for a reference-free pass (which `sera run` also uses for its reference log-probs)."""
        if len(self.identities) == 1:
            return f"model {self.config.policy}"
        names = {"policy": f"policy {self.config.policy}", "ref": f"reference {self.config.ref}"}
        return " + ".join(names.get(role, role) for role in phase)

    def _chunk(self, role, c, model, cache, keys, hits, bar, task, t0) -> None:
        from sera_cli.backends.logps.batched import sequences_logps

        idx = list(self._chunk_seqs(c))
        seqs = [self.seqs[i] for i in idx]
        logp = np.zeros(len(idx))
        ntok = np.zeros(len(idx), dtype=np.int64)
        need = [j for j, k in enumerate(keys) if k not in hits]
        for j, k in enumerate(keys):
            if k in hits:
                logp[j], ntok[j] = hits[k]
        self.cached += len(idx) - len(need)
        bar.advance(task, sum(len(seqs[j][0]) for j, k in enumerate(keys) if k in hits))
        if need:
            tok_pad = self._pad_id

            def on_batch(n_seq: int, n_tok: int) -> None:
                self.tokens += n_tok
                self.sequences_done += n_seq
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=n_tok, rate=f"{self.tokens / dt:,.0f} tokens/s")

            lp, n = sequences_logps(model, [seqs[j] for j in need], tok_pad, self.config.batch_tokens, on_batch)
            logp[need], ntok[need] = lp, n
            self.computed += len(need)
            if cache:
                cache.put([keys[j] for j in need], lp, n)
        self.store.save(self._file(role, c), self.keys[role][c], {"logp": logp, "ntok": ntok})
        self.done[role][c] = (logp, ntok)

    def _load(self, ref):
        from sera_cli.backends.models import load_model, load_tokenizer

        self._pad_id = load_tokenizer(ref, self.config.trust_remote_code).pad_token_id
        key = f"{ref.path}|{ref.adapter}|{ref.fingerprint}"
        if self.loaded is not None and key in self.loaded:
            return self.loaded[key]
        with console.status(f"Loading {ref.spec}"):
            model = load_model(ref, self.config.dtype, self.config.device, self.config.trust_remote_code)
        if self.loaded is not None:
            self.loaded[key] = model
        return model

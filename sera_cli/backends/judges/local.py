"""A local judge: a chat model (HF folder, GGUF, PEFT adapter or `smollm2-135m`) run greedily with transformers.

The judge prompt goes through the model's chat template (a judge needs one: the MT-bench prompts are a system
and a user message); templates that refuse a system message get it prepended to the user message. Generation
uses the `generate` stage's transformers engine in greedy mode, batched, and each finished batch is handed back
at once so the caller can cache it.

`prefill` starts the judge's reply with fixed text (e.g. `[[` for pairwise verdicts): a small judge that would
otherwise ramble then completes the verdict. The prefill is part of the returned text, so the verdict is still
parsed from what the judge's reply reads, and part of the judge's identity, so cached judgments never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sera_cli.data.errors import ModelError


class LocalJudge:
    kind = "local"

    def __init__(self, spec: str, *, max_tokens: int, batch_size: int = 16, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, prefill: str = ""):
        from sera_cli.backends.models import resolve

        self.ref = resolve(spec)
        self.spec, self.max_tokens, self.batch_size = spec, max_tokens, batch_size
        self.dtype, self.device, self.trust_remote_code = dtype, device, trust_remote_code
        self.prefill = prefill
        self.name = f"{spec} (reply prefilled {prefill!r})" if prefill else spec
        self._engine = self._tok = None

    def identity(self) -> dict[str, Any]:
        ident = {"kind": self.kind, "model": self.spec, "fingerprint": self.ref.fingerprint,
                 "max_tokens": self.max_tokens, "decoding": "greedy"}
        return {**ident, "prefill": self.prefill} if self.prefill else ident

    @property
    def tokenizer(self):
        """The judge's tokenizer (loaded once, checked for a chat template); the model is not loaded."""
        if self._tok is None:
            from sera_cli.backends.chat_templates import stop_ids
            from sera_cli.backends.models import load_config, load_tokenizer, model_context

            tok = load_tokenizer(self.ref, self.trust_remote_code, own_template=True)
            if not tok.chat_template:
                raise ModelError(f"judge {self.spec}: its tokenizer has no chat template; a judge must be a chat "
                                 "(instruct) model, or serve one behind --judge-url")
            self.stops = stop_ids(self.ref.path, tok, chat=True)
            self.context = model_context(self.ref, self.trust_remote_code)
            cfg = load_config(self.ref, self.trust_remote_code)
            vocab = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", None)
            self.vocab = vocab if isinstance(vocab, int) else None  # checked per prompt, before any work
            self._tok = tok
        return self._tok

    def _load(self) -> None:
        from sera_cli.backends.engines.hf import HFEngine

        tok = self.tokenizer
        self._engine = HFEngine(self.ref, tok, dtype=self.dtype, device=self.device, batch_size=self.batch_size,
                                temperature=0.0, top_p=1.0, max_new_tokens=self.max_tokens, stop_ids=self.stops,
                                trust_remote_code=self.trust_remote_code)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The judge prompt's token ids: chat template, generation prompt and prefill; checked against the
        context."""
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that rejects the system role: fold it into the user turn
            merged = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
            text = tok.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        ids = tok(text + self.prefill, add_special_tokens=False)["input_ids"]
        if ids and self.vocab is not None and max(ids) >= self.vocab:
            raise ModelError(f"judge {self.spec}: token id {max(ids):,} of a judge prompt has no embedding (vocab_size "
                             f"{self.vocab:,} in its config.json); the model's config and tokenizer do not match")
        if self.context and len(ids) + self.max_tokens > self.context:
            raise ModelError(f"judge {self.spec}: a judge prompt has {len(ids):,} tokens; with --judge-max-tokens "
                             f"{self.max_tokens} that exceeds its context of {self.context:,} (lower "
                             "--judge-max-tokens or --max-new-tokens)")
        return ids

    def run(self, jobs: Sequence[list[dict[str, str]]], on_result: Callable[[int, str], None]) -> None:
        """Judge every job (a list of chat messages); `on_result(i, text)` after each batch's judgments."""
        from sera_cli.backends.engines.sampling import Request, trim

        if self._engine is None:
            self._load()
        for start in range(0, len(jobs), self.batch_size):
            idx = range(start, min(start + self.batch_size, len(jobs)))
            reqs = [Request(self.prompt_ids(jobs[i]), 1, 0) for i in idx]
            out = self._engine.generate(reqs)
            for i, samples in zip(idx, out, strict=True):
                ids, _ = trim(samples[0], self.stops, self.max_tokens)
                on_result(i, self.prefill + self._tok.decode(ids, skip_special_tokens=True))

"""What makes two log-prob computations interchangeable: the model, the tokenizer's template, the max
lengths and the dtype. `score` stores it in provenance and keys its cache with it; `train` compares it."""

from __future__ import annotations

from typing import Any

from sera_cli.backends.models import ModelRef, chat_template_hash


def logp_identity(ref: ModelRef, tok, max_length: int | None, max_prompt_length: int | None,
                  dtype: str) -> dict[str, Any]:
    return {"fingerprint": ref.fingerprint, "chat_template": chat_template_hash(tok),
            "eos": tok.eos_token, "max_length": max_length, "max_prompt_length": max_prompt_length,
            "dtype": dtype}


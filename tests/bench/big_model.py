"""A 1B-shaped model on the developers' machine: set-up time, scoring and training of a random model in
TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocabulary 32,000: 1.10B
parameters, 4.4 GB in float32) with the Llama-2 SentencePiece tokenizer (../shared/data/tokenizers/llama-spm).

Phases, each `sera` command in a process of its own (peak RSS is that process's alone, `wait4`):
- setup: `sera train` from process start to its first training step, three ways in one run:
  `before` = every resolve hashes every weight file (the fingerprint memo switched off in the child, as the
  code was before the memo), `cold` = the memo on, its folder empty, `warm` = the memo filled by `cold`.
  Also printed: how many weight-file reads each made.
- score: `sera score` of --pairs HH-RLHF helpful-base pairs, policy = reference, float32.
- train: `sera train` --steps steps of one pair each, DPO, float32, full fine-tuning with
  --gradient-checkpointing, full fine-tuning without it, and LoRA (r 16); tokens/s from metrics.jsonl.
A child that would not fit is stopped by an address-space limit (--limit-gib) instead of the OOM killer, and
reported as not fitting.

Run: python tests/bench/big_model.py [--pairs 32 --steps 8 --max-length 192 --work /tmp/sera-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "max_position_embeddings": 2048, "vocab_size": 32000,
         "tie_word_embeddings": False, "rms_norm_eps": 1e-5}

CHILD_SETUP = r"""
import sys, time, json
t0 = time.perf_counter()
mode, out = sys.argv[1], sys.argv[2]
from sera_cli.data import hashing
reads = []
real = hashing.file_digest
def counted(path, *a, **k):
    if str(path).endswith((".safetensors", ".bin")):
        reads.append(str(path))
    return real(path, *a, **k)
hashing.file_digest = counted
import sera_cli.backends.fingerprints as fp
fp.file_digest = counted
if mode == "before":  # as before the memo: every resolve reads every weight file again
    fp.weight_digest = lambda path: counted(path.resolve())
import os
import trainers.loop as loop
def first_step(*a, **k):  # the first training step: set-up is over
    json.dump({"seconds": time.perf_counter() - t0, "weight_reads": len(reads)}, open(out, "w"))
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
loop.fit = first_step
from sera_cli.commands.app import app
app(sys.argv[3:], standalone_mode=False)
"""


def build(folder: Path) -> Path:
    """The random 1B-shaped model and its tokenizer, saved once in `folder`."""
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from families import mistral_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = mistral_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    print(f"built {params / 1e9:.3f}B parameters in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return folder


def pairs_file(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hh import hh_pairs

    if not path.exists():
        rows = hh_pairs("helpful-base", n)
        pq.write_table(pa.Table.from_pylist([{"id": f"hh-{i}", **r} for i, r in enumerate(rows)]), path)
    return path


def run_measured(cmd: list[str], limit_gib: float, env: dict | None = None) -> dict:
    """`run` with peak RSS of the child (ru_maxrss of RUSAGE_CHILDREN is the largest child so far, so each
    measured child runs through a fresh intermediate process that reports its own child's peak)."""
    probe = ("import os, resource, subprocess, sys, json, time\n"
             f"lim = {int(limit_gib * 2**30)}\n"
             "def cap():\n    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
             "t0 = time.perf_counter()\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=cap)\n"
             "wall = time.perf_counter() - t0\n"
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
             "tail = [x for x in p.stderr.strip().splitlines() if x.strip()][-3:]\n"
             "print(json.dumps({'wall': wall, 'rss_mib': peak, 'rc': p.returncode, 'tail': tail}))\n")
    res = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(res.stdout.strip().splitlines()[-1])


def sera(*args: str) -> list[str]:
    return [sys.executable, "-m", "sera_cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sera-1b"))
    ap.add_argument("--limit-gib", type=float, default=22.0)
    ap.add_argument("--phases", nargs="+", default=["setup", "score", "train"],
                    choices=["setup", "score", "train"])
    ap.add_argument("--train", nargs="+", default=["ckpt", "full", "lora"], choices=["ckpt", "full", "lora"])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags "
          f"{' '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile') if f in flags)}", flush=True)
    model = str(build(args.work / "tinyllama-1.1b-shape"))
    data = pairs_file(args.work / "pairs.parquet", args.pairs)
    common = ["--max-length", str(args.max_length), "--dtype", "float32"]
    results: dict = {}

    if "setup" in args.phases:
        cache = args.work / "cache"
        for mode in ("before", "cold", "warm"):
            if mode == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            out = args.work / f"setup-{mode}.json"
            cmd = [sys.executable, "-c", CHILD_SETUP, mode, str(out), "train", str(data), "--policy", model,
                   "--ref", model, "--loss", "dpo", "--batch-size", "1", "--micro-batch", "1", "--max-steps", "1",
                   *common, "-q", "-o", str(args.work / f"setup-{mode}-model")]
            r = run_measured(cmd, args.limit_gib, {"SERA_CACHE_DIR": str(cache)})
            r.update(json.loads(out.read_text()) if out.exists() else {})
            results[f"setup-{mode}"] = r
            print(f"setup {mode}: {r}", flush=True)

    if "score" in args.phases:
        out = args.work / "scored.parquet"
        r = run_measured(sera("score", str(data), "--policy", model, "--ref", model, "--beta", "0.1", *common,
                              "--chunk-rows", "8", "-o", str(out)), args.limit_gib)
        if r["rc"] == 0:
            import pyarrow.parquet as pq

            t = pq.read_table(out, columns=["ntok_chosen", "ntok_rejected"])
            r["response_tokens"] = int(sum(t.column("ntok_chosen").to_pylist()) +
                                       sum(t.column("ntok_rejected").to_pylist()))
            r["pairs_per_s"] = args.pairs / r["wall"]
        results["score"] = r
        print(f"score {args.pairs} pairs: {r}", flush=True)

    if "train" in args.phases:
        variants = {"ckpt": ["--gradient-checkpointing"], "full": [], "lora": ["--lora-r", "16"]}
        for name in args.train:
            folder = args.work / f"train-{name}"
            shutil.rmtree(folder, ignore_errors=True)
            r = run_measured(sera("train", str(data), "--policy", model, "--ref", model, "--loss", "dpo",
                                  "--beta", "0.1", "--lr", "1e-6", "--batch-size", "1", "--micro-batch", "1",
                                  "--max-steps", str(args.steps), *variants[name], *common, "-q",
                                  "-o", str(folder)), args.limit_gib)
            log = folder / "metrics.jsonl"
            if r["rc"] == 0 and log.exists():
                steps = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
                tokens, secs = sum(s["tokens"] for s in steps), sum(s["seconds"] for s in steps)
                r.update(steps=len(steps), tokens=tokens, step_seconds=secs, tokens_per_s=tokens / secs,
                         first_loss=steps[0]["loss"])
            results[f"train-{name}"] = r
            print(f"train {name}: {r}", flush=True)

    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| phase | wall s | peak RSS MiB | detail |\n| --- | ---: | ---: | --- |")
    for k, r in results.items():
        detail = {x: r[x] for x in ("weight_reads", "seconds", "tokens_per_s", "steps", "pairs_per_s",
                                    "response_tokens") if x in r}
        if r.get("rc"):
            detail = f"FAILED rc {r['rc']}: {r.get('tail')}"
        print(f"| {k} | {r['wall']:.0f} | {r['rss_mib'] or 0:,.0f} | {detail} |")


if __name__ == "__main__":
    main()

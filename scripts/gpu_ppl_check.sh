#!/usr/bin/env bash
# Issue 14 on a CUDA machine, from the repo root (quantkit's deps already on PYTHONPATH):
# (a) tests/test_gpu.py; (b) scripts/bench_gpu.py perplexity + calibrate tok/s, quantkit beside
# transformers+torch, on random 1B- and 8B-shaped llama checkpoints made here; (c) quantkit on the 1B
# shape with the fused attention / NLL off (QUANTKIT_GPU_PLAIN), the before/after in the same run.
# Log: $OUT/gpu_ppl.log (also on stdout). About 6 minutes of an H200.
set -u
OUT=${OUT:-/tmp}
LOG="$OUT/gpu_ppl.log"
WORK=${GPU_PPL_WORK:-/tmp/quantkit-gpu-ppl}
export QUANTKIT_FIXTURES=${QUANTKIT_FIXTURES:-/tmp/fixtures}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$WORK"
{
  echo "== gpu_ppl_check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  echo "== (a) tests/test_gpu.py"
  if python3 -c "import pytest" 2>/dev/null; then
    timeout 200 python3 -m pytest tests/test_gpu.py -x -q -rs -p no:cacheprovider 2>&1 | tail -25
    echo "test_gpu exit ${PIPESTATUS[0]}"
  else
    echo "pytest not importable here: tests/test_gpu.py not run"
  fi
  echo "== (b) bench_gpu.py: 1b (128 chunks of 512), 8b (64 chunks)"
  timeout 150 python3 scripts/bench_gpu.py --work "$WORK" --models 1b --chunks 128 2>&1 \
    | grep -v '^# {"peaks' ; echo "bench 1b exit ${PIPESTATUS[0]}"
  timeout 200 python3 scripts/bench_gpu.py --work "$WORK" --models 8b --chunks 64 2>&1 \
    | grep -v '^# {"peaks' ; echo "bench 8b exit ${PIPESTATUS[0]}"
  echo "== (c) 1b, quantkit only, fused attention and NLL off (the previous path)"
  QUANTKIT_GPU_PLAIN=attention,nll timeout 60 python3 scripts/bench_gpu.py --work "$WORK" --models 1b \
    --chunks 128 --no-hf 2>&1 | grep -E '^\|' ; echo "bench 1b plain exit ${PIPESTATUS[0]}"
  echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$LOG"

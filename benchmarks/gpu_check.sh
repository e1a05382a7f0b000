#!/usr/bin/env bash
# One call on a CUDA machine: the seed config's step time and memory in a few variants, then the
# assigner micro-benchmark. Everything (logs, JSON, summary.md) goes to ${OUT:-benchmarks/gpu_out}.
#
#   bash benchmarks/gpu_check.sh                      # from the repo root; no installation needed
#   OUT=/somewhere BUDGET_S=420 bash benchmarks/gpu_check.sh
#   DEVICE=cpu STEPS=3 SKIP=1 EXTRA_ARGS="--arch vit_tiny --k 256 --batch 4 --quick --threads 1" \
#     ASSIGN_ARGS=--quick bash benchmarks/gpu_check.sh     # a dry run of the script itself on CPU
#
# Variants (the seed YAML as written: vit_large, B = 64, K = 65 536 in both heads, 2×224 + 8×96
# crops, DTCH targets; optim.epochs=2 keeps the auxiliary streams, which do not exist yet, at weight
# 0), in order of importance, each under its own timeout; a variant that would not fit in what is
# left of BUDGET_S is skipped and reported:
#   bf16_compile_ac    the seed's settings (bf16, compile on, activation checkpointing on)
#   bf16_eager_ac      compile off, AC on; with a profile (top ops, time per stage)
#   bf16_compile_noac  compile on, AC off (an out-of-memory is reported, not fatal)
#   bench_assign       python benchmarks/bench_assign.py --device cuda
#   fp32_eager_ac      fp32 parameters, compile off, AC on, fewer steps (if time allows)
# Compile warm-up is reported apart: the first teacher call and the untimed first steps.
#
# Dependencies: torch with CUDA, torchvision, omegaconf (+ antlr4-python3-runtime), pyyaml, numpy,
# pillow, safetensors, tqdm. They are checked first; pure-Python ones that are missing can be put in
# ${DEPS_DIR:-.whl/site} (an ignored path), which is prepended to PYTHONPATH when it exists.
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
DEPS_DIR="${DEPS_DIR:-.whl/site}"
if [[ -d "$DEPS_DIR" ]]; then
  export PYTHONPATH="$REPO/$DEPS_DIR:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${OUT:-benchmarks/gpu_out}"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-470}"   # the whole script, about 8 minutes
STEPS="${STEPS:-30}"          # timed steps per bf16 variant (median of the steps after SKIP)
SKIP="${SKIP:-5}"
DATA_DIR="${DATA_DIR:-${TMPDIR:-/tmp}/dino_bridge_bench_images}"   # not under OUT: not sent back
DEVICE="${DEVICE:-cuda}"
read -ra EXTRA <<< "${EXTRA_ARGS:-}"          # appended to every bench_step.py call
read -ra ASSIGN_EXTRA <<< "${ASSIGN_ARGS:-}"  # appended to the bench_assign.py call
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# ------------------------------------------------------------------------------- dependencies
log "python: $(command -v "$PY") ($("$PY" -V 2>&1)); PYTHONPATH=$PYTHONPATH"
"$PY" - <<'EOF'
import importlib
import sys

needed = {  # module: distribution
    "torch": "torch",
    "torchvision": "torchvision",
    "omegaconf": "omegaconf (needs antlr4-python3-runtime==4.9.*)",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
}
missing = []
for module, dist in needed.items():
    try:
        version = getattr(importlib.import_module(module), "__version__", "?")
        print(f"  ok       {module:12s} {version}")
    except Exception as error:  # an ImportError, or a broken binary
        missing.append(dist)
        print(f"  MISSING  {module:12s} {type(error).__name__}: {error}")
if missing:
    print(
        "\nMissing: " + ", ".join(missing) + ".\n"
        "This machine has no package index. On a machine that has one, put them in .whl/site (ignored\n"
        "by git) for this Python (" + sys.version.split()[0] + "), e.g.\n"
        "  pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\\n"
        "      -d .whl <packages>       # binary ones: numpy, pillow, safetensors, pyyaml\n"
        "  pip wheel -w .whl antlr4-python3-runtime==4.9.3 omegaconf tqdm   # pure Python\n"
        "  pip install --no-deps --target .whl/site .whl/*.whl\n"
        "then send .whl with the call (carry it) and rerun; torchvision must match the installed torch.",
        file=sys.stderr,
    )
    sys.exit(2)
EOF

# ------------------------------------------------------------------------------------- device
{
  echo "date: $(date -Is)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" - "$DEVICE" <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    if sys.argv[1] == "cuda":
        raise SystemExit("no CUDA device visible to torch")
    print(f"no CUDA device: a dry run on {sys.argv[1]}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}, matmul precision {torch.get_float32_matmul_precision()}")
EOF
} | tee "$OUT/env.txt"

log "synthetic images in $DATA_DIR"
TXT=$("$PY" benchmarks/_synthetic.py --out "$DATA_DIR" --count 256 --size 256)

# ----------------------------------------------------------------------------------- variants
SEED=(--device "$DEVICE" --arch vit_large --k 65536 --batch 64 --threads 8 --pool 3 --data "$TXT")
SUMMARY=()

run_step_bench() {  # name limit_s min_s bench_step.py args...
  local name=$1 limit=$2 min_s=$3 rc=0 remaining
  shift 3
  remaining=$(left)
  if (( remaining < min_s )); then
    log "$name: skipped (${remaining}s left, needs about ${min_s}s)"
    SUMMARY+=("$name: skipped, out of time")
    return 0
  fi
  (( limit > remaining )) && limit=$remaining
  log "$name: timeout ${limit}s: bench_step.py $*"
  timeout --kill-after=15 "$limit" "$PY" benchmarks/bench_step.py "${SEED[@]}" --label "$name" \
    --json "$OUT/$name.json" "$@" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/$name.log" 2>&1 || rc=$?
  case $rc in
    0) SUMMARY+=("$name: ok") ;;
    3) SUMMARY+=("$name: out of GPU memory") ;;
    124 | 137) SUMMARY+=("$name: timed out after ${limit}s") ;;
    *) SUMMARY+=("$name: failed (exit $rc)") ;;
  esac
  log "$name: exit $rc; last lines of $OUT/$name.log:"
  tail -n 20 "$OUT/$name.log"
}

run_step_bench bf16_compile_ac 210 100 --dtype bf16 --compile --ac --steps "$STEPS" --skip "$SKIP"
run_step_bench bf16_eager_ac 90 50 --dtype bf16 --no-compile --ac --steps "$STEPS" --skip "$SKIP" \
  --profile --profile-steps 2
run_step_bench bf16_compile_noac 150 90 --dtype bf16 --compile --no-ac --steps "$STEPS" --skip "$SKIP"

remaining=$(left)
if [[ ! -f benchmarks/bench_assign.py ]]; then
  SUMMARY+=("bench_assign: benchmarks/bench_assign.py not found")
elif (( remaining < 30 )); then
  SUMMARY+=("bench_assign: skipped, out of time")
else
  limit=$(( remaining < 90 ? remaining : 90 ))
  log "bench_assign: timeout ${limit}s"
  rc=0
  timeout --kill-after=15 "$limit" "$PY" benchmarks/bench_assign.py --device "$DEVICE" \
    --json "$OUT/bench_assign.json" ${ASSIGN_EXTRA[@]+"${ASSIGN_EXTRA[@]}"} > "$OUT/bench_assign.log" 2>&1 || rc=$?
  SUMMARY+=("bench_assign: exit $rc")
  tail -n 30 "$OUT/bench_assign.log"
fi

run_step_bench fp32_eager_ac 110 70 --dtype fp32 --no-compile --ac --steps 12 --skip 3

# ------------------------------------------------------------------------------------ summary
log "summary"
printf '  %s\n' "${SUMMARY[@]}"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json
import sys
from pathlib import Path

rows = []
for path in sorted(Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(path.read_text())
    if "timing" not in r:
        if r.get("status") == "oom":
            rows.append(f"| {r['label']} | out of memory | | | | | |")
        continue
    t, m, c, d = r["timing"], r["memory"], r["config"], r["dtch"]
    if "cuda_max_allocated_mb" in m:
        memory = f"{m['cuda_max_allocated_mb'] / 1024:.1f} GiB ({m['cuda_max_reserved_mb'] / 1024:.1f} reserved)"
    else:
        memory = f"{m['peak_rss_mb'] / 1024:.1f} GiB RSS"
    rows.append(
        f"| {r['label']} | {c['param_dtype']} | {c['compile_applied']} | {c['activation_checkpointing']}"
        f" | {t['median_s']:.3f} | {t['images_per_s']:.1f} | {memory}"
        f" | {d['first_teacher_call_s']:.1f} s + {t['warmup_s']:.1f} s (steps 1–{t['skip']}) |"
    )
if rows:
    print("| variant | dtype | compile | AC | s/step (median) | img/s | peak memory | warm-up (teacher call + steps) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
EOF
log "done; outputs in $OUT"

#!/usr/bin/env bash
# What this package has not yet run on a GPU, in one command: under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh        # from anywhere; needs the package installed (.[dev])
#
# (a) the CUDA tests, `pytest -m cuda` (tests/test_cuda.py): the step on CUDA equals the step
#     on the CPU for every activation, bf16 autocast trains, a checkpoint written on the GPU
#     loads back onto it, latent sharding with one shard runs its collectives over NCCL;
# (b) the Gemma-2-2B-size step benchmark (d_in 2304, d_sae 65536, 4096 tokens, k 40), every
#     contender at the same precision (bf16 autocast, then TF32) and with the same dead
#     latents (0%, then 50%): step time and peak step memory (max_memory_allocated);
# (c) a 2,000-step soak through SAELens's runner, CUDA's max_memory_allocated every 500 steps.
# It ends with one table of all three (benchmarks/gpu_table.py). Every part's JSON and log
# stay in $OUT. The exit status is non-zero if a test failed, a part left no result or the
# soak's memory grew.
#
# Settings, from the environment: PYTHON (.venv/bin/python if there, else python3),
# OUT (a new temporary folder), DEVICE (cuda), PRESET (gemma), REPEATS (5), SOAK_STEPS (2000),
# SOAK_EVERY (500), STEP_OPTIONS (more options for step_time.py, e.g. "--contenders ...").
# To try the script itself without a GPU:
#   DEVICE=cpu PRESET=small SOAK_STEPS=60 SOAK_EVERY=20 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-gemma}
REPEATS=${REPEATS:-5}
SOAK_STEPS=${SOAK_STEPS:-2000}
SOAK_EVERY=${SOAK_EVERY:-500}
read -r -a step_options <<<"${STEP_OPTIONS:-}"
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ] &&
    ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: $PYTHON sees no CUDA device (DEVICE=cpu tries the script on a CPU)" >&2
    exit 2
fi

status=0
started=$SECONDS
part() { echo "gpu_check: $1 ($((SECONDS - started)) s in)" >&2; }

part "(a) the CUDA tests"
"$PYTHON" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    >"$OUT/tests.log" 2>&1 || status=1

for precision in bf16 tf32; do
    for dead in 0 0.5; do
        name="step_${precision}_dead${dead}"
        part "(b) $PRESET-size steps, $precision, dead fraction $dead"
        "$PYTHON" benchmarks/step_time.py --device "$DEVICE" --preset "$PRESET" \
            --precision "$precision" --dead-fraction "$dead" --repeats "$REPEATS" \
            --skip-end-to-end --json "${step_options[@]}" \
            >"$OUT/$name.json" 2>"$OUT/$name.log" || { status=1; rm -f "$OUT/$name.json"; }
    done
done

part "(c) the $SOAK_STEPS-step soak"
# soak.py exits 1 when memory grew, after writing its result: keep that
"$PYTHON" benchmarks/soak.py --device "$DEVICE" --steps "$SOAK_STEPS" --every "$SOAK_EVERY" \
    --json >"$OUT/soak.json" 2>"$OUT/soak.log" || status=1
[ -s "$OUT/soak.json" ] || rm -f "$OUT/soak.json"

part "done"
echo
"$PYTHON" benchmarks/gpu_table.py "$OUT" || status=1
echo
echo "gpu_check: $((SECONDS - started)) s; JSON and logs in $OUT" >&2
exit "$status"

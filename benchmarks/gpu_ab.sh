#!/usr/bin/env bash
# One device call: the CUDA kernels of the working tree against a base copy in the same run (same GPU, same
# SDPA rows), the GPU tests of both CUDA kernels first.
#   here:    rm -rf .ab && mkdir .ab && git archive BASE_COMMIT kernels/cuda | tar -x -C .ab   (.ab is git-ignored)
#   device:  bash benchmarks/gpu_ab.sh OUTDIR .ab/kernels/cuda                        (run carry: [".ab"])
# -> OUTDIR/attend-new.json, attend-base.json (+ bench-*.txt, tests.txt).
# Env: SIZES (default 1x4096,1x32768,1x131072,16x16384), PRESETS (rotation4,rotation-k4v3-match),
#      VARIANTS (QJL rows, default "default"), PVARIANTS (the presets' CUDA variants, new tree; default "default"),
#      BASE_PVARIANTS (the base's: only keys its launcher takes; default "default"), TESTS ("" skips them).
set -uo pipefail
out=${1:?outdir}; base=${2:?base kernels/cuda folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
sizes=${SIZES:-1x4096,1x32768,1x131072,16x16384}
P=${PRESETS:-rotation4,rotation-k4v3-match}
TESTS=${TESTS-tests/kernels/test_cuda_rot.py tests/kernels/test_cuda_qjl.py}
if [ -n "$TESTS" ]; then
  timeout "${TESTS_TIMEOUT:-240}" python -m pytest -p xdist -n 12 -q -m gpu $TESTS -p no:cacheprovider 2>&1 \
    | grep -v -i warn | tail -8 > "$out/tests.txt"
  cat "$out/tests.txt"
fi
bench() {  # tag, preset variants
  python benchmarks/attend_cuda.py --sizes "$sizes" --variants "${VARIANTS:-default}" --presets "$P" \
    --preset-variants "$2" --out "$out/attend-$1.json" > "$out/bench-$1.txt" 2>&1
}
bench new "${PVARIANTS:-default}"
keep=$(mktemp -d) && cp kernels/cuda/* "$keep/" && cp "$base"/* kernels/cuda/
bench base "${BASE_PVARIANTS:-default}"
cp "$keep"/* kernels/cuda/                     # the tree as it came
for t in new base; do echo "== $t"; grep -E "sdpa|cuda" "$out/bench-$t.txt" | grep -v triton; done

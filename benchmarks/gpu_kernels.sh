#!/usr/bin/env bash
# One device call: the CUDA kernel's GPU tests, the attend benchmark and an ncu profile.
#   bash benchmarks/gpu_kernels.sh OUTDIR [TAG] [VARIANTS] [SIZES]
# Env: TESTS (pytest targets, default the CUDA kernel's tests; empty string = skip), NCU=0 to skip ncu,
#      PRESETS (other codecs' presets timed too, e.g. rotation4), PVARIANTS (their CUDA launch variants,
#      e.g. "default;ns=64"), NCU_ROT=1 (ncu of the rotation kernels at 128k, preset NCU_PRESET, default rotation4).
set -uo pipefail
out=${1:?outdir}; tag=${2:-run}; variants=${3:-default}; sizes=${4:-1x4096,1x32768,1x131072,16x16384}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
TESTS=${TESTS-tests/kernels/test_cuda_qjl.py}
if [ -n "$TESTS" ]; then
  python -m pytest -p xdist -n 8 -q -m gpu $TESTS 2>&1 | tail -15 | tee "$out/tests-$tag.txt"
fi
python benchmarks/attend_cuda.py --sizes "$sizes" --variants "$variants" --presets "${PRESETS:-}" ${NOQJL:+--no-qjl} \
    --preset-variants "${PVARIANTS:-default}" \
    --out "$out/attend-$tag.json" 2>&1 | tee "$out/bench-$tag.txt"
if [ "${NCU_ROT:-0}" = 1 ] && command -v ncu >/dev/null; then
  f="$out/ncu-$tag-rot.txt"
  ncu --clock-control none --kernel-name regex:"rot_(prep|split|combine)" --launch-skip 3 --launch-count 3 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section ComputeWorkloadAnalysis --print-details all \
      python benchmarks/attend_cuda.py --once 1x131072 --presets "${NCU_PRESET:-rotation4}" > "$f" 2>&1
  echo "== ncu ${NCU_PRESET:-rotation4}"
  grep -E "rot_|Duration|Achieved Occupancy|Issued Warp|Warp Cycles Per Issued|Registers Per|Eligible Warps|Issue Slots Busy|Executed Ipc A" "$f" | head -40
  grep -iE "pipe|tensor|fma|alu|lsu" "$f" | grep -v "^ *$" | head -30
fi
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  v1=${variants%%;*}
  IFS=';' read -ra nvs <<< "${NCU_VARIANTS:-$v1}"
  for v in "${nvs[@]}"; do
    f="$out/ncu-$tag-$(echo "$v" | tr -c 'a-z0-9=' '_').txt"
    ncu --clock-control none --kernel-name regex:"qjl_(prep|split|combine)" --launch-skip 3 --launch-count 3 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section ComputeWorkloadAnalysis --print-details all \
        python benchmarks/attend_cuda.py --once 1x131072 --variants "$v" > "$f" 2>&1
    echo "== ncu $v"
    grep -E "qjl_|Duration|Achieved Occupancy|Issued Warp|Warp Cycles Per Issued|Registers Per|Eligible Warps|Issue Slots Busy|Executed Ipc A" "$f" | head -40
    grep -iE "pipe|tensor|fma|alu|lsu" "$f" | grep -v "^ *$" | head -40
  done
  ncu --clock-control none --kernel-name regex:qjl_split --launch-skip 1 --launch-count 1 --section SourceCounters \
      -o "$out/split-$tag" python benchmarks/attend_cuda.py --once 1x131072 --variants "$v1" >/dev/null 2>&1
  ncu -i "$out/split-$tag.ncu-rep" --page source --csv --print-source sass > "$out/sass-$tag.csv" 2>&1
  rm -f "$out/split-$tag.ncu-rep"; ls -la "$out"
fi

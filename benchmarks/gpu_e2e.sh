#!/usr/bin/env bash
# One device call (one H200, ~7 min): issue 16 end-to-end re-measure with the prefill shortcuts
# (passes/causal_prefill.py for the fp16 StaticCache, reference.attend_prefill for the compressed caches).
#   bash benchmarks/gpu_e2e.sh OUTDIR
# Parts (each fails soft: its log and JSON stay in OUTDIR whatever the others do):
#   ttft  32k-prompt TTFT, 4 layers: inductor (HF eager prefill) grouped qjl rotation  -> OUTDIR/ttft/
#   full  B=1 128k, 32 layers, synthetic fill: rotation inductor (then grouped as the same-run peer,
#         if --time-limit leaves room)                                                  -> OUTDIR/full/
# Env: PARTS="ttft full" (default both), FULL_MODES (default "rotation inductor grouped"), FULL_LIMIT=200 / TTFT_LIMIT=120 (seconds, e2e.py --time-limit),
#      PY (python, default python), QUICK=1: CPU smoke of this script (e2e.py --quick, tiny model and sizes, no pip).
set -uo pipefail
out=${1:?outdir}; mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ "${QUICK:-0}" = 1 ] || pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"; } || true
git rev-parse HEAD > "$out/head.txt" 2>/dev/null || true
PARTS=${PARTS:-ttft full}
PY=${PY:-python}
if [ "${QUICK:-0}" = 1 ]; then  # tiny shapes: the same parts, flags and report on CPU
  Q=(--quick); TT=192; FL=(--layers 2 --prompts 384); LAY=2
else
  Q=(); TT=32768; FL=(--layers 32 --prompts 131072); LAY=4
fi
declare -A RC
part() {  # name, then the e2e.py arguments
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: python benchmarks/e2e.py $*" | tee "$out/$name.log"
  "$PY" benchmarks/e2e.py "${Q[@]}" "$@" --out-dir "$out/$name" --no-progress >> "$out/$name.log" 2>&1
  RC[$name]=$?
  echo "== $name: rc=${RC[$name]} in $((SECONDS - t0)) s" | tee -a "$out/$name.log"
  tail -25 "$out/$name.log"
}
for p in $PARTS; do
  case $p in
    ttft) part ttft --layers "$LAY" --no-grid --ttft-prompt "$TT" --new-tokens 32 \
            --modes inductor grouped qjl rotation --budget-gib 0 --kv-budget-gib 0 \
            --time-limit "${TTFT_LIMIT:-120}" ;;
    full) part full "${FL[@]}" --batch 1 --fill synthetic --new-tokens 32 \
            --modes ${FULL_MODES:-rotation inductor grouped} --budget-gib 0 --ttft-prompt 0 --kv-budget-gib 0 --time-limit "${FULL_LIMIT:-200}" ;;
    *) echo "unknown part $p (ttft, full)";;
  esac
done
# short table of what came back (from the JSONs; a missing/broken one is said, not fatal)
"$PY" - "$out" <<'PY' || true
import glob, json, os, sys
out = sys.argv[1]
for f in sorted(glob.glob(os.path.join(out, "*", "e2e*.json"))):
    try:
        r = json.load(open(f))
    except Exception as e:  # noqa: BLE001
        print(f"{f}: unreadable ({e})"); continue
    print(f"\n{os.path.relpath(f, out)}")
    for t in r.get("ttft", []):
        ms = f"{t['ttft_s'] * 1e3:.0f} ms" if t.get("status") == "ok" else t.get("status")
        pc = {k: v for k, v in (t.get("pass_counters") or {}).items() if "prefill" in k}
        print(f"  ttft  {t['mode']:<10} {ms:>10}  {pc}  {t.get('error', '')}")
    for t in r.get("runs", []):
        ok = t.get("status") == "ok"
        tok = f"{t['tokens_per_s']:.1f} tok/s" if ok and t.get("tokens_per_s") else t.get("status")
        print(f"  decode {t['mode']:<10} B={t.get('batch')} n={t.get('prompt')} L={t.get('layers')} {tok}  {t.get('error', '')}")
    for m, why in (r.get("skipped_modes") or {}).items():
        print(f"  skipped {m}: {why}")
if not glob.glob(os.path.join(out, "*", "e2e*.json")):
    print("no e2e JSON came back: see the *.log files")
PY
for p in $PARTS; do echo "part $p: rc=${RC[$p]:-not run}"; done

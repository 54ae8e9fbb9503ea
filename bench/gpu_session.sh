#!/usr/bin/env bash
# One GPU session's measurements, in phases that each fit one 10-minute device call.
#   bash bench/gpu_session.sh PHASE DATA_DIR [OUT_DIR]
#   PHASE: accuracy    airbench94, record, davidnet: many seeds each (results/-style JSON files)
#          ablations   tricks leave-one-out (airbench94) and cumulative (davidnet), 5 seeds (~15 min: run twice)
#          ablations-davidnet  tricks leave-one-out (davidnet), 5 seeds (~18 min: run twice)
#          compile     airbench94 and record compiled (max-autotune), 10 runs each: the compiled times
#          profile     per-kernel breakdown and FLOPs of each preset
#          peers       ours against the airbench package
#          tta-check   airbench94 seeds 0-4 trained with --save, each evaluated here in fp16 and fp32, with
#                      the CPU-trained results/weights/*.pt; evaluate the GPU's weight files on the CPU
#                      afterwards (bench/evaluate.py --device cpu) to see whether the CPU's smaller TTA
#                      gain comes from evaluation or from training
# Each command runs under its own time limit (seconds, below; SIGTERM keeps every finished run),
# so a phase ends inside its call. Extra speedrun flags for every command go in $EXTRA
# (e.g. EXTRA="--compile"). Study folders live in runs/studies/ (ignored, so they stay on a warm
# machine between calls): a phase run again resumes them. At the end everything under OUT_DIR,
# the study folders included, is packed into OUT_DIR.tgz, since a device call returns few files.
set -uo pipefail
usage() {  # the comment above, as the help
  sed -n '2,/^set -uo pipefail$/p' "$0" | sed '$d' | sed -e 's/^# \{0,1\}//' -e '1s/^/gpu_session.sh: /' \
    -e '2s/^ *bash /usage: bash /'
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  ""|-*) usage >&2; echo "error: give a PHASE and a DATA_DIR (the usage is above)" >&2; exit 2 ;;
esac
if [ $# -lt 2 ]; then
  echo "error: give the DATA_DIR after the phase: bash bench/gpu_session.sh $1 DATA_DIR [OUT_DIR] (see --help)" >&2
  exit 2
fi
phase=$1
data=$2
out=${3:-runs/gpu-session}
extra=${EXTRA:-}
cd "$(dirname "$0")/.."
# The scripts import speedrun and speedrun_tools from this checkout, installed or not (a bare GPU machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
PY

limited() {  # limited SECONDS NAME COMMAND...: run, logging to OUT_DIR/NAME.log, stopped after SECONDS
  local seconds=$1 name=$2; shift 2
  echo "== $name (at most ${seconds} s): $*"
  timeout -s TERM -k 20 "$seconds" "$@" $extra 2>&1 | tee "$out/$name.log" | grep -v "^  step " | tail -n 40
}

case "$phase" in
  accuracy)
    limited "${AIRBENCH_S:-170}" airbench94 python3 speedrun.py --preset airbench94 --data-dir "$data" \
      --runs "${AIRBENCH_RUNS:-25}" --out "$out/airbench94-gpu.json"
    limited "${RECORD_S:-150}" record python3 speedrun.py --preset record --data-dir "$data" \
      --runs "${RECORD_RUNS:-25}" --out "$out/record-gpu.json"
    limited "${DAVIDNET_S:-200}" davidnet python3 speedrun.py --preset davidnet --data-dir "$data" \
      --runs "${DAVIDNET_RUNS:-8}" --out "$out/davidnet-gpu.json" ;;
  ablations)
    limited "${LOO_AIRBENCH_S:-280}" tricks-airbench94 python3 ablations/tricks.py --preset airbench94 \
      --data-dir "$data" --runs 5 --study runs/studies/tricks-airbench94-gpu
    limited "${CUMULATIVE_S:-280}" cumulative-davidnet python3 ablations/tricks.py --mode cumulative \
      --data-dir "$data" --runs 5 --study runs/studies/tricks-cumulative-davidnet-gpu
    cp -r runs/studies "$out/" ;;
  ablations-davidnet)
    limited "${LOO_DAVIDNET_S:-560}" tricks-davidnet python3 ablations/tricks.py --data-dir "$data" --runs 5 \
      --study runs/studies/tricks-davidnet-gpu
    cp -r runs/studies "$out/" ;;
  compile)
    for p in airbench94 record; do
      limited 270 "$p-compiled" python3 speedrun.py --preset "$p" --compile --compile-mode max-autotune \
        --data-dir "$data" --runs 10 --out "$out/$p-gpu-compiled.json"
    done ;;
  profile)
    for p in davidnet airbench94 record; do
      limited 150 "trace-$p" python3 profile/torch_trace.py --preset "$p" --data-dir "$data" --trace-dir "$out/trace-$p"
    done ;;
  peers)
    python3 -c "import airbench" 2>/dev/null || \
      python3 -m pip install -q --no-deps --no-build-isolation runs/vendor/airbench-0.1.8.tar.gz
    limited 500 peers python3 bench/peers.py --presets davidnet,airbench94,record --runs 10 --data-dir "$data" \
      --out "$out/peers.json" ;;
  tta-check)
    for seed in 0 1 2 3 4; do
      limited 60 "airbench94-seed$seed" python3 speedrun.py --preset airbench94 --data-dir "$data" --seed "$seed" \
        --out "$out/airbench94-seed$seed.json" --save "$out/airbench94-seed$seed.pt"
    done
    # with them, a network trained on the CPU (results/weights/): the reverse direction
    for precision in fp16 fp32; do
      python3 bench/evaluate.py "$out"/airbench94-seed*.pt results/weights/*.pt --data-dir "$data" \
        --precision "$precision" --out "$out/evaluate-gpu-$precision.json"
    done ;;
  *) echo "unknown phase $phase: accuracy | ablations | ablations-davidnet | compile | profile | peers | tta-check" >&2; exit 2 ;;
esac
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && echo "packed $out.tgz"

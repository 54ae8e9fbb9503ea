#!/usr/bin/env bash
# The measurements issue 5 asks for, in phases that each fit one 10-minute device call.
#   bash bench/gpu_session.sh PHASE DATA_DIR [OUT_DIR]
#   PHASE: accuracy (davidnet x20, airbench94 x20, record x50) | profile (breakdown, FLOPs) | peers (vs airbench94)
# Extra speedrun flags for every command go in $EXTRA (e.g. EXTRA="--compile").
# Each phase ends with a short table; every result is also kept as JSON under OUT_DIR.
set -euo pipefail
phase=${1:?usage: gpu_session.sh accuracy|profile|peers DATA_DIR [OUT_DIR]}
data=${2:?usage: gpu_session.sh PHASE DATA_DIR [OUT_DIR]}
out=${3:-runs/gpu-session}
extra=${EXTRA:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
stamp=$(date +%H%M%S)
python3 - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
PY

summarize() {  # one line per JSON result: preset, runs, accuracy, fraction at 94%, p, time
  python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
    s, c = r["summary"], r["config"]
    t = s["time_to_target_mean_s"]
    print(f"{path}: {s['runs']} runs, acc {100 * s['acc_mean']:.2f}% +- {100 * (s['acc_std'] or 0):.2f}, "
          f"{100 * s['frac_at_target']:.0f}% >= {100 * s['target_acc']:g}%, p={s['p_value']}, "
          f"time-to-target {t if t is None else round(t, 3)} s +- {s['time_to_target_std_s']}, "
          f"data load {r['data_load_s']:.2f} s, warm-up {r['warmup_s']:.2f} s; {r['environment']['device_name']}")
PY
}

case "$phase" in
  accuracy)
    python3 speedrun.py --data-dir "$data" --runs 20 --quiet --out "$out/davidnet-$stamp.json" $extra
    python3 speedrun.py --preset airbench94 --data-dir "$data" --runs 20 --quiet --out "$out/airbench94-$stamp.json" $extra
    python3 speedrun.py --preset record --data-dir "$data" --runs 50 --quiet --out "$out/record-$stamp.json" $extra
    summarize "$out/davidnet-$stamp.json" "$out/airbench94-$stamp.json" "$out/record-$stamp.json" ;;
  profile)
    python3 profile/torch_trace.py --data-dir "$data" --trace-dir "$out/trace-davidnet-$stamp" $extra
    python3 profile/torch_trace.py --preset airbench94 --data-dir "$data" --trace-dir "$out/trace-airbench94-$stamp" $extra
    python3 profile/torch_trace.py --preset record --data-dir "$data" --trace-dir "$out/trace-record-$stamp" $extra
    for r in "$out"/davidnet-*.json "$out"/airbench94-*.json "$out"/record-*.json; do
      [ -f "$r" ] && python3 profile/flops.py --result "$r" $extra
    done ;;
  peers)
    python3 -c "import airbench" 2>/dev/null || \
      python3 -m pip install -q --no-deps --no-build-isolation runs/vendor/airbench-0.1.8.tar.gz
    python3 bench/peers.py --presets davidnet,airbench94,record --runs 10 --data-dir "$data" --out "$out/peers-$stamp.json" $extra ;;
  *) echo "unknown phase $phase: accuracy | profile | peers" >&2; exit 2 ;;
esac

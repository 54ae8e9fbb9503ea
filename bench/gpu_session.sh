#!/usr/bin/env bash
# One device call's GPU measurements (issue 25), in the issue's order, each under its own time limit
# inside an overall deadline (default: the call ends within ~6 minutes on an H100/H200), then packed
# into at most 8 files for the call to return. The items, their limits and the call each is planned
# for are in bench/gpu_session.py (and --help); the device-time plan is in docs/performance.md.
#   bash bench/gpu_session.sh DATA_DIR [OUT_DIR] [--items A,B,...] [--deadline S] [--rehearse]
#   on the device:  bash bench/gpu_session.sh /root/cifar10 $OUT            (call 1: record, peers)
#                   bash bench/gpu_session.sh /root/cifar10 $OUT --items fulcrum_e1 --deadline 150   (call 2)
#   here:           REHEARSE=1 bash bench/gpu_session.sh ~/.cache/cifar10   (every item tiny, on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
# The scripts import speedrun and speedrun_tools from this checkout, installed or not (a bare GPU machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_session.py "$@"

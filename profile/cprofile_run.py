#!/usr/bin/env python3
"""Run one training (speedrun's flags) under cProfile; write a .prof file and print where the
host's time goes.

    python profile/cprofile_run.py --preset cpu                  # writes traces/cprofile-<time>.prof
    python profile/cprofile_run.py --preset cpu --prof run.prof --top 30
    snakeviz run.prof                                            # pip install snakeviz; opens a browser
    python -m pstats run.prof                                    # then e.g. `sort cumtime`, `stats 20`

The profiled call is speedrun.run_many (whitening, training, per-epoch evaluation, and the
compile warm-up when --compile is on); reading the data and torch's one-time lazy imports
happen before it and are reported apart. Functions of this repository are marked '>>' in the tables.
"""
from __future__ import annotations

import cProfile
import dataclasses
import os
import pstats
import sys
import time
from pathlib import Path

import torch

import _common
from _common import ROOT, speedrun, speedrun_tools

PROJECT_MARK = ">>"


def add_flags(group) -> None:
    group.add_argument("--prof", type=Path, metavar="PATH", default=None,
                       help="profile file to write (default: traces/cprofile-<time>.prof); never overwritten")
    group.add_argument("--top", type=int, metavar="N", default=20, help="rows in each printed table (default: 20)")


def is_project(filename: str) -> bool:
    """True for a function defined in this repository (speedrun.py, profile/, ...), not in a library."""
    if filename.startswith(("<", "~")):
        return False
    path = Path(filename).resolve()
    return path.is_relative_to(ROOT) and "site-packages" not in path.parts


def function_name(key: tuple) -> str:
    """A short readable name: 'speedrun.py:792 train', 'torch/nn/modules/conv.py:553 forward',
    or '<built-in> torch.conv2d'."""
    filename, line, func = key
    if filename == "~":
        inner = func.strip("{}<>").replace("built-in method ", "").replace("method ", "")
        return f"<built-in> {inner}"
    path = Path(filename)
    if is_project(filename):
        shown = path.resolve().relative_to(ROOT).as_posix()
    elif "site-packages" in path.parts:
        shown = Path(*path.parts[path.parts.index("site-packages") + 1:]).as_posix()
    else:
        shown = Path(*path.parts[-2:]).as_posix()
    return f"{shown}:{line} {func}"


def table(stats: pstats.Stats, order: str, top: int, project_only: bool = False) -> list[str]:
    """Rows sorted by 'cumulative' or 'own' time, as text lines with a header."""
    total = max([stats.total_tt, *(v[3] for v in stats.stats.values())]) or 1e-12
    rows = [(key, nc, tt, ct) for key, (cc, nc, tt, ct, callers) in stats.stats.items()
            if not project_only or is_project(key[0])]
    rows.sort(key=lambda r: r[3] if order == "cumulative" else r[2], reverse=True)
    lines = [f"   {'cum s':>8} {'cum %':>6} {'own s':>8} {'own %':>6} {'calls':>8}  function"]
    for key, calls, own, cum in rows[:top]:
        mark = PROJECT_MARK if is_project(key[0]) else ""
        lines.append(f"{mark:>2} {cum:8.3f} {100 * cum / total:6.1f} {own:8.3f} {100 * own / total:6.1f} "
                     f"{calls:8d}  {function_name(key)}")
    return lines


def report(stats: pstats.Stats, top: int) -> list[str]:
    lines = [f"total profiled time {stats.total_tt:.2f} s; {PROJECT_MARK} = a function of this repository", "",
             f"top {top} by cumulative time (the function and everything it calls):"]
    lines += table(stats, "cumulative", top)
    lines += ["", f"top {top} by own time (excluding the functions it calls):"]
    lines += table(stats, "own", top)
    lines += ["", "this repository's functions by cumulative time:"]
    lines += table(stats, "cumulative", top, project_only=True)
    return lines


def main(argv=None) -> int:
    parser, args, cfg, device = _common.parse_args(__doc__, add_flags, argv, outputs=True)
    if args.top < 1:
        parser.exit(2, f"error: --top must be at least 1, got {args.top}\n")
    try:
        prof_path = speedrun.reserve(args.prof or Path("traces") / f"cprofile-{speedrun.timestamp()}.prof", "--prof",
                                     numbered=args.prof is None)
        for path, flag in ((args.out, "--out"), (args.save, "--save")):
            if path is not None:
                speedrun.reserve(path, flag)
    except ValueError as e:
        speedrun.release_outputs()
        parser.exit(2, f"error: {e}\n")
    if cfg.workers != 1:  # cProfile sees this process only: keep every run in it
        if cfg.workers > 1:
            print(f"note: --workers {cfg.workers} ignored; under cProfile all runs stay in this process")
        cfg = dataclasses.replace(cfg, workers=1)
    log = speedrun_tools.log_lines(args.quiet)
    data = _common.load_data(parser, cfg, device, args)

    # torch imports parts of itself lazily on first use (building the first optimizer imports
    # torch._dynamo, about a second); do that here so the profile shows training, not imports.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    try:
        result = profiler.runcall(speedrun.run_many, cfg, log, data)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    wall_s = time.perf_counter() - t0
    speedrun.write_atomic(prof_path, lambda tmp: profiler.dump_stats(os.fspath(tmp)))
    if args.out:
        speedrun.save_json(result, args.out)
    if args.save:
        speedrun.save_weights(result["model"], cfg, args.save)

    run = result["runs"][-1]
    print(f"\n{_common.describe_machine(device)}")
    print(f"command: {speedrun_tools.command_line(__file__, argv)}")
    print(f"data loading (not profiled) {data.load_s:.2f} s; speedrun.run_many under cProfile {wall_s:.2f} s "
          f"(the trainer's own timer: whitening + training {run['whitening_s'] + run['train_s']:.2f} s in the last run; "
          f"cProfile slows Python-heavy code)")
    if device.type == "cuda":
        print("CUDA runs asynchronously: GPU time shows up in the call that waits for it (.item(), synchronize), "
              "not in the op that queued it; profile/torch_trace.py shows GPU time per operator.")
    print()
    print("\n".join(report(pstats.Stats(profiler, stream=sys.stdout), args.top)))
    print(f"\nprofile written to {prof_path}\n  open it with:  snakeviz {prof_path}   (pip install snakeviz)"
          f"\n  or:            python -m pstats {prof_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

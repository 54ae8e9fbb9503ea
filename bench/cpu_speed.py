#!/usr/bin/env python3
"""Training-step speed of each preset on the CPU in fp32 / bf16 and NCHW / channels_last,
measured side by side in one process, as a markdown table with each cell's ratio to fp32 NCHW.

    python bench/cpu_speed.py                            # davidnet, airbench94, record: batch 256, 3 steps
    python bench/cpu_speed.py --presets airbench94 --batch-size 128 --steps 5 --repeats 3

Each cell builds the preset's real network and optimizer (speedrun.TrainingSetup) at the given
batch size and times speedrun's own step function (forward, backward, optimizer step) on random
images, after one untimed step. The repeats go round every cell in turn, so slow drift of a shared
machine falls on every cell alike; the table gives the median seconds per step and images/s. Only
the step's speed is measured: whether a precision reaches the same accuracy is for full-scale runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)


CELLS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def step_seconds(cfg: speedrun.Config, steps: int) -> float:
    """Seconds per training step of cfg on random images (one untimed step first)."""
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    n = 2 * cfg.batch_size
    data = speedrun.DeviceData(torch.randn(n, 3, 32, 32, generator=g).to(speedrun.compute_dtype(cfg, device)),
                               torch.randint(0, 10, (n,), generator=g), torch.zeros(1, 3, 32, 32),
                               torch.zeros(1, dtype=torch.long), 0.0)
    setup = speedrun.TrainingSetup(cfg, data, device, seed=0)
    x, y = setup.epoch_batches(data, 0)
    b = cfg.batch_size
    setup.step_fn(x[:b], y[:b])
    t0 = time.perf_counter()
    for i in range(steps):
        k = i % 2
        setup.step_fn(x[k * b:(k + 1) * b], y[k * b:(k + 1) * b])
    return (time.perf_counter() - t0) / steps


def measure(presets: list[str], batch_size: int, steps: int, repeats: int, precisions=("fp32", "bf16")) -> dict:
    configs = {}
    for preset in presets:
        base = speedrun.make_config(preset, device="cpu")
        splits = min(base.ghost_bn_splits, batch_size)  # keep whole ghost-BN groups at a smaller batch
        for precision, channels_last in [c for c in CELLS if c[0] in precisions]:
            configs[preset, precision, channels_last] = dataclasses.replace(
                base, batch_size=batch_size, ghost_bn_splits=splits if batch_size % splits == 0 else 1,
                precision=precision, channels_last=channels_last)
    times = {key: [] for key in configs}
    for r in range(repeats):
        for key, cfg in configs.items():
            times[key].append(step_seconds(cfg, steps))
            print(f"repeat {r + 1}/{repeats} {key[0]} {key[1]} {'channels_last' if key[2] else 'NCHW'}: "
                  f"{times[key][-1]:.3f} s/step", file=sys.stderr, flush=True)
    return {key: statistics.median(v) for key, v in times.items()}


def table(medians: dict, batch_size: int) -> list[str]:
    rows = []
    for (preset, precision, channels_last), s in medians.items():
        ratio = medians[preset, "fp32", False] / s if (preset, "fp32", False) in medians else float("nan")
        rows.append([preset, precision, "channels_last" if channels_last else "NCHW", f"{s:.3f}",
                     f"{batch_size / s:,.0f}", f"{ratio:.2f}x"])
    return speedrun_tools.markdown_table(["preset", "precision", "memory format", "s/step (median)", "images/s",
                                    "vs fp32 NCHW"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="davidnet,airbench94,record", help="comma-separated presets (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step in every cell (default: 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell and repeat (default: 3)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over every cell (default: 1)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated precisions to measure (default: fp32,bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's choice)")
    args = p.parse_args(argv)
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    unknown = [s for s in presets if s not in speedrun.PRESETS]
    precisions = tuple(s.strip() for s in args.precisions.split(","))
    if not set(precisions) <= {"fp32", "bf16"}:
        p.exit(2, "error: --precisions takes fp32 and/or bf16\n")
    if unknown or args.batch_size < 1 or args.steps < 1 or args.repeats < 1:
        p.exit(2, f"error: unknown preset {unknown[0]!r}; choose from {', '.join(speedrun.PRESETS)}\n" if unknown else
               "error: --batch-size, --steps and --repeats must be at least 1\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = speedrun.environment(torch.device("cpu"))
    print(f"{speedrun_tools.machine_line(env)}; batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats per cell\n")
    print("\n".join(table(measure(presets, args.batch_size, args.steps, args.repeats, precisions), args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Profile a few training steps with torch.profiler: a Chrome/Perfetto trace, a TensorBoard
trace, and a table and bar chart of time by operator category.

    python profile/torch_trace.py --preset cpu                 # writes traces/trace-<time>/
    python profile/torch_trace.py --trace-steps 20 --trace-dir traces/h100

The profiled window is one of each kind of work a run does, after a warm-up: the whitening
init, the augmentation and shuffle of one epoch, --trace-steps training steps (speedrun.train_epoch on
the first batches, EMA included) and one EMA+TTA evaluation of
--trace-eval-images test images. The table gives each category's time in that window and an
estimate for one timed run (whitening + every epoch + one evaluation of the whole test set),
each row scaled by how often its work happens in a run.

Time of a category: on CPU, the time spent in its operators' own code (children excluded);
on CUDA, the GPU time of the kernels its operators launched. With --compile, fused kernels
run under the compiled graph rather than named operators and land in "other training-step ops".
Open trace.json at https://ui.perfetto.dev or chrome://tracing, and the tensorboard/ folder
with `tensorboard --logdir DIR/tensorboard` (pip install torch-tb-profiler).
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import _common
from _common import speedrun, speedrun_tools

WINDOW = "speedrun: profiled window"
REGIONS = {"speedrun: whitening": "whitening", "speedrun: augmentation": "augment",
           "speedrun: ema": "ema", "speedrun: evaluation": "eval"}
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
# Operator-name fragments (lower case) of each category; the first match up the call chain wins.
KEYWORDS = [("conv", ("conv", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mmbackward")),
            ("bn", ("batch_norm", "batchnorm", "var_mean", "varmean", "rsqrt")),  # the last: ghost BN on channels_last
            ("act", ("elu", "relu", "silu")),  # 'elu' also matches celu and gelu
            ("pool", ("max_pool", "maxpool", "amax")),
            ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "nllloss"))]
CATEGORIES = {"conv": "convolutions (+ linear head)", "bn": "batch norm", "act": "activations", "pool": "pooling",
              "loss": "loss", "other": "other training-step ops", "optimizer": "optimizer step", "ema": "EMA",
              "augment": "augmentation", "eval": "evaluation / TTA", "whitening": "whitening init",
              "host": "host overhead / idle gaps"}
PER_STEP = ("conv", "bn", "act", "pool", "loss", "other", "optimizer", "ema", "host")
ADD_UP_TOLERANCE = 0.05  # the rows must sum to the window's wall-clock time within 5%
HOST_MEANING = {
    "cpu": "on CPU every operator runs on the host: 'host overhead / idle gaps' is the window's wall time "
           "inside no recorded operator (Python, the loop, dispatch between ops); idle cannot be told apart from it",
    "cuda": "on CUDA 'host overhead / idle gaps' is the window's wall time in which no kernel or copy ran on the GPU "
            "(the GPU waiting for Python, kernel launches or a synchronisation)",
}


def add_flags(group) -> None:
    group.add_argument("--trace-steps", type=int, metavar="N", default=10, help="training steps in the profiled window (default: 10)")
    group.add_argument("--trace-warmup", type=int, metavar="N", default=3, help="untraced training steps before the window (default: 3)")
    group.add_argument("--trace-eval-images", type=int, metavar="N", default=0,
                       help="test images evaluated in the window (default 0: one evaluation batch)")
    group.add_argument("--trace-dir", type=Path, metavar="DIR", default=None,
                       help="folder for the traces, table and chart (default: traces/trace-<time>); must be new or empty")


def category_of(event) -> str:
    """The category of an operator: its innermost enclosing region if any (augmentation, EMA,
    optimizer, ...), else the first name up its call chain that matches a keyword, else 'other'."""
    chain = []
    node = event
    while node is not None:
        chain.append(node.name)
        node = node.cpu_parent
    for name in chain:
        if name in REGIONS:
            return REGIONS[name]
        if name.startswith(OPTIMIZER_PREFIXES):
            return "optimizer"
    for name in chain:
        low = name.lower()
        for category, fragments in KEYWORDS:
            if any(f in low for f in fragments):
                return category
    return "other"


def union_length(intervals) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def breakdown(events, device_type: str) -> dict:
    """Microseconds per category in the profiled window, from the profiler's events."""
    window = next(e for e in events if e.name == WINDOW)
    w0, w1 = window.time_range.start, window.time_range.end
    times = dict.fromkeys(CATEGORIES, 0.0)
    inside = [e for e in events if e.device_type == DeviceType.CPU and e is not window
              and w0 <= e.time_range.start and e.time_range.end <= w1]
    if device_type == "cuda":
        for e in inside:
            own_kernels = sum(k.duration for k in e.kernels if k.name not in REGIONS and k.name != WINDOW)
            times[category_of(e)] += own_kernels
        gpu = [(max(e.time_range.start, w0), min(e.time_range.end, w1)) for e in events
               if e.device_type == DeviceType.CUDA and e.name not in REGIONS and e.name != WINDOW
               and not e.name.startswith(OPTIMIZER_PREFIXES)]
        times["host"] = (w1 - w0) - union_length([(a, b) for a, b in gpu if b > a])
    else:
        for e in inside:
            if e.thread == window.thread:
                times[category_of(e)] += e.self_cpu_time_total
        times["host"] = window.self_cpu_time_total
    return times


def profile_window(cfg, data, device, steps: int, warmup: int, eval_images: int):
    """Runs the warm-up, then the profiled window; returns (profiler, window wall seconds)."""
    setup = speedrun.TrainingSetup(cfg, data, device, cfg.seed)
    dtype, model, step_fn = setup.dtype, setup.model, setup.step_fn
    ema = setup.make_ema()
    _, eval_forward = setup.evaluated(ema)
    test_x = data.test_x[:eval_images]
    b = setup.local_batch

    model.train()
    warm_x = setup.in_layout(data.train_x[:b])  # the window's memory layout, so that nothing recompiles there
    for i in range(warmup):  # first-call allocations, cuDNN autotuning, compilation
        step_fn(warm_x, data.train_y[:b])
    speedrun.predict(eval_forward, test_x[:cfg.eval_batch_size], cfg, device, dtype)
    speedrun.synchronize(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        with record_function(WINDOW):
            with record_function("speedrun: whitening"):
                speedrun.init_whitening(model, data.train_x, cfg)
            x, y = setup.epoch_batches(data, 0)  # labelled "speedrun: augmentation" inside
            speedrun.train_epoch(setup, ema, x[:steps * b], y[:steps * b], warmup)
            with record_function("speedrun: evaluation"):
                speedrun.predict(eval_forward, test_x, cfg, device, dtype)
            speedrun.synchronize(device)
        wall_s = time.perf_counter() - t0
    return prof, wall_s


def full_run_factors(cfg, data, steps: int, eval_images: int) -> dict:
    """How many times each category's window work happens in one timed run."""
    n_batches = data.train_x.shape[0] // cfg.batch_size
    run_steps = speedrun.epochs_to_steps(cfg.epochs, n_batches)
    factors = {c: run_steps / steps for c in PER_STEP}
    factors.update(augment=math.ceil(run_steps / n_batches), eval=data.test_x.shape[0] / eval_images, whitening=1.0)
    return factors


def format_table(times_us: dict, factors: dict, wall_s: float, device_type: str) -> list[str]:
    total_ms = sum(times_us.values()) / 1e3
    run_s = {c: times_us[c] * factors[c] / 1e6 for c in CATEGORIES}
    run_total = sum(run_s.values()) or 1e-12
    lines = [f"{'category':<30} {'window ms':>10} {'window %':>9} {'run est. s':>11} {'run %':>7}"]
    for c, label in CATEGORIES.items():
        ms = times_us[c] / 1e3
        lines.append(f"{label:<30} {ms:10.2f} {100 * ms / (total_ms or 1e-12):9.1f} {run_s[c]:11.3f} "
                     f"{100 * run_s[c] / run_total:7.1f}")
    gap = abs(total_ms / 1e3 - wall_s) / wall_s
    lines += [f"{'sum of the rows':<30} {total_ms:10.2f} {100.0:9.1f} {run_total:11.3f} {100.0:7.1f}",
              f"{'wall clock of the window':<30} {1e3 * wall_s:10.2f}",
              f"the rows add up to the window's wall-clock time within {100 * gap:.2f}% "
              f"(tolerance {100 * ADD_UP_TOLERANCE:.0f}%)",
              HOST_MEANING.get(device_type, HOST_MEANING["cpu"])]
    return lines


def write_traces(prof, trace_dir: Path) -> tuple[Path, Path]:
    chrome = trace_dir / "trace.json"
    speedrun.write_atomic(chrome, lambda tmp: prof.export_chrome_trace(os.fspath(tmp)))
    # The TensorBoard profiler plugin reads <logdir>/<run>/<worker>.pt.trace.json.
    board = trace_dir / "tensorboard" / "speedrun" / f"{socket.gethostname()}_{os.getpid()}.pt.trace.json"
    speedrun.write_atomic(board, lambda tmp: shutil.copyfile(chrome, tmp))
    return chrome, board


def main(argv=None) -> int:
    parser, args, cfg, device = _common.parse_args(__doc__, add_flags, argv)
    for name, least in (("trace_steps", 1), ("trace_warmup", 0), ("trace_eval_images", 0)):
        if getattr(args, name) < least:
            parser.exit(2, f"error: --{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}\n")
    try:
        trace_dir = speedrun.reserve(args.trace_dir or Path("traces") / f"trace-{speedrun.timestamp()}", "--trace-dir",
                                     folder=True, numbered=args.trace_dir is None)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    data = _common.load_data(parser, cfg, device, args)
    n_train, n_test = data.train_x.shape[0], data.test_x.shape[0]
    if args.trace_steps * cfg.batch_size > n_train:
        parser.exit(2, f"error: --trace-steps {args.trace_steps} x batch size {cfg.batch_size} needs {args.trace_steps * cfg.batch_size} "
                       f"training images, but there are {n_train}; lower --trace-steps or raise --subset\n")
    eval_images = min(args.trace_eval_images or cfg.eval_batch_size, n_test)

    prof, wall_s = profile_window(cfg, data, device, args.trace_steps, args.trace_warmup, eval_images)
    times_us = breakdown(prof.events(), device.type)
    factors = full_run_factors(cfg, data, args.trace_steps, eval_images)
    chrome, board = write_traces(prof, trace_dir)

    tta = f"{cfg.tta} TTA" if cfg.tta != "none" else "no TTA"
    lines = [_common.describe_machine(device), f"command: {speedrun_tools.command_line(__file__, argv)}",
             f"profiled window: whitening init ({min(cfg.whiten_samples, n_train) if cfg.whiten else 0} images), "
             f"augmentation of one epoch ({n_train} images), {args.trace_steps} training steps of {cfg.batch_size}, "
             f"evaluation of {eval_images} test images ({tta}); 'run est.' = one timed run of {speedrun.plural(cfg.epochs, 'epoch')} "
             f"on {n_train} images + one evaluation of {n_test}", ""]
    lines += format_table(times_us, factors, wall_s, device.type)
    text = "\n".join(lines)
    print(text)
    _common.write_text(trace_dir / "breakdown.txt", text + "\n")
    record = dict(device=str(device), machine=_common.describe_machine(device), command=speedrun_tools.command_line(__file__, argv),
                  window_wall_s=wall_s, window_us=times_us, run_factors=factors,
                  add_up_tolerance=ADD_UP_TOLERANCE, labels=CATEGORIES)
    speedrun.save_json(record, trace_dir / "breakdown.json")
    run_s = [times_us[c] * factors[c] / 1e6 for c in CATEGORIES]
    chart = _common.bar_chart(trace_dir / "breakdown.png", list(CATEGORIES.values()), run_s,
                              f"Estimated time of one run by category\npreset {args.preset}, width {cfg.width:g}, batch "
                              f"{cfg.batch_size}, {data.train_x.shape[0]:,} training images, {speedrun.plural(cfg.epochs, 'epoch')}\n"
                              f"{_common.describe_machine(device)}",
                              "seconds per run (estimate)")
    print(f"\n{chart}\ntrace for Perfetto (https://ui.perfetto.dev) or chrome://tracing: {chrome}"
          f"\ntrace for TensorBoard: tensorboard --logdir {board.parent.parent}   (pip install torch-tb-profiler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

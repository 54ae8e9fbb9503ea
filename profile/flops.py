#!/usr/bin/env python3
"""Count the FLOPs of one training run and, given its measured time, the achieved TFLOP/s and
the fraction of the device's peak: our distance to the physical limit.

    python profile/flops.py                               # the davidnet run's FLOPs and this device's peak
    python profile/flops.py --seconds 3.41                # ... and achieved TFLOP/s for a run that took 3.41 s
    python profile/flops.py --result runs/X.json          # time, epochs and config from a speedrun result
    python profile/flops.py --preset cpu --train          # train once here and use that run's time

Counting convention: convolutions and matrix products, as torch.utils.flop_counter counts them
(a multiply-add is 2 FLOPs), from one real forward and backward pass of the configured network
on the meta device (shapes only, no arithmetic). Batch norm, activations, pooling and other
elementwise work are not counted, except the optimizer step and the EMA, estimated per
parameter; they are a tiny share. The peak is measured here with a large matrix product in
the run's compute dtype on the same device, not taken from a datasheet: run this script on
the machine that produced the measured time.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import _common
from _common import speedrun, speedrun_tools

# Elementwise FLOPs per trainable parameter per step (a multiply-add = 2), one entry per name of
# speedrun.OPTIMIZERS: weight decay 2, momentum 2, update 2, Nesterov's look-ahead 2 (Muon's
# elementwise work is Nesterov's; its Newton-Schulz products are counted as matrix products);
# Adam-type: decay 2, first moment 3, second moment 4, bias correction, square root, division and
# update about 5.
OPTIMIZER_FLOPS_PER_PARAM = {"sgd": 6, "nesterov": 8, "muon": 8, "adam": 14, "adamw": 14, "rmsprop": 13, "adagrad": 9,
                             "adadelta": 15}
EMA_FLOPS_PER_ELEMENT = 3  # lerp: e + w * (m - e)
PATCH_SAMPLE = 16  # images whose whitening FLOPs are counted, then scaled to whiten_samples


def add_flags(group) -> None:
    group.add_argument("--seconds", type=float, metavar="S", default=None, help="measured time of the run, in seconds")
    group.add_argument("--result", type=Path, metavar="JSON", default=None,
                       help="a speedrun JSON result: takes its config, its runs' times and epochs to the target")
    group.add_argument("--train", action="store_true", help="train once here with the given flags and use its time")
    group.add_argument("--peak-size", type=int, metavar="N", default=0,
                       help="side of the square matrices of the peak measurement (default 0: 8192 on CUDA, 2048 elsewhere)")
    group.add_argument("--json", type=Path, metavar="PATH", default=None, help="also write the counts and rates to this JSON file")


def training_step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> dict:
    """Forward and backward FLOPs of one training step of `model` on the batch (x, y)."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss_fn(out, y).backward()
    return dict(forward=forward, backward=counter.get_total_flops())


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def whitening_flops(cfg) -> int:
    if not cfg.whiten:
        return 0
    sample = torch.zeros(PATCH_SAMPLE, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        speedrun.whitening_filters(sample, cfg.whiten_kernel, cfg.whiten_eps)
    n = min(cfg.whiten_samples, speedrun.image_counts(cfg)[0])
    return counter.get_total_flops() * n // PATCH_SAMPLE


def orthogonalization_flops(model: nn.Module, cfg, steps: int) -> int:
    """Matrix-product FLOPs of one step's Newton-Schulz iterations: those of the optimizer's
    groups marked 'orthogonalize' (Muon's filter banks), counted on the meta device; 0 for
    optimizers that have none."""
    opt = speedrun.build_optimizer(model, cfg, steps, bias_steps=0)  # the whitening bias is never orthogonalised
    mats = [p.reshape(p.shape[0], -1) for g in opt.param_groups if g.get("orthogonalize") for p in g["params"]]
    if not mats:
        return 0
    with FlopCounterMode(display=False) as counter:
        speedrun.orthogonalize_all(mats, cfg.muon_ns_steps, speedrun.NS_COEFFICIENTS[cfg.muon_ns_coeffs])
    return counter.get_total_flops()


def ema_updates(cfg, model: nn.Module, steps: int, n_batches: int) -> int:
    """How often the run's EMA blends in `steps` steps, asked of speedrun's own EMA (its due())."""
    if not cfg.ema:
        return 0
    start = speedrun.epochs_to_steps(cfg.ema_start_epochs, n_batches)
    ema = speedrun.EMA_KINDS[cfg.ema_mode](model, cfg, steps, start)  # on the meta device: a copy of nothing
    done, updates = 0, 0
    for n in speedrun.epoch_steps(steps, n_batches):
        for batch in range(n):
            done += 1
            updates += ema.due(done, batch)
    return updates


def evaluated_images(cfg, n_test: int) -> int:
    """Images one EMA+TTA evaluation sends through the network, as speedrun.predict does: every TTA
    view of every test image, or the plain view of every image and every view of the least sure
    (speedrun.tta_unsure_count)."""
    views = len(speedrun.TTA_MODES[cfg.tta])
    unsure = speedrun.tta_unsure_count(cfg, cfg.tta, n_test)
    return n_test * views if unsure is None else n_test + unsure * views


def count_run(cfg, epochs: int | None = None) -> dict:
    """FLOPs of one training run of cfg (the first `epochs` epochs, default all), by part; each
    epoch's training steps counted at the side its images have (resolution_schedule)."""
    epochs = cfg.epochs if epochs is None else epochs
    n_train, n_test = speedrun.image_counts(cfg)
    n_batches = n_train // cfg.batch_size
    steps = min(speedrun.epochs_to_steps(cfg.epochs, n_batches), speedrun.epochs_to_steps(epochs, n_batches))  # the run's steps
    meta = torch.device("meta")
    model = speedrun.build_model(cfg, meta)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=meta)
    step_at = {}  # side -> forward and backward FLOPs of one step

    def step(side):
        if side not in step_at:
            x = torch.empty(cfg.batch_size, 3, side, side, device=meta)
            step_at[side] = training_step_flops(model, x, y, lambda out, t: speedrun.smoothed_cross_entropy(
                out, t, cfg.label_smoothing))
        return step_at[side]
    per_epoch = [(n, speedrun.side_of_epoch(cfg, e)) for e, n in enumerate(speedrun.epoch_steps(steps, n_batches))]
    per_image = forward_flops(model, torch.empty(cfg.ghost_bn_splits, 3, 32, 32, device=meta)) / cfg.ghost_bn_splits
    views = len(speedrun.TTA_MODES[cfg.tta])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ema_elements = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    eval_images = evaluated_images(cfg, n_test)
    timed_eval = eval_images * per_image
    parts = {
        "forward (training)": sum(n * step(side)["forward"] for n, side in per_epoch),
        "backward (training)": sum(n * step(side)["backward"] for n, side in per_epoch),
        "optimizer step (estimate)": steps * params * OPTIMIZER_FLOPS_PER_PARAM[cfg.optimizer],
        "optimizer orthogonalization (Muon)": steps * orthogonalization_flops(model, cfg, steps),
        "EMA (estimate)": ema_updates(cfg, model, steps, n_batches) * ema_elements * EMA_FLOPS_PER_ELEMENT,
        "whitening init": whitening_flops(cfg),
        "evaluation, timed (one EMA+TTA pass)": timed_eval,
    }
    # train() evaluates after every eval_every-th epoch and the last (EMA+TTA, then the raw model
    # without TTA); one EMA+TTA pass is timed, the rest is not
    run_epochs = len(speedrun.epoch_steps(steps, n_batches))
    evaluated = sum(1 for e in range(run_epochs) if e == run_epochs - 1 or (e + 1) % cfg.eval_every == 0)
    untimed_eval = evaluated * (eval_images + n_test) * per_image - timed_eval
    return dict(parts=parts, timed_total=sum(parts.values()), untimed_evaluation=untimed_eval,
                all_total=sum(parts.values()) + untimed_eval, epochs=epochs, steps=steps, n_train=n_train,
                n_test=n_test, tta_views=views, forward_per_image=per_image, trainable_params=params)


def peak_matrix_size(requested: int, device: torch.device) -> int:
    """The side of the peak-measuring matrices: as requested, else 8192 on CUDA (a GPU needs large
    products to reach its peak) and 2048 elsewhere (a CPU gets there sooner, and slower)."""
    return requested or (8192 if device.type == "cuda" else 2048)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int, trials: int = 3, trial_s: float = 0.2) -> float:
    """Best FLOP/s of size x size matrix products on the device, over a few timed trials."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    speedrun.synchronize(device)
    t0 = time.perf_counter()
    a @ b
    speedrun.synchronize(device)
    reps = max(1, int(trial_s / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(trials):
        speedrun.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        speedrun.synchronize(device)
        best = max(best, 2 * size ** 3 * reps / (time.perf_counter() - t0))
    return best


def config_of_result(result: dict):
    """The Config stored in a speedrun JSON result; ValueError when it is not one."""
    if not isinstance(result.get("config"), dict) or not isinstance(result.get("runs"), list) or not result["runs"]:
        raise ValueError("not a speedrun result: expected 'config' and a non-empty 'runs' list")
    return speedrun.make_config("davidnet", **speedrun.upgrade_config(result["config"]))


def timed_runs(result: dict, cfg) -> list[tuple[float, int, str]]:
    """(seconds, epochs counted, what) per run of a result: time-to-target where it was reached,
    else whitening + all training + the last evaluation."""
    out = []
    for run in result["runs"]:
        if run.get("time_to_target_s") is not None:
            out.append((run["time_to_target_s"], run["epochs_to_target"], "time_to_target_s"))
        else:
            out.append((run["full_budget_s"], cfg.epochs,
                        "whitening + training + last evaluation"))
    return out


def main(argv=None) -> int:
    parser, args, cfg, device = _common.parse_args(__doc__, add_flags, argv)
    given = [name for name in ("seconds", "result", "train") if getattr(args, name) not in (None, False)]
    try:
        if len(given) > 1:
            raise ValueError(f"give at most one of --seconds, --result, --train (got {', '.join('--' + g for g in given)})")
        if args.seconds is not None and not args.seconds > 0:
            raise ValueError(f"--seconds must be positive, got {args.seconds}")
        if args.peak_size < 0:
            raise ValueError(f"--peak-size must be positive (or 0 for the default), got {args.peak_size}")
        if args.json is not None:
            speedrun.reserve(args.json, "--json")
        runs = None  # (seconds, epochs, what) of each measured run
        source = ""
        if args.result is not None:
            try:
                result = json.loads(args.result.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read --result {args.result}: {e}") from None
            cfg = config_of_result(result)
            device = speedrun.pick_device(cfg.device) if cfg.device != "auto" else device
            runs = timed_runs(result, cfg)
            source = f"{len(runs)} run(s) in {args.result} (config taken from it)"
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.train:
        data = _common.load_data(parser, cfg, device, args)
        try:
            run = speedrun.train(cfg, data, log=speedrun_tools.log_lines(args.quiet))
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
        runs = [(run["full_budget_s"], cfg.epochs,
                 "whitening + training + last evaluation")]
        source = "one run trained here"
    elif args.seconds is not None:
        runs = [(args.seconds, cfg.epochs, "given with --seconds")]
        source = "--seconds"

    count = count_run(cfg)
    dtype = speedrun.compute_dtype(cfg, device)
    size = peak_matrix_size(args.peak_size, device)
    peak = measure_peak(device, dtype, size)

    unit, scale = ("TFLOP", 1e12) if count["timed_total"] >= 1e13 else ("GFLOP", 1e9)
    lines = [_common.describe_machine(device), f"command: {speedrun_tools.command_line(__file__, argv)}",
             f"one training run: {count['n_train']} training images, {speedrun.plural(count['epochs'], 'epoch')} = "
             f"{speedrun.plural(count['steps'], 'step')} "
             f"of {cfg.batch_size}, width {cfg.width:g}, {count['n_test']} test images x {count['tta_views']} TTA view(s); "
             f"{count['forward_per_image'] / 1e6:.1f} MFLOP per image forward, {count['trainable_params']:,} trainable parameters",
             "", f"{'part':<44} {unit:>10} {'share':>7}"]
    for name, flops in count["parts"].items():
        lines.append(f"{name:<44} {flops / scale:10.3f} {100 * flops / count['timed_total']:6.2f}%")
    lines += [f"{'timed work (what time_to_target_s covers)':<44} {count['timed_total'] / scale:10.3f} {100.0:6.2f}%",
              f"{'evaluation, untimed (other per-epoch passes)':<44} {count['untimed_evaluation'] / scale:10.3f}",
              f"{'all work in speedrun.train':<44} {count['all_total'] / scale:10.3f}",
              "convention: convolutions and matrix products (multiply-add = 2 FLOPs); other elementwise work "
              "is not counted, except the estimated optimizer and EMA rows", "",
              f"peak: {size}x{size} {str(dtype).replace('torch.', '')} matrix product on {device}: "
              f"{peak / 1e12:.3f} TFLOP/s (best of 3 trials)"]
    record = dict(machine=_common.describe_machine(device), config=dataclasses.asdict(cfg), flops=count,
                  peak_flops_per_s=peak, peak_matrix_size=size, dtype=str(dtype), measured=None)
    if runs:
        flops = sum(count_run(cfg, epochs)["timed_total"] for _, epochs, _ in runs)
        seconds = sum(s for s, _, _ in runs)
        achieved = flops / seconds
        what = sorted({w for _, _, w in runs})
        lines.append(f"measured: {seconds / len(runs):.3f} s per run ({'; '.join(what)}; from {source}): "
                     f"achieved {achieved / 1e12:.3f} TFLOP/s = {100 * achieved / peak:.1f}% of the measured peak")
        record["measured"] = dict(source=source, runs=[dict(seconds=s, epochs=e, what=w) for s, e, w in runs],
                                  timed_flops=flops, seconds=seconds, achieved_flops_per_s=achieved,
                                  fraction_of_peak=achieved / peak)
    else:
        lines.append("no measured time: give --seconds, --result or --train for the achieved TFLOP/s and the fraction of peak")
    print("\n".join(lines))
    if args.json is not None:
        speedrun.save_json(record, args.json)
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

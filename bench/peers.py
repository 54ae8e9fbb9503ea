#!/usr/bin/env python3
"""Time our presets against a peer trainer, airbench94 (PyPI `airbench` 0.1.8, its train94),
in one process on one GPU, on the same CIFAR-10 arrays, interleaved round by round.

    python bench/peers.py --presets davidnet,airbench94,record --runs 10 --device cuda
    python bench/peers.py --presets davidnet --runs 3 --epochs 8      # a config flag applies to every preset

Procedure: CIFAR-10 is read once (speedrun.load_cifar10); airbench's cifar10/train.pt and
test.pt are written from those arrays, so it downloads nothing; every trainer does one untimed
warm-up run; then N rounds, each running every trainer once, the order rotated by one place per
round so that slow drift of the GPU (clocks, temperature) falls on every trainer alike. Round k
seeds every trainer with seed+k (airbench takes no seed: torch.manual_seed before its call).

What each timer includes is spelled out in this script's TIMERS text, copied into the JSON. The
headline ratio compares like with like: airbench94 trains a fixed budget with no early stop, so
the ratio is our full-budget time (whitening + every epoch + the final evaluation) over
airbench's; the time-to-target ratio is reported beside it. Needs, on the GPU machine only:
pip install --no-deps airbench==0.1.8 (and torchvision, which airbench imports).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]

PEER = "airbench94"
PEER_PACKAGE = "airbench==0.1.8"
INSTALL_HINT = (f"install it on the GPU machine with `pip install --no-deps {PEER_PACKAGE}` "
                f"(offline: `pip download --no-deps {PEER_PACKAGE}` elsewhere, copy the .tar.gz over, then "
                f"`pip install --no-deps --no-build-isolation airbench-0.1.8.tar.gz`); it also needs torchvision")
TARGET_ACC = 0.94
# preset: (lowest mean accuracy, highest full-budget time ratio ours / airbench94, is the limit inclusive)
TARGETS = {"record": (0.94, 0.50, True), "airbench94": (0.94, 1.0, True), "davidnet": (0.94, 2.5, False)}

TIMERS = {
    "ours_full_budget_s": (
        "speedrun.train, every epoch of the preset's budget: whitening init + all training epochs "
        "(on-device augmentation, every step, EMA updates) + the final EMA+TTA evaluation of the test "
        "set, i.e. the last epoch row's train_s + eval_s; CUDA events after a synchronisation (wall clock "
        "on other devices). Excluded: putting the data on the device, building the model and optimizer, "
        "the other per-epoch evaluations, the warm-up run."),
    "ours_time_to_target_s": (
        "speedrun.train's time_to_target_s: whitening init + training epochs up to the first epoch whose "
        "EMA+TTA accuracy reaches the preset's target_acc + that one evaluation; null where not reached."),
    "airbench94_time_s": (
        "airbench 0.1.8 train94(verbose=True), its own CUDA-event total, read from the final row it "
        "prints (total_time_seconds, 4 decimals): whitening init (normalising 5,000 training images, "
        "2x2 patch covariance, eigendecomposition) + every training epoch of its 9.9-epoch budget (the "
        "first epoch's normalise / pre-flip / pad of the whole training set, per-epoch random translate, "
        "alternating flip, shuffling, all steps, Lookahead EMA) + the final test-time-augmented "
        "evaluation (tta_level 2: 6 views) of the test set. Excluded: loading train.pt/test.pt onto the "
        "GPU and converting them to fp16, building the network and optimizer, the per-epoch evaluations "
        "that verbose mode prints. Its accuracy is the printed tta_val_acc (4 decimals)."),
    "wall_s": (
        "both trainers: perf_counter around the whole call, with a device synchronisation before and "
        "after: everything, including data placement, construction, untimed evaluations and logging."),
}
COMPARISON_NOTE = (
    "Like with like: airbench94 trains a fixed budget (9.9 epochs) and has no early stop, so the headline "
    "ratio is ours_full_budget_s / airbench94_time_s; both clocks cover whitening, every training step "
    "and one final TTA evaluation. The time_to_target ratio stops our clock at the first epoch that "
    "reaches the target, which airbench's timer has no counterpart for.")
RATIO_METHOD = (
    "ratio = mean(ours) / mean(airbench94) over the same rounds; ci95 = 95% Student-t interval of the "
    "mean of the per-round ratios ours_k / airbench94_k (paired by round); mean_of_ratios is that mean.")


class PeerError(RuntimeError):
    """The peer cannot run here, or its output cannot be read; the message says what to do."""


# =============================================================================================
# The peer: airbench94, imported lazily (GPU machine only)
# =============================================================================================


def import_airbench():
    """The airbench module, or PeerError saying how to install it (and torchvision)."""
    try:
        return importlib.import_module("airbench")
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and missing.split(".")[0] == "torchvision":
            raise PeerError(f"airbench is installed but cannot import torchvision ({e}); "
                            f"install torchvision (airbench imports it), or {INSTALL_HINT}") from None
        raise PeerError(f"cannot import airbench ({e}); {INSTALL_HINT}") from None


def prepare_airbench_data(folder: Path, train_x, train_y, test_x, test_y) -> dict:
    """Writes folder/cifar10/train.pt and test.pt in the form airbench's CifarLoader reads (a dict:
    'images' uint8 (N, 32, 32, 3), 'labels' int64 (N,), 'classes' list of the 10 names), so it
    never downloads. A file already there is kept if it holds the same arrays, else PeerError."""
    data_dir = Path(folder) / "cifar10"
    data_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, images, labels in (("train.pt", train_x, train_y), ("test.pt", test_x, test_y)):
        blob = {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                "classes": list(speedrun.CLASSES)}
        path = data_dir / name
        if path.exists():
            old = torch.load(path, map_location="cpu", weights_only=True)
            same = (isinstance(old, dict) and old.get("classes") == blob["classes"]
                    and all(isinstance(old.get(k), torch.Tensor) and old[k].dtype == blob[k].dtype
                            and torch.equal(old[k], blob[k]) for k in ("images", "labels")))
            if not same:
                raise PeerError(f"{path} exists and holds other data than this benchmark's; "
                                f"delete it or choose another --airbench-dir")
            written[name] = dict(path=str(path), images=len(images), reused=True)
            continue
        speedrun.write_atomic(path, lambda tmp, blob=blob: torch.save(blob, tmp))
        written[name] = dict(path=str(path), images=len(images), reused=False)
    return written


def parse_airbench94_log(text: str) -> tuple[float, float]:
    """(tta accuracy, timed seconds) from the final 'eval' row that train94(verbose=True) prints:
    columns run | epoch | train_loss | train_acc | val_acc | tta_val_acc | total_time_seconds."""
    for line in reversed(text.splitlines()):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] == "eval":
            try:
                return float(cells[5]), float(cells[6])
            except ValueError:
                break
    tail = "\n".join(text.splitlines()[-5:])
    raise PeerError(f"no final 'eval' row with tta_val_acc and total_time_seconds in airbench's output; "
                    f"is it version 0.1.8? Last lines:\n{tail}")


def make_airbench94_trainer(folder: Path, device: torch.device):
    """A function seed -> {acc, time_s, wall_s} that runs airbench's train94 once. Raises PeerError
    at once when airbench is missing or the device cannot run it."""
    airbench = import_airbench()
    if device.type != "cuda":
        raise PeerError(f"airbench's train94 runs on CUDA only (it calls .cuda() and times with CUDA events), "
                        f"not on {device}; run on a GPU machine with --device cuda")
    if device.index not in (None, 0):
        raise PeerError(f"airbench loads its data onto cuda:0 whatever the device; to use GPU {device.index} "
                        f"run with CUDA_VISIBLE_DEVICES={device.index} --device cuda")
    folder = Path(folder).resolve()

    def train_once(seed: int) -> dict:
        torch.manual_seed(seed)  # train94 takes no seed; it draws from torch's global generators
        printed = io.StringIO()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        # its test loader reads the relative path 'cifar10', hence the working directory
        with working_directory(folder), contextlib.redirect_stdout(printed):
            model = airbench.train94(run=1, verbose=True)
        torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - t0
        del model
        acc, seconds = parse_airbench94_log(printed.getvalue())
        return dict(acc=acc, time_s=seconds, wall_s=wall_s)

    return train_once


@contextlib.contextmanager
def working_directory(folder: Path):
    """contextlib.chdir, which Pythons before 3.11 lack."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def peer_version() -> str | None:
    try:
        return importlib.metadata.version("airbench")
    except Exception:
        return None


# =============================================================================================
# Our presets
# =============================================================================================


def preset_configs(names: list[str], overrides: dict, device: torch.device) -> dict[str, speedrun.Config]:
    """name -> Config, each preset with the same overrides; ValueError naming the presets that exist."""
    unknown = [n for n in names if n not in speedrun.PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; speedrun.PRESETS has: {', '.join(speedrun.PRESETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--presets names one preset twice: {','.join(names)}")
    cfgs = {n: speedrun.make_config(n, **{**overrides, "device": str(device), "runs": 1}) for n in names}
    sizes = {(c.subset, c.test_subset) for c in cfgs.values()}
    if len(sizes) > 1:
        raise ValueError(f"the presets train or test on different subsets {sorted(sizes)}; the comparison needs one "
                         f"data set: set them alike with --subset N --test-subset M")
    return cfgs


def make_speedrun_trainer(cfg: speedrun.Config, data: speedrun.DeviceData, device: torch.device):
    """A function seed -> {acc, time_s (full budget), time_to_target_s, ...} running speedrun.train."""
    def train_once(seed: int) -> dict:
        speedrun.synchronize(device)
        t0 = time.perf_counter()
        run = speedrun.train(cfg, data, log=speedrun_tools.log_lines(quiet=True), seed=seed)
        speedrun.synchronize(device)
        wall_s = time.perf_counter() - t0
        run.pop("model", None)
        return dict(acc=run["final_acc"], time_s=run["full_budget_s"],
                    time_to_target_s=run["time_to_target_s"], epochs_to_target=run["epochs_to_target"],
                    whitening_s=run["whitening_s"], wall_s=wall_s)
    return train_once


# =============================================================================================
# Schedule, loop, statistics
# =============================================================================================


def interleaved_schedule(names: list[str], rounds: int) -> list[list[str]]:
    """Round k runs every trainer once, the list rotated left by k places."""
    m = len(names)
    return [[names[(k + i) % m] for i in range(m)] for k in range(rounds)]


def run_benchmark(trainers: dict, rounds: int, seed: int, log=print, on_round=None) -> tuple[list[dict], list[dict]]:
    """One untimed warm-up run per trainer (seed + rounds, a seed no round uses), then the
    interleaved rounds; on_round(warm-up records, run records) after each finished round.
    Returns (warm-up records, run records)."""
    warm, runs = [], []
    for name, fn in trainers.items():
        record = dict(trainer=name, seed=seed + rounds, **fn(seed + rounds))
        warm.append(record)
        log(f"warm-up  {line_of(record)}")
    for k, order in enumerate(interleaved_schedule(list(trainers), rounds)):
        for position, name in enumerate(order):
            record = dict(trainer=name, round=k, position=position, seed=seed + k, **trainers[name](seed + k))
            runs.append(record)
            log(f"round {k + 1}/{rounds}  {line_of(record)}")
        if on_round:
            on_round(warm, runs)
    return warm, runs


def line_of(record: dict) -> str:
    text = f"{record['trainer']:<12} acc {100 * record['acc']:6.2f}%  time {record['time_s']:7.3f} s"
    if "time_to_target_s" in record:
        ttt = record["time_to_target_s"]
        text += f"  to-target {'not reached' if ttt is None else f'{ttt:.3f} s'}"
    return text + f"  wall {record['wall_s']:.1f} s"


def describe(values) -> dict:
    mean, std = speedrun.mean_std(values)
    return dict(n=len(values), mean=mean, std=std, min=min(values, default=None), max=max(values, default=None))


def trainer_summary(records: list[dict]) -> dict:
    """speedrun.summarize's statistics of a trainer's runs (accuracy: mean, spread, interval, the
    fraction at the target, the t-test of a mean above it), with its timer's and the wall clock's."""
    runs = [dict(seed=r["seed"], final_acc=r["acc"], time_to_target_s=r.get("time_to_target_s")) for r in records]
    summary = dict(speedrun.summarize(runs, TARGET_ACC), time_s=describe([r["time_s"] for r in records]),
                   wall_s=describe([r["wall_s"] for r in records]))
    if not any("time_to_target_s" in r for r in records):  # a trainer without an early stop (the peer's)
        for key in ("time_to_target_mean_s", "time_to_target_std_s", "runs_reaching_target"):
            del summary[key]
    return summary


def ratio_stats(pairs: list[tuple[float, float]]) -> dict:
    """Paired (ours, peer) times -> ratio of means, per-round ratios, their mean and its t-interval."""
    if not pairs:
        return dict(rounds=0, ratio=None, per_round=[], mean_of_ratios=None, ci95=[None, None])
    ours, peer = zip(*pairs)
    per_round = [a / b for a, b in pairs]
    mean_ratio, _ = speedrun.mean_std(per_round)
    return dict(rounds=len(pairs), ratio=(sum(ours) / len(ours)) / (sum(peer) / len(peer)), per_round=per_round,
                mean_of_ratios=mean_ratio, ci95=list(speedrun.confidence_interval(per_round)))


def compare(runs: list[dict], preset: str, peer: str = PEER) -> dict:
    """Both ratios of one preset against the peer, paired by round."""
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["trainer"]] = r
    rounds = [by_round[k] for k in sorted(by_round) if preset in by_round[k] and peer in by_round[k]]
    full = [(r[preset]["time_s"], r[peer]["time_s"]) for r in rounds]
    to_target = [(r[preset]["time_to_target_s"], r[peer]["time_s"]) for r in rounds
                 if r[preset].get("time_to_target_s") is not None]
    return dict(full_budget=ratio_stats(full), time_to_target=ratio_stats(to_target))


def check_targets(summary: dict, ratios: dict) -> dict:
    """TARGETS for the presets that have one, judged on the full-budget ratio."""
    out = {}
    for preset, (min_acc, max_ratio, inclusive) in TARGETS.items():
        if preset not in ratios:
            continue
        acc = summary[preset]["acc_mean"]
        full = ratios[preset]["full_budget"]
        below = (lambda x: x <= max_ratio) if inclusive else (lambda x: x < max_ratio)
        out[preset] = dict(
            rule=f"mean acc >= {100 * min_acc:g}% and full-budget time ratio {'<=' if inclusive else '<'} {max_ratio:g}",
            acc_mean=acc, ratio=full["ratio"], acc_met=acc is not None and acc >= min_acc,
            ratio_met=full["ratio"] is not None and below(full["ratio"]),
            ratio_ci95_upper_met=full["ci95"][1] is not None and below(full["ci95"][1]))
        out[preset]["met"] = out[preset]["acc_met"] and out[preset]["ratio_met"]
    return out


# =============================================================================================
# FLOP/s (profile/flops.py)
# =============================================================================================


def load_flops_module():
    """profile/flops.py, imported with profile/ on the path (the folder is not a package, on purpose)."""
    folder = str(ROOT / "profile")
    if folder not in sys.path:
        sys.path.append(folder)
    import flops
    return flops


def achieved_flops(cfgs: dict, summary: dict, device: torch.device, peak_size: int) -> dict:
    """Per preset: FLOPs of one full-budget run (what ours_full_budget_s covers), over its mean time,
    and as a fraction of a large matrix product's rate measured here in the preset's dtype."""
    flops = load_flops_module()
    size = flops.peak_matrix_size(peak_size, device)
    peaks, out = {}, {}
    for name, cfg in cfgs.items():
        dtype = speedrun.compute_dtype(cfg, device)
        if dtype not in peaks:
            peaks[dtype] = flops.measure_peak(device, dtype, size)
        work = flops.count_run(cfg)["timed_total"]
        seconds = summary[name]["time_s"]["mean"]
        rate = work / seconds if seconds else None
        out[name] = dict(timed_flops=work, mean_full_budget_s=seconds, achieved_tflops=rate and rate / 1e12,
                         peak_tflops=peaks[dtype] / 1e12, peak_dtype=str(dtype).replace("torch.", ""),
                         peak_matrix_size=size, fraction_of_peak=rate and rate / peaks[dtype])
    return out


# =============================================================================================
# Command line
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    """speedrun's parser, whose Config flags apply to every preset (--runs: timed runs of
    each trainer, default 10; --seed: round k seeds every trainer with seed+k), plus this
    benchmark's flags; --presets, several, takes the place of speedrun's --preset."""
    p = speedrun_tools.tool_parser(__doc__)
    p.usage = "%(prog)s [--presets A,B,...] [--runs N] [--device DEVICE] [FLAG ...]  (--help lists every flag)"
    p.set_defaults(preset=None)
    speedrun_tools.tool_defaults(p, runs=10)
    speedrun_tools.hide_flags(p, "preset", "workers", "target_acc")  # refused below: one line says why
    g = p.add_argument_group("peer comparison")
    g.add_argument("--presets", default="davidnet,airbench94,record", help="comma-separated speedrun presets (default: davidnet,airbench94,record)")
    g.add_argument("--airbench-dir", type=Path, default=None,
                   help="folder that gets cifar10/train.pt and test.pt for airbench (default: beside --out, "
                        "OUT_STEM-airbench/); airbench runs with it as the working directory")
    g.add_argument("--out", type=Path, default=None,
                   help="JSON result (default: a new runs/peers-TIMESTAMP.json); never overwritten")
    g.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="also report achieved TFLOP/s and the fraction of a measured peak (default: on)")
    g.add_argument("--peak-size", type=int, default=0, metavar="N",
                   help="side of the peak-measuring matrix product (default 0: 8192 on CUDA, 2048 elsewhere)")
    return p


def split_overrides(args) -> tuple[dict, int, int, str, str]:
    """(the Config overrides every preset gets, runs, seed, device, data_dir) from the flags."""
    if args.preset is not None:
        raise ValueError("--preset: this script compares several, named with --presets")
    overrides = speedrun.overrides_from_args(args)
    if "workers" in overrides:
        raise ValueError("--workers: this script runs every trainer in its one process")
    if overrides.get("target_acc", TARGET_ACC) != TARGET_ACC:
        raise ValueError(f"--target-acc: the comparison is at {PEER}'s own target, {TARGET_ACC:g}, which its "
                         f"package fixes; leave the flag out")
    runs, seed = overrides.pop("runs", 10), overrides.pop("seed", 0)
    return overrides, runs, seed, overrides.pop("device", "auto"), overrides.pop("data_dir", "")


def report_lines(result: dict) -> list[str]:
    lines = ["", f"{'trainer':<12} {'runs':>4} {'acc mean':>9} {'std':>6} {'min':>6} {'max':>6} {'>=94%':>6} "
                 f"{'p(>94%)':>8} {'time mean':>10} {'std':>7}"]
    for name, s in result["summary"].items():
        t = s["time_s"]
        p = "-" if s["p_value"] is None else f"{s['p_value']:.3g}"
        lines.append(f"{name:<12} {s['runs']:>4} {100 * s['acc_mean']:8.2f}% {100 * (s['acc_std'] or 0):6.2f} "
                     f"{100 * s['acc_min']:6.2f} {100 * s['acc_max']:6.2f} {100 * s['frac_at_target']:5.0f}% {p:>8} "
                     f"{t['mean']:9.3f}s {t['std']:6.3f}s")
    lines.append(f"time: ours = full-budget timed seconds, {PEER} = its own timer (both defined under 'timers' "
                 f"in the JSON)")
    for preset, r in result["ratios"].items():
        for kind, label in (("full_budget", "full budget"), ("time_to_target", "time to target")):
            x = r[kind]
            if x["ratio"] is None:
                lines.append(f"{preset} / {PEER}, {label}: no round to compare")
                continue
            lo, hi = x["ci95"]
            lines.append(f"{preset} / {PEER}, {label}: ratio {x['ratio']:.3f} (95% CI of per-round ratios "
                         f"{lo:.3f}..{hi:.3f}, {x['rounds']} rounds)")
    for preset, t in result["targets"].items():
        lines.append(f"target {preset}: {t['rule']}: {'met' if t['met'] else 'NOT met'} "
                     f"(acc {100 * t['acc_mean']:.2f}%, ratio {t['ratio']:.3f})" if t["ratio"] is not None
                     else f"target {preset}: {t['rule']}: no ratio")
    for preset, f in (result["flops"] or {}).items():
        if f["achieved_tflops"] is not None:
            lines.append(f"{preset}: {f['timed_flops'] / 1e15:.3g} PFLOP per full-budget run, achieved "
                         f"{f['achieved_tflops']:.3g} TFLOP/s = {100 * f['fraction_of_peak']:.1f}% of the measured "
                         f"{f['peak_dtype']} peak {f['peak_tflops']:.3g} TFLOP/s")
    return lines


def main(argv=None, make_peer=None) -> int:
    """make_peer(folder, device) -> (seed -> {acc, time_s, wall_s}); default make_airbench94_trainer.
    The finished rounds are on disk after each round (marked "complete": false until the end), so an
    interrupt (Ctrl-C, SIGTERM) loses only the round in progress, as speedrun.py's runs do."""
    parser = build_parser()
    args = parser.parse_args(argv)
    make_peer = make_peer or make_airbench94_trainer
    partial, progress = speedrun.PartialResult(), dict(rounds=0, of=None)
    with speedrun.sigterm_as_interrupt():
        try:
            return run_and_write(parser, args, argv, make_peer, partial, progress)
        except KeyboardInterrupt:
            if partial.path is None:
                speedrun.release_outputs()  # the reserved --out, still empty
                parser.exit(130, "interrupted before any round finished; no result was written\n")
            parser.exit(130, f"interrupted: {progress['rounds']} of {progress['of']} rounds finished; they are saved in "
                             f"{partial.path} (marked \"complete\": false)\n")


def run_and_write(parser, args, argv, make_peer, partial: speedrun.PartialResult, progress: dict) -> int:
    """main's work: check the request, run the rounds (each finished round written through
    `partial`, counted in progress['rounds'] of progress['of']), then write the whole result."""
    try:
        overrides, runs, seed, device_name, data_dir = split_overrides(args)
        progress["of"] = runs
        if runs < 1:
            raise ValueError(f"--runs must be at least 1, got {runs}")
        if seed < 0:
            raise ValueError(f"--seed must be 0 or more, got {seed}")
        out = speedrun.reserve(args.out, "--out") if args.out else speedrun.default_out_path(prefix="peers-")
        airbench_dir = (args.airbench_dir or out.with_name(f"{out.stem}-airbench")).resolve()
        device = speedrun.pick_device(device_name)
        names = [n.strip() for n in args.presets.split(",") if n.strip()]
        if not names:
            raise ValueError("--presets names no preset")
        cfgs = preset_configs(names, overrides, device)
        peer = make_peer(airbench_dir, device)  # fails here, before any work, when airbench cannot run
        cfg0 = next(iter(cfgs.values()))
        t0 = time.perf_counter()
        arrays = speedrun.subsets(speedrun.load_cifar10(data_dir or None, url=args.data_url, quiet=True), cfg0)
        read_s = time.perf_counter() - t0
        prepared = prepare_airbench_data(airbench_dir, *arrays)
    except (ValueError, speedrun.DataError, PeerError) as e:
        speedrun.release_outputs()
        parser.exit(2, f"error: {e}\n")

    trainers, on_device = {}, {}  # one copy of the data on the device per compute dtype
    for name, cfg in cfgs.items():
        dtype = speedrun.compute_dtype(cfg, device)
        on_device.setdefault(dtype, speedrun.device_data(arrays, cfg, device))
        trainers[name] = make_speedrun_trainer(cfg, on_device[dtype], device)
    trainers[PEER] = peer
    log = speedrun_tools.log_lines(args.quiet)
    log(f"{', '.join(trainers)} on {speedrun.environment(device)['device_name']}: 1 warm-up run each, "
        f"then {runs} interleaved rounds")

    def result_of(warm: list[dict], records: list[dict], complete: bool) -> dict:
        summary = {name: trainer_summary([r for r in records if r["trainer"] == name]) for name in trainers}
        ratios = {name: compare(records, name) for name in cfgs}
        return dict(
            kind="peer comparison", command=speedrun_tools.command_line(__file__, argv),
            environment={**speedrun.environment(device), "cudnn_benchmark": torch.backends.cudnn.benchmark},
            peer=dict(name=PEER, package=PEER_PACKAGE, installed_version=peer_version()),
            timers=TIMERS, comparison_note=COMPARISON_NOTE, ratio_method=RATIO_METHOD, target_acc=TARGET_ACC,
            data=dict(n_train=len(arrays[0]), n_test=len(arrays[2]), read_s=read_s, airbench_dir=str(airbench_dir),
                      airbench_files=prepared),
            configs={name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()},
            runs_per_trainer=runs, seed=seed, schedule=interleaved_schedule(list(trainers), runs),
            rounds_finished=len(records) // len(trainers), warm_up=warm, runs=records, summary=summary,
            ratios=ratios, targets=check_targets(summary, ratios),
            # the peak measurement takes seconds: only once, at the end
            flops=achieved_flops(cfgs, summary, device, args.peak_size) if args.flops and complete else None,
            complete=complete)

    write_partial = partial.writer(out)

    def keep_round(warm: list[dict], records: list[dict]) -> None:
        write_partial(result_of(warm, records, complete=False))
        progress["rounds"] = len(records) // len(trainers)

    try:
        warm, records = run_benchmark(trainers, runs, seed, log=log, on_round=keep_round)
    except PeerError as e:
        kept = f" ({progress['rounds']} finished rounds saved in {partial.path})" if partial.path else ""
        parser.exit(2, f"error: {e}{kept}\n")

    result = result_of(warm, records, complete=True)
    log("\n".join(report_lines(result)))
    written = speedrun.write_with_fallback(partial.path or out, lambda p: speedrun.save_json(result, p), "--out",
                                          lambda m: print(m, file=sys.stderr))
    print(f"results written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

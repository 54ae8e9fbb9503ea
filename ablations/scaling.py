#!/usr/bin/env python3
"""Throughput and time per epoch of one training run spread over 1..N processes (torchrun, DDP).

    python ablations/scaling.py                             # P = 1, 2, 4, ... up to the visible GPUs
    python ablations/scaling.py --max-procs 8 --mode strong # P = 1, 2, 4, 8; fixed global batch only
    python ablations/scaling.py --procs 1,3,6 --steps 50    # these P exactly (1 is always added)
    python ablations/scaling.py --device cpu --procs 1,2 --subset 2048 --width 0.25 --batch-size 128

Strong scaling keeps the global batch (--batch-size) and its ghost-BN groups fixed: each of P
processes trains on batch/P images and ghost_bn_splits/P groups, so a P is skipped (with a note)
unless ghost_bn_splits is a multiple of it. Weak scaling keeps the per-process batch fixed at
--batch-size (global batch P x batch, P x ghost_bn_splits groups). Every other speedrun.py flag
sets the recipe. --max-procs N means the powers of two below N, and N.

Each P is one torchrun job (NCCL, one GPU per process; gloo with --device cpu). Its processes
build the network, optimizer and per-process share of each batch exactly as speedrun.train
does, then time --steps training steps (speedrun.train_epoch: EMA updates and BN-statistics
averaging included) after --warmup-steps, --repeats times; a step's time is the slowest
process's. Communication is measured by difference: the same steps once as usual and once with
no communication at all (DDP's no_sync(), no BN-statistics averaging); communication = synced -
unsynced. It is the part of the all-reduces (and of waiting for the slowest process) that is not
hidden behind the backward pass, not their total duration. Time per epoch = steps per epoch x
step time; it leaves out the once-per-epoch augmentation and the evaluation.

On the CPU every process uses one thread and the processes share the machine's cores: the
numbers show the machinery (gloo, DDP), not how GPUs scale.

Writes scaling.json, scaling.md and, when matplotlib is installed, scaling.png into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
    from ablations import study
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)


MODES = ("strong", "weak")
CHART_NOTICE = speedrun_tools.no_chart("scaling.png")
CPU_NOTICE = ("CPU processes use 1 thread each and share this machine's cores: the numbers show the "
              "machinery (gloo, DDP), not how GPUs scale")
COLUMNS = ("mode", "P", "global batch", "per-rank batch", "step ms", "images/s", "epoch s", "speed-up",
           "efficiency", "compute ms", "comm ms", "comm %")


class JobFailed(RuntimeError):
    """A torchrun job ended with a non-zero status; `returncode` is that status."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


# =============================================================================================
# What to measure: one case per distinct (global batch, ghost-BN groups) at each P
# =============================================================================================


def parse_procs(text: str | None, max_procs: int) -> list[int]:
    """The process counts to measure, ascending, always with 1 (the baseline of speed-up)."""
    if text is None:
        if max_procs < 1:
            raise ValueError(f"--max-procs must be at least 1, got {max_procs}")
        procs = {max_procs} | {2 ** k for k in range(max_procs.bit_length()) if 2 ** k <= max_procs}
    else:
        try:
            procs = {int(p) for p in text.split(",") if p.strip()}
        except ValueError:
            raise ValueError(f"--procs takes comma-separated whole numbers, e.g. 1,2,4; got {text!r}") from None
        if not procs or min(procs) < 1:
            raise ValueError(f"--procs needs process counts of 1 or more, got {text!r}")
    return sorted(procs | {1})


def plan_cases(cfg: speedrun.Config, procs: list[int], modes: list[str], n_train: int) -> tuple[dict, list[dict]]:
    """{P: [case, ...]} and the skipped (mode, P) with reasons. A case is one configuration to time;
    at P=1 strong and weak coincide, so one case serves both modes."""
    plan, skipped = {}, []
    for world in procs:
        cases = {}
        for mode in modes:
            if mode == "strong":
                batch, splits = cfg.batch_size, cfg.ghost_bn_splits
                if splits % world:
                    skipped.append(dict(mode=mode, procs=world, reason=(
                        f"ghost_bn_splits {splits} is not a multiple of {world}: each process normalises "
                        f"whole ghost-BN groups of the fixed global batch")))
                    continue
            else:
                batch, splits = world * cfg.batch_size, world * cfg.ghost_bn_splits
            if n_train < batch:
                skipped.append(dict(mode=mode, procs=world, reason=(
                    f"the {n_train} training images are fewer than one global batch of {batch}")))
                continue
            case = cases.setdefault((batch, splits), dict(modes=[], batch_size=batch, ghost_bn_splits=splits))
            case["modes"].append(mode)
        if cases:
            plan[world] = list(cases.values())
    return plan, skipped


# =============================================================================================
# Worker: one process of a torchrun job
# =============================================================================================


def slowest(seconds: float, ctx: speedrun.Distributed, device: torch.device) -> float:
    """The largest of the processes' `seconds`."""
    if not ctx.active:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure_case(cfg: speedrun.Config, data: speedrun.DeviceData, ctx: speedrun.Distributed, device: torch.device,
                 steps: int, warmup: int, repeats: int) -> dict:
    """Seconds for `steps` training steps of `cfg` (its batch_size is the global batch), each
    repeat once with communication and, with several processes, once without. The steps are the
    run's usual ones, with the whitening bias (if any) frozen: frozen inside a timed window, it
    would add DDP's rebuild (and a recompilation) to that one window."""
    setup = speedrun.TrainingSetup(cfg, data, device, cfg.seed)
    model, local, n_batches = setup.model, setup.local_batch, setup.n_batches
    speedrun.init_whitening(model, data.train_x, cfg)  # the filters' values do not change the speed
    setup.freeze_whitening_bias()
    ema = setup.make_ema()
    n_train = data.train_x.shape[0]
    x, y = setup.epoch_batches(data, 0)

    def batches(k: int):
        """This process's share of k consecutive batches of the epoch, from its start again if k > n_batches."""
        order = torch.arange(k, device=device) % n_batches
        xs = setup.in_layout(x.view(n_batches, local, *x.shape[1:])[order].flatten(0, 1))
        return xs, y.view(n_batches, local)[order].flatten()

    watch = speedrun.Stopwatch(device)

    sync_bn = setup.sync_bn  # averages the BN statistics over the processes; None alone

    def timed(k: int, communicate: bool) -> float:
        """Seconds of k steps; without communication, no gradient all-reduce (no_sync) and no
        BN-statistics averaging."""
        xs, ys = batches(k)
        model.train()
        setup.sync_bn = sync_bn if communicate else None
        ctx.barrier()
        watch.start()
        with contextlib.nullcontext() if communicate or not ctx.active else setup.module.no_sync():
            speedrun.train_epoch(setup, ema, xs, ys, step=0)
        return slowest(watch.stop(), ctx, device)

    timed(warmup, True)
    if ctx.active:
        timed(warmup, False)
    synced, unsynced = [], []
    for _ in range(repeats):
        synced.append(timed(steps, True))
        if ctx.active:
            unsynced.append(timed(steps, False))
    return dict(batch_size=cfg.batch_size, ghost_bn_splits=cfg.ghost_bn_splits, per_rank_batch=local,
                ghost_bn_groups_per_rank=cfg.ghost_bn_splits // ctx.world, n_train=n_train, steps=steps,
                synced_s=synced, unsynced_s=unsynced or list(synced))


def run_worker(spec_path: Path) -> int:
    """One process of a job: time every case of the spec; rank 0 writes the result file. A failure
    is written to error-rank<R>.txt beside the spec (for the launcher's message), then re-raised."""
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    ctx = speedrun.Distributed()
    try:
        cfg = speedrun.Config(**spec["config"])
        ctx = speedrun.init_distributed(cfg)
        device = speedrun.pick_device(cfg.device)
        if device.type == "cpu":
            torch.set_num_threads(1)
        data = speedrun.load_data(cfg, device, quiet=True, url=spec["data_url"])
        cases = []
        for case in spec["cases"]:
            case_cfg = dataclasses.replace(cfg, batch_size=case["batch_size"], ghost_bn_splits=case["ghost_bn_splits"])
            measured = measure_case(case_cfg, data, ctx, device, spec["steps"], spec["warmup"], spec["repeats"])
            cases.append(dict(modes=case["modes"], **measured))
        if ctx.rank == 0:
            result = dict(procs=ctx.world, backend=dist.get_backend() if ctx.active else None,
                          environment=speedrun.environment(device), cases=cases)
            speedrun.save_json(result, Path(spec["result"]))
    except BaseException as e:
        message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        Path(spec_path).with_name(f"error-rank{rank}.txt").write_text(f"rank {rank}: {message}\n")
        raise
    finally:
        speedrun.leave_distributed()
    return 0


# =============================================================================================
# Launcher: one torchrun job per P, then the table, JSON, Markdown and chart
# =============================================================================================


def run_job(world: int, cases: list[dict], cfg: speedrun.Config, args, scratch: Path) -> dict:
    """Runs the cases of one P under torchrun; returns rank 0's result or raises JobFailed."""
    job = scratch / f"procs{world}"
    job.mkdir()
    spec = dict(config=dataclasses.asdict(cfg), cases=cases, steps=args.steps, warmup=args.warmup_steps,
                repeats=args.repeats, data_url=args.data_url, result=str(job / "result.json"))
    (job / "spec.json").write_text(speedrun.dumps_json(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), "--worker", str(job / "spec.json")]
    env = dict(os.environ)
    if speedrun.pick_device(cfg.device).type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (job / "result.json").exists():
        errors = [p.read_text().strip() for p in sorted(job.glob("error-rank*.txt"))]
        detail = "\n".join(f"  {line}" for line in (errors or proc.stderr.strip().splitlines()[-20:]))
        raise JobFailed(f"the {world}-process job failed (torchrun exit status {proc.returncode}):\n{detail}",
                        proc.returncode or 1)
    return json.loads((job / "result.json").read_text())


def make_rows(results: dict[int, dict], modes: list[str]) -> list[dict]:
    """One row per (mode, P) measured, with the derived numbers; speed-up is throughput relative
    to P=1 of the same mode, efficiency = speed-up / P."""
    rows = []
    for mode in modes:
        base = None  # P=1's images/s: P=1 is always measured, and runs whenever any P does
        for world in sorted(results):
            for case in results[world]["cases"]:
                if mode not in case["modes"]:
                    continue
                mean_s, sd_s = speedrun.mean_std(case["synced_s"])
                step_s = mean_s / case["steps"]
                step_sd_s = sd_s / case["steps"] if len(case["synced_s"]) > 1 else None
                unsynced_step_s = speedrun.mean_std(case["unsynced_s"])[0] / case["steps"]
                compute_s = min(unsynced_step_s, step_s)  # noise can make the run without communication slower
                images_per_s = case["batch_size"] / step_s
                base = base or images_per_s
                speedup = images_per_s / base
                steps_per_epoch = case["n_train"] // case["batch_size"]
                rows.append(dict(mode=mode, procs=world, global_batch=case["batch_size"],
                                 per_rank_batch=case["per_rank_batch"], ghost_bn_splits=case["ghost_bn_splits"],
                                 step_ms=1e3 * step_s, step_ms_sd=None if step_sd_s is None else 1e3 * step_sd_s,
                                 images_per_s=images_per_s,
                                 epoch_images=steps_per_epoch * case["batch_size"], steps_per_epoch=steps_per_epoch,
                                 epoch_s=steps_per_epoch * step_s, speedup=speedup, efficiency=speedup / world,
                                 no_communication_ms=1e3 * unsynced_step_s,
                                 compute_ms=1e3 * compute_s, communication_ms=1e3 * (step_s - compute_s),
                                 communication_frac=(step_s - compute_s) / step_s))
    return rows


def format_cells(row: dict) -> list[str]:
    spread = "" if row["step_ms_sd"] is None else f" ± {row['step_ms_sd']:.1f}"
    return [row["mode"], str(row["procs"]), str(row["global_batch"]), str(row["per_rank_batch"]),
            f"{row['step_ms']:.1f}{spread}", f"{row['images_per_s']:,.0f}", f"{row['epoch_s']:.2f}",
            f"{row['speedup']:.2f}x", f"{100 * row['efficiency']:.0f}%", f"{row['compute_ms']:.1f}",
            f"{row['communication_ms']:.1f}", f"{100 * row['communication_frac']:.0f}%"]


def noise_notes(rows: list[dict]) -> list[str]:
    """A line for each row whose steps without communication were the slower ones."""
    return [f"{r['mode']} P={r['procs']}: the steps without communication took {r['no_communication_ms']:.1f} ms, "
            f"more than with it: the timing noise exceeds the communication time, shown as 0"
            for r in rows if r["no_communication_ms"] > r["step_ms"]]


def scaling_table(rows: list[dict]) -> str:
    return "\n".join(speedrun_tools.markdown_table(COLUMNS, map(format_cells, rows))) + "\n"


def markdown_report(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    lines = ["# Scaling over processes", "",
             f"- hardware: {hardware_line(env, s)}",
             f"- command: `{report['command']}`",
             f"- {speedrun.plural(s['steps'], 'timed step')} after {speedrun.plural(s['warmup_steps'], 'warm-up step')}, "
             f"{speedrun.plural(s['repeats'], 'repeat')} (step ms: mean ± sd over repeats), backend {s['backend']}, "
             f"epoch of {s['n_train']} training images",
             "", scaling_table(report["rows"]).rstrip(), ""]
    lines += [f"- {s['mode']} P={s['procs']} skipped: {s['reason']}" for s in report["skipped"]]
    lines += [f"- {note}" for note in noise_notes(report["rows"])]
    lines += ["- strong: fixed global batch; weak: fixed per-rank batch. Speed-up = images/s over P=1's "
              "(measured once, the baseline of both modes); efficiency = speed-up / P.",
              "- epoch s = steps per epoch x step ms (no augmentation or evaluation). comm ms = step ms - the "
              "same steps without communication (no_sync, no BN-statistics averaging): the all-reduce time "
              "not hidden behind the backward pass, plus waiting for the slowest process."]
    if s["device_type"] == "cpu":
        lines.append(f"- {CPU_NOTICE}.")
    return "\n".join(lines) + "\n"


def hardware_line(env: dict, settings: dict) -> str:
    gpus = f"{settings['visible_gpus']} visible GPU(s), " if settings["device_type"] == "cuda" else ""
    return gpus + speedrun_tools.machine_line(env)


def chart_title(report: dict) -> str:
    """What the chart measures, then its scale (preset, width, batch, images, steps) and machine."""
    s, cfg = report["settings"], report["config"]
    return (f"time per training step against processes\npreset {study.preset_of(shlex.split(report['command']))}, "
            f"width {cfg['width']:g}, batch {cfg['batch_size']}, {s['n_train']:,} training images, "
            f"{speedrun.plural(s['steps'], 'timed step')} x {speedrun.plural(s['repeats'], 'repeat')}; "
            f"{hardware_line(report['environment'], s)}")


def draw_chart(path: Path, report: dict, plt) -> Path:
    """Throughput and efficiency against P for each mode, and stacked compute/communication bars;
    the legends below the axes, clear of the data."""
    rows = report["rows"]
    fig, (ax_rate, ax_eff, ax_split) = plt.subplots(1, 3, figsize=(15, 5.5))
    for mode, color in zip(MODES, ("tab:blue", "tab:orange")):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        procs = [r["procs"] for r in mine]
        ax_rate.plot(procs, [r["images_per_s"] for r in mine], marker="o", color=color, label=mode)
        ax_rate.plot(procs, [mine[0]["images_per_s"] * p for p in procs], ls=":", color=color, label=f"{mode}, ideal")
        ax_eff.plot(procs, [100 * r["efficiency"] for r in mine], marker="o", color=color, label=mode)
    all_procs = sorted({r["procs"] for r in rows})
    for ax, ylabel in ((ax_rate, "images/s"), (ax_eff, "efficiency, % (speed-up / P)")):
        ax.set_xticks(all_procs)
        ax.set_xlabel("processes P")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    ax_eff.axhline(100, color="gray", ls="--", lw=1)
    ax_rate.set_ylim(bottom=0)
    ax_eff.set_ylim(bottom=0)
    labels = [f"{r['mode']}\nP={r['procs']}" for r in rows]
    ax_split.bar(labels, [r["compute_ms"] for r in rows], color="tab:green", label="compute")
    ax_split.bar(labels, [r["communication_ms"] for r in rows], bottom=[r["compute_ms"] for r in rows],
                 color="tab:red", label="communication (+ waiting)")
    ax_split.set_ylabel("ms per step")
    ax_split.tick_params(axis="x", labelsize=8)
    ax_split.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle(chart_title(report), fontsize=10)
    return speedrun_tools.save_chart(fig, path)


def write_reports(folder: Path, report: dict, log=print) -> list[Path]:
    """scaling.json, scaling.md and (with matplotlib) scaling.png in `folder`; returns the paths written."""
    folder = Path(folder)
    speedrun.save_json(report, folder / "scaling.json")
    text = markdown_report(report)
    speedrun.write_atomic(folder / "scaling.md", lambda tmp: tmp.write_text(text))
    paths = [folder / "scaling.json", folder / "scaling.md"]
    plt = speedrun_tools.pyplot()
    if plt is None:
        log(CHART_NOTICE)
        return paths
    if report["rows"]:
        paths.append(draw_chart(folder / "scaling.png", report, plt))
    return paths


def build_parser():
    parser = speedrun_tools.tool_parser(__doc__)  # its own --out, a folder
    speedrun_tools.hide_flags(parser, "runs", "workers")  # each P is one torchrun job of one run's steps
    g = parser.add_argument_group("scaling")
    g.add_argument("--out", type=Path, default=None,
                   help="folder for scaling.json, scaling.md and scaling.png (default: runs/scaling-<timestamp>); "
                        "an existing non-empty folder is refused")
    g.add_argument("--max-procs", type=int, default=None,
                   help="measure P = 1, 2, 4, ... below N, and N (default: the visible GPUs; with --device cpu, the CPU cores)")
    g.add_argument("--procs", default=None, metavar="P1,P2,...", help="measure exactly these P (1 is always added)")
    g.add_argument("--mode", choices=("strong", "weak", "both"), default="both",
                   help="strong: fixed global batch; weak: fixed per-process batch (default: both)")
    g.add_argument("--steps", type=int, default=20, help="timed training steps per measurement (default: 20)")
    g.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before timing (default: 5)")
    g.add_argument("--repeats", type=int, default=3,
                   help="measurements of each case, with and without communication, alternating (default: 3)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # SPEC.json: run as a job's process
    return parser


def check_request(args, cfg: speedrun.Config, procs: list[int]) -> None:
    if cfg.runs != 1 or cfg.workers != 0:
        raise ValueError("--runs and --workers do not apply: each P is one torchrun job of one run's training steps")
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    speedrun.check_process_devices(cfg.device, max(procs), fewer="lower --max-procs/--procs")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)
    log = speedrun_tools.log_lines(args.quiet)
    try:
        cfg = speedrun.config_from_args(args)
        device = speedrun.pick_device(cfg.device)
        if args.procs is not None and args.max_procs is not None:
            raise ValueError("give --procs or --max-procs, not both")
        default_max = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
        procs = parse_procs(args.procs, args.max_procs if args.max_procs is not None else default_max)
        check_request(args, cfg, procs)
        modes = list(MODES) if args.mode == "both" else [args.mode]
        n_train = speedrun.image_counts(cfg)[0]
        plan, skipped = plan_cases(cfg, procs, modes, n_train)  # never empty: P=1 runs one global batch
        out = speedrun.reserve(args.out or Path("runs") / f"scaling-{speedrun.timestamp()}", "--out", folder=True,
                               numbered=args.out is None)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    command = speedrun_tools.command_line(__file__, argv)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as in each process, so that the environment line says what they use
    env = speedrun.environment(device)
    settings = dict(procs=procs, modes=modes, steps=args.steps, warmup_steps=args.warmup_steps, repeats=args.repeats,
                    n_train=n_train, device_type=device.type, backend="nccl" if device.type == "cuda" else "gloo",
                    threads_per_rank=1 if device.type == "cpu" else None,
                    visible_gpus=torch.cuda.device_count() if device.type == "cuda" else 0)
    log(f"hardware: {hardware_line(env, settings)}")
    log(f"command: {command}")
    if device.type == "cpu":
        log(CPU_NOTICE)
    for s in skipped:
        log(f"skipped {s['mode']} P={s['procs']}: {s['reason']}")

    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
            for world, cases in plan.items():
                t0 = time.perf_counter()
                results[world] = run_job(world, cases, cfg, args, Path(scratch))
                what = ", ".join(f"{'/'.join(c['modes'])} global batch {c['batch_size']} = {world} x {c['batch_size'] // world}"
                                 for c in cases)
                log(f"P={world}: {what} ({time.perf_counter() - t0:.1f} s)")
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.returncode
    report = dict(command=command, environment=env, settings=settings, config=dataclasses.asdict(cfg),
                  rows=make_rows(results, modes), skipped=skipped,
                  jobs={str(w): dict(backend=r["backend"], environment=r["environment"], cases=r["cases"])
                        for w, r in results.items()})
    log("\n" + scaling_table(report["rows"]).rstrip())
    for note in noise_notes(report["rows"]):
        log(f"note: {note}")
    paths = write_reports(out, report, log=log)
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared runner of the ablation studies: variants x seeds of speedrun.train, resumable and shardable.

A study is a list of variants (a name, a Config, the variant its differences are measured against)
run with the same seeds each (paired comparison). Everything lives in one study folder:

    study.json    what the study is (every variant's config) and who ran it (command, hardware)
    results.csv   one line per finished run, appended and fsynced; the resume mechanism
    summary.md    the Markdown table; summary.json holds the same numbers unrounded
    *.png         bar charts, curves, heatmaps (when matplotlib is installed)

Jobs are ordered seed-major (every variant at the first seed, then the next seed, ...), so an
interrupted study holds complete pairs for its early seeds. `--shard i/n` keeps jobs i, i+n, ...
(1-based) of that order; merge.py unions the shards' CSV files. `--workers N` (a speedrun flag) runs
N worker processes, one per visible CUDA GPU by default; only this parent process writes the CSV.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

CSV_COLUMNS = ("variant", "seed", "final_acc", "time_to_target_s", "epochs_to_target", "timed_s",
               "acc_by_epoch", "seconds_by_epoch", "device_name", "finished", "diverged_epoch")
# Config fields that say where or how often to run, not what a variant is.
UNSTORED_FIELDS = ("data_dir", "device", "seed", "runs", "workers")
DEFAULT_RUNS = 5
PLOT_NOTICE = speedrun_tools.no_chart("the plots", how="rerun, or run merge.py on the folder,")


class StudyError(ValueError):
    """A study folder or a request that cannot be used; the message says what to do."""


# =============================================================================================
# Variants and studies
# =============================================================================================


@dataclass
class Variant:
    name: str
    change: str                      # what differs from the base recipe, in words
    config: speedrun.Config
    reference: str | None = None     # the variant its differences are measured against, seed by seed
    tags: dict = field(default_factory=dict)  # kind-specific facts (grid coordinates, optimizer and LR)


@dataclass
class Report:
    """What a kind of study adds to the report every study gets (the variant table, the accuracy
    and time bars, the accuracy curves): tables(summary) -> markdown lines after the variant
    table; curves(summary) -> the variants the curves show (default: every one that ran);
    charts(folder, summary, plt) -> the paths of further charts. The client script that makes
    the study gives it its Report; merge.py looks it up by the study's kind."""
    tables: object = None
    curves: object = None
    charts: object = None


@dataclass
class Study:
    kind: str                        # tricks | cumulative | grid | optimizers
    title: str
    variants: list[Variant]
    notes: list[str] = field(default_factory=list)
    axes: dict = field(default_factory=dict)  # grid: {"x": [field, values], "y": [field, values]}
    report: Report = field(default_factory=Report)  # not part of the definition: how to report, not what ran

    def definition(self) -> dict:
        """The JSON form of the study, without seeds: two runs of the same study have equal definitions."""
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise StudyError(f"variant names repeat: {', '.join(names)}")
        variants = []
        for v in self.variants:
            cfg = {k: val for k, val in dataclasses.asdict(v.config).items() if k not in UNSTORED_FIELDS}
            variants.append(dict(name=v.name, change=v.change, reference=v.reference, tags=v.tags, config=cfg))
        definition = dict(kind=self.kind, title=self.title, notes=self.notes, axes=self.axes, variants=variants)
        return json.loads(speedrun.dumps_json(definition))  # the form it has after a trip through study.json


def make_variant(base: speedrun.Config, name: str, change: str, reference: str | None = None,
                 tags: dict | None = None, **fields) -> Variant:
    """The base config with `fields` replaced, checked; a bad combination names the variant."""
    try:
        cfg = dataclasses.replace(base, **fields)
        speedrun.check_config(cfg)
    except (TypeError, ValueError) as e:
        raise StudyError(f"variant {name!r}: {e}") from None
    return Variant(name, change, cfg, reference, tags or {})


def pick_variants(variants: list[Variant], wanted: str | None) -> list[Variant]:
    """The variants named in the comma-separated `wanted` (all when None), in the study's order."""
    if not wanted:
        return variants
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    known = {v.name for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise StudyError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(v.name for v in variants)}")
    picked = [v for v in variants if v.name in names]
    kept = {v.name for v in picked}
    return [v if v.reference in kept else dataclasses.replace(v, reference=None) for v in picked]


# =============================================================================================
# results.csv: one line per finished run
# =============================================================================================


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    if isinstance(value, (list, tuple)):  # per-epoch values; "-" for an epoch not evaluated (--eval-every)
        return " ".join("-" if x is None else repr(float(x)) for x in value)
    return str(value)


def _per_epoch(text: str) -> list[float | None]:
    return [None if x == "-" else float(x) for x in text.split()]


def _parse_row(cells: list[str], where: str) -> dict:
    if len(cells) != len(CSV_COLUMNS):
        raise StudyError(f"{where} has {len(cells)} fields, expected {len(CSV_COLUMNS)}: the file is damaged")
    raw = dict(zip(CSV_COLUMNS, cells))
    try:
        opt = lambda text, kind: kind(text) if text != "" else None  # noqa: E731
        return dict(variant=raw["variant"], seed=int(raw["seed"]), final_acc=opt(raw["final_acc"], float),
                    time_to_target_s=opt(raw["time_to_target_s"], float),
                    epochs_to_target=opt(raw["epochs_to_target"], int), timed_s=float(raw["timed_s"]),
                    acc_by_epoch=_per_epoch(raw["acc_by_epoch"]), seconds_by_epoch=_per_epoch(raw["seconds_by_epoch"]),
                    device_name=raw["device_name"], finished=raw["finished"],
                    diverged_epoch=opt(raw["diverged_epoch"], float))
    except ValueError as e:
        raise StudyError(f"{where} cannot be read ({e}): the file is damaged") from None


class ResultsFile:
    """results.csv. Appends whole lines with one write and an fsync; on reading, a last line without
    its newline (a crash in mid-write) is ignored, and cut off when `repair` is set."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self, repair: bool = False, log=print) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log(f"note: {self.path}: ignoring a half-written last line (a run interrupted while saving); "
                f"that run will be done again")
            if repair:
                os.truncate(self.path, cut)
            data = data[:cut]
        lines = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        if not lines:
            return []
        if tuple(lines[0]) != CSV_COLUMNS:
            raise StudyError(f"{self.path} does not start with the header of a study's results.csv "
                             f"({','.join(CSV_COLUMNS)}); is this the right folder?")
        return [_parse_row(cells, f"{self.path} line {k + 2}") for k, cells in enumerate(lines[1:])]

    def _ensure_header(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            speedrun.write_atomic(self.path, lambda tmp: tmp.write_text(",".join(CSV_COLUMNS) + "\n"))

    def append(self, row: dict) -> None:
        self._ensure_header()
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, buf.getvalue().encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_all(self, rows: list[dict]) -> None:
        """Replace the file with exactly these rows (merge.py)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
        speedrun.write_atomic(self.path, lambda tmp: tmp.write_text(buf.getvalue()))


def result_row(variant: str, result: dict, device_name: str) -> dict:
    """The CSV row of one speedrun.train result. timed_s = whitening + all training epochs. A diverged
    run has no final_acc and its diverged_epoch (0 when train did not say which)."""
    diverged = bool(result.get("diverged"))
    epochs = result.get("epochs") or []
    return dict(variant=variant, seed=result["seed"], final_acc=None if diverged else result["final_acc"],
                time_to_target_s=None if diverged else result["time_to_target_s"],
                epochs_to_target=None if diverged else result["epochs_to_target"],
                timed_s=(result.get("whitening_s") or 0.0) + (result.get("train_s") or 0.0),
                acc_by_epoch=[e["tta_acc"] for e in epochs], seconds_by_epoch=[e["train_s"] for e in epochs],
                device_name=device_name, finished=datetime.datetime.now().isoformat(timespec="seconds"),
                diverged_epoch=(result.get("diverged_epoch") or 0) if diverged else None)


# =============================================================================================
# Jobs, shards, workers
# =============================================================================================


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' with 1 <= i <= n -> (i, n); None -> (1, 1)."""
    if text is None:
        return 1, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise StudyError(f"--shard {text!r}: expected i/n, e.g. 1/2 (the first of two shards)") from None
    if not 1 <= i <= n:
        raise StudyError(f"--shard {text!r}: need 1 <= i <= n")
    return i, n


def job_list(variants: list[Variant], seeds: list[int]) -> list[tuple[Variant, int]]:
    return [(v, s) for s in seeds for v in variants]


def shard_jobs(jobs: list, shard: tuple[int, int]) -> list:
    i, n = shard
    return [job for k, job in enumerate(jobs) if k % n == i - 1]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_line(k: int, total: int, row: dict, target: float, started: float) -> str:
    elapsed = time.perf_counter() - started
    eta = elapsed / k * (total - k)
    ttt = row["time_to_target_s"]
    reached = f"{ttt:.2f} s" if ttt is not None else "not reached"
    outcome = (f"DIVERGED in epoch {row['diverged_epoch']:g} (the loss stopped being finite)" if row["final_acc"] is None
               else f"acc {100 * row['final_acc']:.2f}%, time-to-{100 * target:g}% {reached} ({row['timed_s']:.2f} s timed)")
    return (f"run {k} of {total}: variant {row['variant']}, seed {row['seed']}: {outcome} "
            f"| elapsed {_clock(elapsed)}, ETA {_clock(eta)}")


def in_run_progress(log):
    """What a study shows of a run while it trains: speedrun's progress line inside an epoch ("  step
    k of n: ...", every 30 s, so only where training is slow), as a single run shows it; not the
    epoch rows, since each run ends with its one line; from worker processes each line names its run
    ("  [seed s, worker k] step ...": speedrun.run_jobs). Nothing when the study's log is silent."""
    if log is speedrun.silent:
        return speedrun.silent
    return lambda text="", *args, **kwargs: log(text, *args, **kwargs) if str(text).startswith(("  step ", "  [seed ")) else None


def execute(jobs: list[tuple[Variant, int]], devices: list[str], on_row, threads: int | None = None,
            url: str = speedrun.CIFAR10_URL, log=speedrun.silent) -> None:
    """Run the jobs with speedrun.run_jobs, calling on_row(row) here as each finishes (in finishing order).
    The runs' progress lines go to `log`, from worker processes too (with the run's seed and worker)."""
    names = {}

    def on_result(index, result, device):
        if device not in names:
            names[device] = speedrun.environment(torch.device(device))["device_name"]
        on_row(result_row(jobs[index][0].name, result, names[device]))

    speedrun.run_jobs([(v.config, seed) for v, seed in jobs], devices, on_result, url=url, threads=threads,
                      log=in_run_progress(log))


def run_study(study: Study, folder: Path, seeds: list[int], base: speedrun.Config, shard=(1, 1),
              max_runs: int | None = None, threads: int | None = None, argv: list[str] | None = None,
              url: str = speedrun.CIFAR10_URL, log=print) -> dict:
    """Run the study's missing (variant, seed) jobs of this shard into `folder`, on the device and
    workers of `base` (its device and workers fields), then write the reports; returns the summary.
    A folder made for another study is refused."""
    folder = Path(folder)
    definition = study.definition()
    meta_path = folder / "study.json"
    sessions = []
    if meta_path.exists():
        meta = read_meta(folder)
        if meta["definition"] != definition:
            raise StudyError(f"{folder} holds a different study (its variants or their configs differ from "
                             f"this command's); pass a new --study folder, or the same flags as before")
        sessions = meta["sessions"]
    results = ResultsFile(folder / "results.csv")
    rows = results.read(repair=True, log=log)
    known = {v.name for v in study.variants}
    strangers = sorted({r["variant"] for r in rows} - known)
    if strangers:
        raise StudyError(f"{results.path} has rows of variants this study does not define: {', '.join(strangers)}")
    done = {(r["variant"], r["seed"]) for r in rows}
    jobs = shard_jobs(job_list(study.variants, seeds), shard)
    todo = [(v, s) for v, s in jobs if (v.name, s) not in done]
    if max_runs is not None:
        todo = todo[:max_runs]
    devices = speedrun.worker_devices(base, speedrun.pick_device(base.device), len(todo))

    folder.mkdir(parents=True, exist_ok=True)
    session = dict(argv=argv if argv is not None else sys.argv, shard=f"{shard[0]}/{shard[1]}", seeds=seeds,
                   environment=speedrun.environment(torch.device(devices[0])), workers=devices)
    write_meta(folder, definition, sessions + [session])
    where = f" (shard {shard[0]}/{shard[1]})" if shard != (1, 1) else ""
    already = sum((v.name, s) in done for v, s in jobs)
    log(f"study folder {folder}{where}: {len(jobs)} runs, {already} already done, {len(todo)} to run now "
        f"on {', '.join(devices)}; resume with --study {folder}")
    if len(devices) > 1 and all(d == "cpu" for d in devices):
        log("note: several CPU workers share the cores, so their times are not comparable with single-worker times")

    started, count = time.perf_counter(), 0

    def on_row(row):
        nonlocal count
        results.append(row)
        rows.append(row)
        count += 1
        target = next(v.config.target_acc for v in study.variants if v.name == row["variant"])
        log(_run_line(count, len(todo), row, target, started))

    try:
        execute(todo, devices, on_row, threads=threads, url=url, log=log)
    except BaseException:
        write_reports(folder, definition, rows, sessions + [session], log=speedrun.silent, report=study.report)  # the caller explains
        raise
    return write_reports(folder, definition, rows, sessions + [session], log=log, report=study.report)


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "study.json"
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta["definition"], dict) or not isinstance(meta["sessions"], list):
            raise TypeError
        for variant in meta["definition"]["variants"]:  # studies written before a field went plain
            variant["config"] = speedrun.upgrade_config(variant["config"])
    except FileNotFoundError:
        raise StudyError(f"{folder} is not a study folder (no study.json)") from None
    except (ValueError, KeyError, TypeError):
        raise StudyError(f"{path} is damaged (not the JSON a study writes)") from None
    return meta


def write_meta(folder: Path, definition: dict, sessions: list[dict]) -> None:
    speedrun.save_json(dict(definition=definition, sessions=sessions), Path(folder) / "study.json")


# =============================================================================================
# Statistics
# =============================================================================================


def _interval(values, low: float | None = None, high: float | None = None) -> list[float] | None:
    """The 95% t-interval of the mean, cut to [low, high] where the quantity cannot go beyond them."""
    if len(values) < 2:
        return None
    lo, hi = speedrun.confidence_interval(values)
    clip = lambda x: min(high, x) if high is not None else x  # noqa: E731
    return [clip(max(low, lo) if low is not None else lo), clip(max(low, hi) if low is not None else hi)]


def paired_difference(rows: list[dict], ref_rows: list[dict], key: str) -> dict:
    """Mean of the per-seed differences rows[key] - ref_rows[key], over seeds where both have a value,
    with a 95% paired t-interval (the t-interval of the differences)."""
    ref = {r["seed"]: r[key] for r in ref_rows if r[key] is not None}
    diffs = [r[key] - ref[r["seed"]] for r in rows if r[key] is not None and r["seed"] in ref]
    mean, std = speedrun.mean_std(diffs)
    return dict(pairs=len(diffs), mean=mean, std=std, ci95=_interval(diffs))


def diverged(row: dict) -> bool:
    return row["final_acc"] is None


def variant_stats(rows: list[dict], ref_rows: list[dict] | None, target: float) -> dict:
    """A variant's statistics: speedrun.summarize's (diverged runs count in `runs`, in `diverged` and
    as runs below the target; the accuracy and time statistics are over the runs that finished),
    with the intervals of the times, the timed seconds, and the paired differences from the reference."""
    finished = [r for r in rows if not diverged(r)]
    times = [r["time_to_target_s"] for r in finished if r["time_to_target_s"] is not None]
    epochs = [r["epochs_to_target"] for r in finished if r["epochs_to_target"] is not None]
    timed = [r["timed_s"] for r in finished]
    timed_mean, timed_std = speedrun.mean_std(timed)
    runs = sorted((dict(r, diverged=diverged(r)) for r in rows), key=lambda r: r["seed"])
    stats = dict(speedrun.summarize(runs, target), seeds=[r["seed"] for r in runs],
                 time_to_target_ci95=_interval(times, 0.0), epochs_to_target_mean=speedrun.mean_std(epochs)[0],
                 timed_mean_s=timed_mean, timed_std_s=timed_std, timed_ci95=_interval(timed, 0.0))
    if ref_rows is not None:
        ref_finished = [r for r in ref_rows if not diverged(r)]
        stats["delta_acc"] = paired_difference(finished, ref_finished, "final_acc")
        stats["delta_time_to_target_s"] = paired_difference(finished, ref_finished, "time_to_target_s")
        stats["delta_timed_s"] = paired_difference(finished, ref_finished, "timed_s")
    return stats


def mean_curves(rows: list[dict]) -> dict | None:
    """Mean over the finished (not diverged) runs of accuracy and cumulative timed seconds at each
    epoch that every run evaluated (with --eval-every K, the others have no accuracy)."""
    rows = [r for r in rows if not diverged(r)]
    if not rows:
        return None
    n = min(len(r["acc_by_epoch"]) for r in rows)
    evaluated = [e for e in range(n) if all(r["acc_by_epoch"][e] is not None for r in rows)]
    acc = [sum(r["acc_by_epoch"][e] for r in rows) / len(rows) for e in evaluated]
    sec = [sum(r["seconds_by_epoch"][e] for r in rows) / len(rows) for e in evaluated]
    return dict(epoch=[e + 1 for e in evaluated], acc=acc, seconds=sec)


def build_summary(definition: dict, rows: list[dict], sessions: list[dict]) -> dict:
    by_variant = {v["name"]: [] for v in definition["variants"]}
    for r in rows:
        by_variant[r["variant"]].append(r)
    variants = []
    for v in definition["variants"]:
        own, ref = by_variant[v["name"]], v["reference"]
        entry = dict(name=v["name"], change=v["change"], reference=ref, tags=v["tags"])
        if own:
            entry.update(variant_stats(own, by_variant.get(ref) if ref else None, v["config"]["target_acc"]))
            entry["curves"] = mean_curves(own)
        else:
            entry["runs"] = 0
        variants.append(entry)
    torch_versions = sorted({s["environment"]["torch"] for s in sessions})
    seeds = sorted({r["seed"] for r in rows})
    return dict(kind=definition["kind"], title=definition["title"], notes=definition["notes"],
                axes=definition["axes"], runs_total=len(rows), seeds=seeds,
                hardware=sorted({r["device_name"] for r in rows}), torch=torch_versions,
                commands=[shlex.join(["python", *s["argv"]]) if s["argv"] else "" for s in sessions],
                scale=study_scale(definition, sessions, seeds), variants=variants)


def preset_of(argv: list[str]) -> str:
    """The --preset a study's command gave (speedrun's default when none)."""
    for k, arg in enumerate(argv):
        if arg == "--preset" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return "davidnet"


def study_scale(definition: dict, sessions: list[dict], seeds: list[int]) -> str:
    """The size of what ran, for every chart's title: preset, images, epochs, seeds (the device is
    the summary's hardware), e.g. 'preset cpu, width 0.25, 10,000 training / 10,000 test images, 4 epochs, 5 seeds'."""
    configs = [v["config"] for v in definition["variants"]]
    presets = sorted({preset_of(s["argv"]) for s in sessions if s["argv"]}) or ["davidnet"]
    widths = sorted({c["width"] for c in configs})
    epochs = sorted({c["epochs"] for c in configs})
    train = sorted({c["subset"] or speedrun.CIFAR10_SIZES[0] for c in configs})
    test = sorted({c["test_subset"] or speedrun.CIFAR10_SIZES[1] for c in configs})
    span = lambda values, fmt="{:g}": fmt.format(values[0]) + ("" if len(values) == 1 else f"-{fmt.format(values[-1])}")  # noqa: E731
    width = "" if widths == [1.0] else f", width {span(widths)}"
    return (f"preset {', '.join(presets)}{width}, {span(train, '{:,}')} training / {span(test, '{:,}')} test images, "
            f"{span(epochs)} epochs, {speedrun.plural(len(seeds), 'seed')}")


def chart_title(summary: dict, fig, what: str | None = None) -> str:
    """A chart's title: the study's (or `what`), then its scale and device, wrapped to the figure's width."""
    lines = [what or summary["title"], f"{summary.get('scale') or ''}; {'; '.join(summary['hardware'])}"]
    return "\n".join(textwrap.fill(line, int(12 * fig.get_figwidth())) for line in lines)


# =============================================================================================
# Reports: summary.md, summary.json, charts
# =============================================================================================


def fmt_pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def fmt_sec(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _range(ci, scale=1.0) -> str:
    return "—" if ci is None else f"{scale * ci[0]:.2f} .. {scale * ci[1]:.2f}"


def format_delta(d: dict | None, scale: float) -> str:
    """'-0.27 (-0.51 .. -0.02)': a paired difference and its 95% interval (times scale); '—' without pairs."""
    if not d or d["pairs"] == 0:
        return "—"
    text = f"{scale * d['mean']:+.2f}"
    return text + (f" ({_range(d['ci95'], scale)})" if d["ci95"] else " (1 pair)")


def variant_table(summary: dict) -> list[str]:
    target = next((v["target_acc"] for v in summary["variants"] if v["runs"]), 0.94)
    pct = f"{100 * target:g}%"
    columns = ["variant", "change", "runs", "acc % mean (std)", "acc % 95% CI", f"at {pct}", f"time-to-{pct} s (runs)",
               f"epochs-to-{pct}", "timed s", "Δ acc pp (95% CI)", f"Δ time-to-{pct} s (95% CI)"]
    rows = []
    for v in summary["variants"]:
        if not v["runs"]:
            rows.append([v["name"], v["change"], 0, "not run yet"] + [""] * 7)
            continue
        runs = f"{v['runs']} ({v['diverged']} diverged)" if v.get("diverged") else f"{v['runs']}"
        if v["acc_mean"] is None:
            rows.append([v["name"], v["change"], runs, "diverged (every run)", "—", "0%"] + ["—"] * 5)
            continue
        ttt = "—" if not v["runs_reaching_target"] else f"{v['time_to_target_mean_s']:.2f} ({v['runs_reaching_target']})"
        ett = "—" if v["epochs_to_target_mean"] is None else f"{v['epochs_to_target_mean']:.1f}"
        std = fmt_pct(v["acc_std"]) if v["runs"] - v.get("diverged", 0) > 1 else "—"
        rows.append([v["name"], v["change"], runs, f"{fmt_pct(v['acc_mean'])} ({std})", _range(v["acc_ci95"], 100),
                     f"{100 * v['frac_at_target']:.0f}%", ttt, ett, fmt_sec(v["timed_mean_s"]),
                     format_delta(v.get("delta_acc"), 100), format_delta(v.get("delta_time_to_target_s"), 1)])
    return speedrun_tools.markdown_table(columns, rows)


def summary_markdown(summary: dict, report: Report = Report()) -> str:
    seeds = summary["seeds"]
    lines = [f"# {summary['title']}", "",
             f"- hardware: {'; '.join(summary['hardware']) or '—'}; torch {', '.join(summary['torch'])}",
             *[f"- command: `{c}`" for c in dict.fromkeys(summary["commands"]) if c],
             f"- runs: {summary['runs_total']} in results.csv; seeds {', '.join(map(str, seeds)) or '—'}, "
             f"the same seeds for every variant (paired comparison)",
             "- acc: final EMA+TTA test accuracy; timed s: whitening + every training epoch (speedrun's timer); "
             "time-to-target: mean over the runs that reached it (their count in brackets); "
             "Δ: mean of the per-seed differences from the reference variant, with a 95% paired t-interval; "
             "a diverged run (its loss stopped being finite) counts as a run below the target and is left out "
             "of the other columns",
             *[f"- {n}" for n in summary["notes"]], ""]
    lines += variant_table(summary)
    if report.tables:
        lines += report.tables(summary)
    return "\n".join(lines) + "\n"


def write_reports(folder: Path, definition: dict, rows: list[dict], sessions: list[dict], log=print,
                  report: Report = Report()) -> dict:
    summary = build_summary(definition, rows, sessions)
    folder = Path(folder)
    speedrun.save_json(summary, folder / "summary.json")
    text = summary_markdown(summary, report)
    speedrun.write_atomic(folder / "summary.md", lambda tmp: tmp.write_text(text))
    if not rows:
        return summary
    plt = speedrun_tools.pyplot()
    if plt is None:
        log(PLOT_NOTICE)
    charts = draw_charts(folder, summary, plt, report) if plt else []
    log("\n" + text.rstrip())
    log(f"written: {folder / 'results.csv'}, {folder / 'summary.md'}, {folder / 'summary.json'}"
        + "".join(f", {p.name}" for p in charts))
    return summary


def _errors(values, cis):
    """matplotlib's asymmetric error bars [[below], [above]] from 95% intervals (cut where the quantity
    cannot go, e.g. a time below 0 s); none where an interval is missing (a single run)."""
    below = [0.0 if ci is None or v is None else v - ci[0] for v, ci in zip(values, cis)]
    above = [0.0 if ci is None or v is None else ci[1] - v for v, ci in zip(values, cis)]
    return [below, above]


def _rows_axis(ax, names):
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first variant at the top
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)


def draw_accuracy(folder: Path, summary: dict, ran: list[dict], plt) -> Path:
    """accuracy.png: each variant's mean accuracy with its 95% interval (points, not bars: a bar's
    length from a cut axis would exaggerate), and, where variants have a reference, a forest plot of
    each one's paired difference from it with its 95% interval and the zero line."""
    names = [v["name"] for v in ran]
    paired = any(v.get("delta_acc") and v["delta_acc"]["pairs"] for v in ran)
    fig, axes = plt.subplots(1, 2 if paired else 1, sharey=True, figsize=(11 if paired else 7, 0.4 * len(ran) + 2.2),
                             squeeze=False)
    ax = axes[0][0]
    means = [100 * v["acc_mean"] for v in ran]
    cis = [None if v["acc_ci95"] is None else [100 * x for x in v["acc_ci95"]] for v in ran]
    ax.errorbar(means, range(len(ran)), xerr=_errors(means, cis), fmt="o", color="tab:blue", capsize=3)
    ax.axvline(100 * ran[0]["target_acc"], color="gray", ls="--", lw=1, label=f"target {100 * ran[0]['target_acc']:g}%")
    _rows_axis(ax, names)
    ax.set_xlabel("final EMA+TTA test accuracy, % (mean, 95% CI)")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    if paired:
        ax = axes[0][1]
        deltas = [v.get("delta_acc") if v.get("delta_acc") and v["delta_acc"]["pairs"] else None for v in ran]
        ys = [k for k, d in enumerate(deltas) if d]
        values = [100 * deltas[k]["mean"] for k in ys]
        dcis = [None if deltas[k]["ci95"] is None else [100 * x for x in deltas[k]["ci95"]] for k in ys]
        ax.errorbar(values, ys, xerr=_errors(values, dcis), fmt="s", color="tab:red", capsize=3)
        ax.axvline(0, color="black", lw=1)
        for k, v in enumerate(ran):
            if deltas[k] is None:
                ax.text(0, k, " reference" if any(w["reference"] == v["name"] for w in ran) else " no pairs",
                        va="center", fontsize=8, color="0.3")
        _rows_axis(ax, names)
        ax.set_xlabel("Δ accuracy from the reference, points (paired by seed, 95% CI)")
        low, high = min([0.0, *values, *(c[0] for c in dcis if c)]), max([0.0, *values, *(c[1] for c in dcis if c)])
        pad = 0.08 * (high - low or 1.0)
        ax.set_xlim(low - pad, high + pad)
    fig.suptitle(chart_title(summary, fig), fontsize=10)
    return speedrun_tools.save_chart(fig, folder / "accuracy.png")


def draw_times(folder: Path, summary: dict, ran: list[dict], plt) -> Path:
    """time.png: timed seconds for the whole budget and, when any variant reached the target, the
    time-to-target of the runs that did; bars from 0 s with 95% intervals cut at 0."""
    names = [v["name"] for v in ran]
    pct = f"{100 * ran[0]['target_acc']:g}%"
    reached = any(v["runs_reaching_target"] for v in ran)
    fig, axes = plt.subplots(1, 2 if reached else 1, sharey=True, figsize=(11 if reached else 7, 0.4 * len(ran) + 2.2),
                             squeeze=False)
    panels = [("timed_mean_s", "timed_ci95", "tab:green", "timed s for the whole budget (mean, 95% CI)")]
    if reached:
        panels.insert(0, ("time_to_target_mean_s", "time_to_target_ci95", "tab:orange",
                          f"time-to-{pct}, s (mean of the runs reaching it, 95% CI)"))
    for ax, (key, ci_key, colour, label) in zip(axes[0], panels):
        values = [v[key] for v in ran]
        shown = [0.0 if x is None else x for x in values]
        ax.barh(range(len(ran)), shown, color=colour, xerr=_errors(values, [v[ci_key] for v in ran]), capsize=3)
        for k, x in enumerate(values):
            if x is None:
                ax.text(0, k, " not reached", va="center", fontsize=8)
        _rows_axis(ax, names)
        ax.set_xlim(0, None)
        ax.set_xlabel(label)
    what = summary["title"] + ("" if reached else f" (no variant reached {pct}: only the budget's time)")
    fig.suptitle(chart_title(summary, fig, what), fontsize=10)
    return speedrun_tools.save_chart(fig, folder / "time.png")


def draw_charts(folder: Path, summary: dict, plt, report: Report = Report()) -> list[Path]:
    ran = [v for v in summary["variants"] if v["runs"] and v["acc_mean"] is not None]  # not those that all diverged
    if not ran:
        return []
    paths = [draw_accuracy(folder, summary, ran, plt), draw_times(folder, summary, ran, plt)]
    # accuracy curves against epoch and against timed seconds; the legend beside the axes, clear of the lines
    curves = report.curves(summary) if report.curves else ran
    for xkey, xlabel, name in (("epoch", "epoch", "curves_epoch.png"), ("seconds", "timed seconds", "curves_seconds.png")):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        for v in curves:
            ax.plot(v["curves"][xkey], [100 * a for a in v["curves"]["acc"]], marker="o", ms=3, label=v["name"])
        ax.axhline(100 * ran[0]["target_acc"], color="gray", ls="--", lw=1)
        ax.set_ylim(0, 100)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("EMA+TTA test accuracy, % (mean over seeds)")
        ax.set_title(chart_title(summary, fig), fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(speedrun_tools.save_chart(fig, folder / name))

    if report.charts:
        paths += report.charts(folder, summary, plt)
    return paths


# =============================================================================================
# Command line, shared by tricks.py, grid.py and optimizers.py
# =============================================================================================


def build_parser(doc: str) -> argparse.ArgumentParser:
    """speedrun's parser (every Config flag, --runs defaulting to DEFAULT_RUNS: the seeds every
    variant shares) for the study script of docstring `doc`, plus the study flags."""
    p = speedrun_tools.tool_parser(doc)
    speedrun_tools.tool_defaults(p, runs=DEFAULT_RUNS)
    g = p.add_argument_group("study")
    g.add_argument("--study", type=Path, default=None,
                   help="study folder (default: a new studies/<name>-<timestamp>/); rerun with the same folder to resume")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="run only jobs I, I+N, I+2N, ... of the study (1-based); merge the shards with ablations/merge.py")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: torch's, shared out among CPU workers); --workers sets the processes")
    g.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resume later)")
    return p


def default_study_folder(name: str, root: Path = Path("studies")) -> Path:
    return open_folder(None, "--study", root / f"{name}-{speedrun.timestamp()}")


def open_folder(folder: Path | None, flag: str, default: Path | None = None) -> Path:
    """The folder a study writes into: `folder` if it holds a study (resumed; our stale temporaries
    in it removed), else reserved new (`default`, numbered, when folder is None). A folder or file
    there that is not a study is refused: a study never writes into a stranger's folder."""
    if folder is None:
        return speedrun.reserve(default, flag, folder=True, numbered=True)
    folder = Path(folder)
    if (folder / "study.json").is_file():
        speedrun.remove_stale_temporaries(folder, speedrun._warn)
        return folder
    if folder.exists() or folder.is_symlink():
        raise StudyError(f"{flag} {folder} exists and is not a study folder (no study.json); choose a new folder")
    return speedrun.reserve(folder, flag, folder=True)


def resume_command(argv: list[str], folder: Path) -> str:
    """The shell command that resumes the study in `folder`: argv (script first) with --study FOLDER."""
    given = any(a == "--study" or a.startswith("--study=") for a in argv)
    return shlex.join(["python", *map(str, argv), *([] if given else ["--study", str(folder)])])


def main(parser, make_study, name, script: str, argv=None) -> int:
    """Parse, build the study with make_study(args, base_config), run it; errors exit with status 2,
    Ctrl-C and SIGTERM with 130, each with one line that says how to resume.
    `name` (a string, or a function of the parsed arguments) names the default study folder;
    `script` is how the command is written in the summary."""
    args = parser.parse_args(argv)
    log = speedrun_tools.log_lines(args.quiet)
    folder = argv_used = None
    with speedrun.sigterm_as_interrupt():
        try:
            if args.max_runs is not None and args.max_runs < 0:
                raise StudyError(f"--max-runs must be 0 or more, got {args.max_runs}")
            if args.threads is not None and args.threads < 1:
                raise StudyError(f"--threads must be at least 1, got {args.threads}")
            cfg = speedrun.config_from_args(args)
            shard = parse_shard(args.shard)
            study = make_study(args, cfg)
            if speedrun.pick_device(cfg.device).type == "cpu" and cfg.subset == 0:
                log("warning: a full CPU run takes hours, and a study is many runs; try e.g. "
                    "--subset 5000 --test-subset 1000 --width 0.25 --epochs 2")
            folder = open_folder(args.study, "--study") if args.study else \
                default_study_folder(name(args) if callable(name) else name)
            seeds = list(range(cfg.seed, cfg.seed + cfg.runs))
            argv_used = [script, *(sys.argv[1:] if argv is None else argv)]
            run_study(study, folder, seeds, cfg, shard=shard, max_runs=args.max_runs, threads=args.threads,
                      argv=argv_used, url=args.data_url, log=log)
        except (ValueError, RuntimeError, OSError, speedrun.DataError) as e:  # OSError: e.g. the disk filled up
            speedrun.release_outputs()
            failed_run = isinstance(e, (RuntimeError, OSError)) and folder is not None and (folder / "results.csv").exists()
            resume = f"; finished runs are saved in {folder}; after fixing this, resume with: {resume_command(argv_used, folder)}" \
                if failed_run else ""
            parser.exit(2, f"error: {e}{resume}\n")
        except KeyboardInterrupt:
            speedrun.release_outputs()
            if folder is None or not (folder / "study.json").exists():
                parser.exit(130, "interrupted before the study started; nothing was written\n")
            parser.exit(130, f"interrupted: finished runs are saved in {folder}; resume with: "
                             f"{resume_command(argv_used, folder)}\n")
    return 0


def explain(argv=None) -> int:
    """`python ablations/study.py`: the module runs no study itself; its --help says what it is and
    which scripts run studies, and anything else is an error that names them."""
    scripts = "ablations/tricks.py, ablations/grid.py and ablations/optimizers.py"
    description, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="study.py", description=description, epilog=f"{rest.rstrip()}\n\nthe studies: "
                                f"{scripts} (each with --help); ablations/merge.py merges their shards.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    p.exit(2, f"error: study.py runs no study itself; run {scripts} (see --help)\n")


if __name__ == "__main__":
    sys.exit(explain())

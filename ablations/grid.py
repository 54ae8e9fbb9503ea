#!/usr/bin/env python3
"""A sweep of two Config fields, drawn as heatmaps of accuracy and of time.

    python ablations/grid.py                                           # batch_size x lr (the default axes)
    python ablations/grid.py --x epochs=8,9,10 --y lr=0.6,0.8,1.0 --runs 3
    python ablations/grid.py --x ema_momentum=0.98,0.99 --y label_smoothing=0,0.1,0.2

Every speedrun.py flag sets the base recipe; each cell replaces the two fields. The cell equal to
the base recipe, when the grid has it, is the reference of the Δ columns.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    from ablations import study
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

DEFAULT_X, DEFAULT_Y = "batch_size=256,512,1024", "lr=0.5,1.0,2.0"


def parse_axis(text: str, flag: str) -> tuple[str, list]:
    """'FIELD=V1,V2,...' -> (field, typed values)."""
    fields = {f.name: f for f in dataclasses.fields(speedrun.Config)}
    name, eq, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not values.strip():
        raise study.StudyError(f"{flag} {text!r}: expected FIELD=V1,V2,... e.g. {flag} {DEFAULT_X}")
    if name not in fields or name in study.UNSTORED_FIELDS:
        allowed = ", ".join(n for n in fields if n not in study.UNSTORED_FIELDS)
        raise study.StudyError(f"{flag} {text!r}: {name!r} is not a field a grid can sweep; choose one of {allowed}")
    try:
        parsed = [speedrun.parse_field_value(fields[name], v.strip()) for v in values.split(",") if v.strip()]
    except ValueError as e:
        raise study.StudyError(f"{flag}: {e}") from None
    if len(set(parsed)) != len(parsed):
        raise study.StudyError(f"{flag} {text!r}: a value repeats")
    return name, parsed


def grid_tables(summary: dict) -> list[str]:
    """Markdown tables of the grid, rows y and columns x: mean accuracy, time-to-target, timed seconds."""
    (xf, xs), (yf, ys) = summary["axes"]["x"], summary["axes"]["y"]
    cell = {(v["tags"]["x"], v["tags"]["y"]): v for v in summary["variants"]}
    out = []
    for title, show in (("mean accuracy %", lambda v: "diverged" if v["acc_mean"] is None else study.fmt_pct(v["acc_mean"])
                         + (f" ({v['diverged']} diverged)" if v.get("diverged") else "")),
                        ("mean time-to-target s (runs reaching it)", lambda v: "—" if not v["runs_reaching_target"]
                         else f"{v['time_to_target_mean_s']:.2f} ({v['runs_reaching_target']})"),
                        ("mean timed s (whole budget)", lambda v: study.fmt_sec(v["timed_mean_s"]))):
        out += ["", f"{title}, rows {yf}, columns {xf}:", ""]
        out += speedrun_tools.markdown_table([f"{yf} \\ {xf}", *xs], [[y, *(show(cell[x, y]) if cell[x, y]["runs"] else "—" for x in xs)]
                                                                for y in ys])
    return out


def time_measure(variants: list[dict]) -> tuple[str, str]:
    """Which time to chart: time-to-target when some variant reached it, else the whole budget."""
    if any(v["runs_reaching_target"] for v in variants):
        return "time_to_target", "time-to-target, s (mean of runs reaching it)"
    return "timed", "timed s for the whole budget (no run reached the target)"


def heatmaps(folder: Path, summary: dict, plt) -> list[Path]:
    """heatmap_accuracy.png and heatmap_time.png: one cell per grid point, rows y and columns x."""
    ran = [v for v in summary["variants"] if v["runs"] and v["acc_mean"] is not None]
    (xf, xs), (yf, ys) = summary["axes"]["x"], summary["axes"]["y"]
    cell = {(v["tags"]["x"], v["tags"]["y"]): v for v in summary["variants"]}
    measure, label = time_measure(ran)
    paths = []
    for name, title, get in (
            ("heatmap_accuracy.png", "mean final accuracy, %", lambda v: 100 * v["acc_mean"]),
            ("heatmap_time.png", label, lambda v: v["time_to_target_mean_s"] if measure == "time_to_target"
             else v["timed_mean_s"])):
        grid = [[(get(cell[x, y]) if cell[x, y]["runs"] and cell[x, y]["acc_mean"] is not None else None)
                 for x in xs] for y in ys]
        values = [[math.nan if g is None else g for g in row] for row in grid]
        fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 1.0 * len(ys) + 1.8))
        im = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(xf)
        ax.set_ylabel(yf)
        for i, row in enumerate(grid):
            for j, g in enumerate(row):
                ax.text(j, i, "—" if g is None else f"{g:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
        ax.set_title(study.chart_title(summary, fig, f"{summary['title']}: {title}"), fontsize=8)
        paths.append(speedrun_tools.save_chart(fig, folder / name))
    return paths


REPORT = study.Report(tables=grid_tables, charts=heatmaps)


def make_study(args, base: speedrun.Config) -> study.Study:
    (xf, xs), (yf, ys) = parse_axis(args.x, "--x"), parse_axis(args.y, "--y")
    if xf == yf:
        raise study.StudyError(f"--x and --y both sweep {xf}; choose two different fields")
    base_cell = (getattr(base, xf), getattr(base, yf))
    reference = f"{xf}={base_cell[0]} {yf}={base_cell[1]}" if base_cell[0] in xs and base_cell[1] in ys else None
    variants = [study.make_variant(base, f"{xf}={x} {yf}={y}", f"{xf}={x}, {yf}={y}",
                                   reference=reference if (x, y) != base_cell else None,
                                   tags=dict(x=x, y=y), **{xf: x, yf: y})
                for y in ys for x in xs]
    notes = [f"Δ columns: cell minus the base recipe's cell ({reference})" if reference else
             "Δ columns: none (the grid does not contain the base recipe's cell)"]
    return study.Study("grid", f"Grid: {xf} x {yf}", variants, notes, axes=dict(x=[xf, xs], y=[yf, ys]), report=REPORT)


def build_parser():
    p = study.build_parser(__doc__)
    p.add_argument("--x", default=DEFAULT_X, metavar="FIELD=V1,V2,...", help=f"columns of the grid (default: {DEFAULT_X})")
    p.add_argument("--y", default=DEFAULT_Y, metavar="FIELD=V1,V2,...", help=f"rows of the grid (default: {DEFAULT_Y})")
    return p


def main(argv=None) -> int:
    return study.main(build_parser(), make_study, "grid", "ablations/grid.py", argv)


if __name__ == "__main__":
    sys.exit(main())

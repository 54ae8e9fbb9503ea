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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ablations import study  # noqa: E402
import speedrun  # noqa: E402

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
    return study.Study("grid", f"Grid: {xf} x {yf}", variants, notes, axes=dict(x=[xf, xs], y=[yf, ys]))


def build_parser():
    p = study.build_parser(__doc__.split("\n\n")[0])
    p.add_argument("--x", default=DEFAULT_X, metavar="FIELD=V1,V2,...", help=f"columns of the grid (default: {DEFAULT_X})")
    p.add_argument("--y", default=DEFAULT_Y, metavar="FIELD=V1,V2,...", help=f"rows of the grid (default: {DEFAULT_Y})")
    return p


def main(argv=None) -> int:
    return study.main(build_parser(), make_study, "grid", "ablations/grid.py", argv)


if __name__ == "__main__":
    sys.exit(main())

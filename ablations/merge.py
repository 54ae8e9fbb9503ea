#!/usr/bin/env python3
"""Merge the study folders of shards (--shard i/n) into one: results, summary and charts.

    python ablations/merge.py OUT_DIR SHARD_DIR [SHARD_DIR ...]

Rows are keyed by (variant, seed): a run found in several folders counts once (the first found,
in the order given; rows already in OUT_DIR come first). Every folder must hold the same study
(same variants and configs). Also redraws the charts of a single folder: merge.py DIR DIR.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
    from ablations import grid, optimizers, study
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

# The reports that a kind of study adds to the shared one (tricks studies add none).
REPORTS = {"grid": grid.REPORT, "optimizers": optimizers.REPORT}


def merge(out: Path, sources: list[Path], log=print) -> dict:
    """Union of the sources' rows into `out`; returns the summary."""
    out = study.open_folder(out, "merge into")
    folders = ([out] if (out / "results.csv").exists() else []) + [Path(s) for s in sources]
    definition, sessions, rows, seen, repeats = None, [], [], set(), 0
    for folder in dict.fromkeys(folders):
        meta = study.read_meta(folder)
        if definition is None:
            definition = meta["definition"]
        elif meta["definition"] != definition:
            raise study.StudyError(f"{folder} holds a different study from {folders[0]} (variants or configs differ); "
                                   f"only shards of one study can be merged")
        sessions += [s for s in meta["sessions"] if s not in sessions]
        for row in study.ResultsFile(folder / "results.csv").read(log=log):
            key = (row["variant"], row["seed"])
            if key in seen:
                repeats += 1
                continue
            seen.add(key)
            rows.append(row)
    known = [v["name"] for v in definition["variants"]]
    strangers = sorted({r["variant"] for r in rows} - set(known))
    if strangers:
        raise study.StudyError(f"rows of variants the study does not define: {', '.join(strangers)}")
    rows.sort(key=lambda r: (r["seed"], known.index(r["variant"])))
    out.mkdir(parents=True, exist_ok=True)
    study.ResultsFile(out / "results.csv").write_all(rows)
    study.write_meta(out, definition, sessions)
    log(f"merged {len(rows)} runs from {len(dict.fromkeys(folders))} folders into {out}"
        + (f"; {repeats} repeated (variant, seed) rows counted once" if repeats else ""))
    return study.write_reports(out, definition, rows, sessions, log=log, report=REPORTS.get(definition["kind"], study.Report()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="merged study folder (created, or extended when it already holds results)")
    p.add_argument("shards", type=Path, nargs="+", help="study folders of the shards")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = p.parse_args(argv)
    try:
        merge(args.out, args.shards, log=speedrun_tools.log_lines(args.quiet))
    except (ValueError, OSError) as e:  # OSError: a read-only or full folder
        speedrun.release_outputs()
        p.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

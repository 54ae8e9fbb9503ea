"""What the tools around the trainer share and the trainer itself does not use: how a tool was
started, its log, the optional charts (matplotlib), a one-line description of the machine, and
the parts of a tool's --help that speedrun's parser cannot know (its own examples and defaults).

The trainer stays speedrun.py; profile/, ablations/ and bench/ import both modules.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

import speedrun


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """How a tool was started, to paste again: 'python SCRIPT ARGS', the script relative to here."""
    return shlex.join(["python", os.path.relpath(Path(script).resolve(), Path.cwd()),
                       *(sys.argv[1:] if argv is None else map(str, argv))])


def log_lines(quiet: bool = False):
    """The log of a tool: print, each line flushed at once (also through a pipe), or nothing when quiet."""
    return speedrun.silent if quiet else (lambda *args, **kwargs: print(*args, **kwargs, flush=True))


def machine_line(env: dict) -> str:
    """One line for a report, from speedrun.environment(): e.g. 'GPU NVIDIA H100 80GB HBM3 (CUDA 13.0),
    torch 2.11.0+cu130, Python 3.11.7' or 'CPU AMD EPYC (2 cores, 2 torch threads), torch 2.13.0+cpu, ...'."""
    where = f"GPU {env['device_name']} (CUDA {env['cuda']})" if env["device"].startswith("cuda") else env["device_name"]
    return f"{where}, torch {env['torch']}, Python {env['python']}"


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None: matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def no_chart(what: str, how: str = "rerun") -> str:
    """The line a tool prints where matplotlib is missing: no chart, and how to get `what`."""
    return f"no chart: matplotlib is not installed (pip install matplotlib, then {how} to get {what})"


def save_chart(fig, path: Path) -> Path:
    """The figure, laid out, as a PNG at `path` (written atomically); the figure is then closed."""
    fig.tight_layout()
    speedrun.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    pyplot().close(fig)
    return path


def tool_parser(doc: str, outputs: bool = False) -> argparse.ArgumentParser:
    """speedrun's parser (--preset and a flag per Config field) for a tool: the tool's docstring as
    its description (first paragraph) and epilog (its examples and the rest), then what each preset
    sets; speedrun's --out and --save only where the tool writes a result and weights as speedrun does."""
    description, _, rest = doc.strip().partition("\n\n")
    epilog = f"{rest.rstrip()}\n\npresets (each sets these fields; the flags override them):\n{speedrun.presets_text()}"
    return speedrun.build_parser(description, outputs=outputs, epilog=epilog)


def tool_defaults(parser: argparse.ArgumentParser, **defaults) -> None:
    """The tool's own defaults for the trainer's flags (e.g. runs=5 for a study), in force and shown
    by --help (where speedrun's help would show the Config's)."""
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.help:
            action.help = re.sub(r"\(default: [^)]*\)$", f"(default: {defaults[action.dest]})", action.help)


def hide_flags(parser: argparse.ArgumentParser, *dests: str) -> None:
    """Leave inherited flags that the tool refuses out of its --help (the refusal says why)."""
    for action in parser._actions:
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def markdown_table(columns, rows) -> list[str]:
    """The lines of a Markdown table: the header of `columns`, then one line per row of cells."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(columns), "|" + "---|" * len(columns), *map(line, rows)]

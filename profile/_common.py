"""What the profile/ scripts share: the trainer's command line, data loading with clear errors,
a one-line description of the machine, and the optional bar chart (output paths and the "never
overwrite" check are speedrun's, matplotlib's import is speedrun_tools', shared with every tool).

This folder must never get an __init__.py: it would shadow the standard library's `profile`
module, which cProfile imports. The scripts run as `python profile/NAME.py` and import this
module by name, and speedrun and speedrun_tools through it: they come from the installed package
(`pip install -e .`, README), and without it this module stops the script with one line that says so.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(doc: str, add_flags, argv=None, outputs: bool = False):
    """speedrun's parser for the script of docstring `doc` plus its own flags (add_flags(parser));
    returns (parser, args, cfg, device). Bad input exits with status 2 and a one-line message.
    `outputs`: the script writes speedrun's result (--out) and weights (--save); a script that
    does not has neither flag, so argparse refuses them rather than the user's file being ignored."""
    parser = speedrun_tools.tool_parser(doc, outputs=outputs)
    add_flags(parser.add_argument_group("this script's own flags"))
    args = parser.parse_args(argv)
    try:
        cfg = speedrun.config_from_args(args)
        device = speedrun.pick_device(cfg.device)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    return parser, args, cfg, device


def load_data(parser, cfg, device, args):
    """speedrun.load_data, with a data problem turned into a clean exit."""
    try:
        return speedrun.load_data(cfg, device, quiet=args.quiet, url=args.data_url)
    except (speedrun.DataError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


def describe_machine(device: torch.device) -> str:
    return speedrun_tools.machine_line(speedrun.environment(device))


def write_text(path: Path, text: str) -> None:
    speedrun.write_atomic(path, lambda tmp: tmp.write_text(text))


def bar_chart(path: Path, labels, values, title: str, xlabel: str) -> str:
    """Horizontal bars, largest at the top, written atomically as a PNG. Returns the line to print:
    where the chart went, or how to get one when matplotlib (optional) is missing."""
    plt = speedrun_tools.pyplot()
    if plt is None:
        return speedrun_tools.no_chart(path.name)
    pairs = sorted(zip(values, labels))
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(pairs) + 1.5))
    bars = ax.barh([p[1] for p in pairs], [p[0] for p in pairs], color="tab:blue")
    total = sum(values) or 1.0
    for bar, (value, _) in zip(bars, pairs):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {100 * value / total:.1f}%", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(values, default=1.0) * 1.15 or 1.0)
    return f"chart written to {speedrun_tools.save_chart(fig, path)}"

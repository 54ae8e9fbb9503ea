#!/usr/bin/env python3
"""Optimizers compared on the same network, data, schedule and epoch budget.

    python ablations/optimizers.py --runs 3                              # every one at its starting LR
    python ablations/optimizers.py --lr-multipliers 0.25,0.5,1,2,4       # a tuning sweep around them
    python ablations/optimizers.py --optimizers nesterov,adam --lr-for adam=0.5

Learning rates are in speedrun's unit (`--lr`: per summed-loss sample; each step uses lr/batch_size).
The optimizers are speedrun's, its OPTIMIZERS table. Nesterov, SGD and Muon (the conv filters
at the recipe's muon_lr) start from the recipe's --lr; the adaptive optimizers from the step LRs in
ADAPTIVE_STEP_LR (common starting points, not tuned here) and with bias_lr_scale 1, since the
recipe's 64x LR on BN parameters is far too high for them. --lr-for gives an LR outright. With
several multipliers, the best per optimizer is chosen on the same seeds (an optimistic estimate);
the curves show each optimizer at its best LR.
"""
from __future__ import annotations

import sys

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    from ablations import study
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

OPTIMIZERS = tuple(speedrun.OPTIMIZERS)
ADAPTIVE_STEP_LR = dict(adam=2e-3, adamw=2e-3, rmsprop=2e-4, adagrad=1e-2, adadelta=1.0)


def parse_list(text: str, flag: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise study.StudyError(f"{flag} {text!r}: expected a comma-separated list of {kind.__name__}") from None
    if not values:
        raise study.StudyError(f"{flag} is empty")
    return values


def parse_given_lrs(text: str | None) -> dict[str, float]:
    """'adam=0.5,sgd=2' -> {'adam': 0.5, 'sgd': 2.0}."""
    given = {}
    for item in parse_list(text, "--lr-for") if text else []:
        name, eq, value = item.partition("=")
        if not eq or name.strip() not in OPTIMIZERS:
            raise study.StudyError(f"--lr-for {item!r}: expected OPTIMIZER=LR with OPTIMIZER one of {', '.join(OPTIMIZERS)}")
        try:
            given[name.strip()] = float(value)
        except ValueError:
            raise study.StudyError(f"--lr-for {item!r}: {value!r} is not a number") from None
    return given


def best_per_optimizer(summary: dict) -> list[dict]:
    """Per optimizer, the variant with the highest mean accuracy among its LRs."""
    best = {}
    for v in summary["variants"]:
        opt = v["tags"].get("optimizer")
        if v["runs"] and v["acc_mean"] is not None and (opt not in best or v["acc_mean"] > best[opt]["acc_mean"]):
            best[opt] = v
    return list(best.values())


def best_lr_table(summary: dict) -> list[str]:
    rows = [[v["tags"]["optimizer"], f"{v['tags']['lr']:g}", f"{v['tags']['step_lr']:.3g}", study.fmt_pct(v["acc_mean"]),
             "—" if not v["runs_reaching_target"] else f"{v['time_to_target_mean_s']:.2f}"]
            for v in best_per_optimizer(summary)]
    return ["", "Best learning rate per optimizer (chosen on the same seeds, so its accuracy is optimistic):", "",
            *speedrun_tools.markdown_table(["optimizer", "lr", "step lr", "acc % mean", "time-to-target s"], rows)]


# The curves show each optimizer at its best LR.
REPORT = study.Report(tables=best_lr_table, curves=best_per_optimizer)


def make_study(args, base: speedrun.Config) -> study.Study:
    names = parse_list(args.optimizers, "--optimizers")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise study.StudyError(f"--optimizers: unknown {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    multipliers = parse_list(args.lr_multipliers, "--lr-multipliers", float)
    if any(m <= 0 for m in multipliers):
        raise study.StudyError("--lr-multipliers must be positive")
    given = parse_given_lrs(args.lr_for)
    reference = "nesterov" if len(multipliers) == 1 else "nesterov x1"
    if "nesterov" not in names or 1.0 not in multipliers or "nesterov" in given:
        reference = None
    variants = []
    for opt in names:
        adaptive = opt in ADAPTIVE_STEP_LR
        start = given.get(opt, ADAPTIVE_STEP_LR[opt] * base.batch_size if adaptive else base.lr)
        for m in multipliers:
            lr = start * m
            name = opt if len(multipliers) == 1 else f"{opt} x{m:g}"
            source = "given" if opt in given else ("starting LR" if adaptive else "recipe LR")
            fields = dict(optimizer=opt, lr=lr, bias_lr_scale=1.0 if adaptive else base.bias_lr_scale)
            variants.append(study.make_variant(
                base, name, f"{opt}, lr {lr:.4g} ({m:g} x {source}), step lr {lr / base.batch_size:.3g}",
                reference=reference if name != reference else None,
                tags=dict(optimizer=opt, lr=lr, step_lr=lr / base.batch_size, multiplier=m), **fields))
    notes = [f"Δ columns: variant minus `{reference}` (the recipe)" if reference else "Δ columns: none (no Nesterov run at the recipe's LR)",
             "same network, data, one-cycle schedule, weight decay and epochs for every optimizer; "
             "adaptive optimizers use bias_lr_scale 1"]
    return study.Study("optimizers", "Optimizers on the same network and budget", variants, notes, report=REPORT)


def build_parser():
    p = study.build_parser(__doc__)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), metavar="A,B,...",
                   help=f"optimizers to compare (default: {','.join(OPTIMIZERS)})")
    p.add_argument("--lr-for", default=None, metavar="OPT=LR,...", help="learning rates given outright, in --lr units")
    p.add_argument("--lr-multipliers", default="1", metavar="M1,M2,...",
                   help="try each optimizer at these multiples of its LR; the best is reported (default: 1)")
    return p


def main(argv=None) -> int:
    return study.main(build_parser(), make_study, "optimizers", "ablations/optimizers.py", argv)


if __name__ == "__main__":
    sys.exit(main())

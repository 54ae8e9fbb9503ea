#!/usr/bin/env python3
"""What each trick buys, in accuracy and in time-to-94%, and how sure we are.

    python ablations/tricks.py --runs 5                      # full recipe, then each trick off alone
    python ablations/tricks.py --mode cumulative --runs 5    # tricks added one at a time, Page's order
    python ablations/tricks.py --variants full,no_ema,no_tta # a few variants only
    python ablations/tricks.py --study DIR                   # resume (or extend with more --runs)

Every speedrun.py flag sets the base recipe (e.g. --epochs, --width, --subset for a small CPU
study). Every variant runs with the same seeds; differences from the reference are per-seed
(paired) with a 95% t-interval.
"""
from __future__ import annotations

import sys

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    from ablations import study
    import speedrun
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

TIME_ONLY_NOTE = ("fp32 and no_channels_last change speed, not the maths (beyond rounding); on a CPU, fp32 is "
                  "what precision auto already picks, so that variant repeats the full recipe there")


def leave_one_out(base: speedrun.Config) -> tuple[list[study.Variant], list[str]]:
    """The full recipe, then each trick switched off alone. A switch that the base already has in
    the 'off' position is skipped (it would repeat the full recipe) and noted, so one list serves
    every preset: davidnet's tricks, airbench94's and the record's."""
    cutout = (("cutout", "cutout 8x8 switched ON (the recipe has it off)", dict(cutout=8)) if base.cutout == 0
              else ("no_cutout", "no cutout", dict(cutout=0)))
    switches = [
        ("no_whitening", "learned 3x3 conv instead of the frozen patch whitening", dict(whiten=False)),
        ("no_label_smoothing", "label smoothing 0", dict(label_smoothing=0.0)),
        ("relu", f"ReLU instead of {base.activation.upper()}", dict(activation="relu")),
        ("plain_bn", "plain BN instead of ghost BN", dict(ghost_bn_splits=1)),
        ("bn_scale_trained", "BN scale trained, not frozen at 1", dict(bn_scale_frozen=False)),
        ("constant_lr", "constant LR instead of one-cycle", dict(lr_schedule="constant")),
        ("linear_lr", "linear decay from the peak instead of one-cycle", dict(lr_schedule="linear")),
        (("no_late_lookahead", "no late lookahead", dict(ema=False)) if base.ema_mode == "late_lookahead" else
         ("no_ema", "no lookahead" if base.ema_mode == "lookahead" else "no EMA of the weights", dict(ema=False))),
        ("no_lr_floor", "the LR falls to 0, no floor", dict(lr_floor=0.0)),
        ("no_tta", "no test-time augmentation", dict(tta="none")),
        ("flip_tta", "2-view flip TTA instead of 6 views", dict(tta="flip")),
        ("tta_all_images", "TTA views for every test image, not only the least confident", dict(tta_unsure_frac=1.0)),
        ("no_flip", "no flip", dict(flip="none")),
        ("random_flip", "random flips instead of alternating", dict(flip="random")),
        ("no_whitening_bias", "no trained whitening bias", dict(whiten_bias_epochs=0.0)),
        ("no_whitening_negatives", "whitening filters without their negatives", dict(whiten_negatives=False)),
        ("default_init", "PyTorch's conv init instead of identity (dirac)", dict(dirac_init=False)),
        ("no_colour_jitter", "no brightness and contrast jitter", dict(brightness=0.0, contrast=0.0)),
        ("no_muon_renorm", "Muon without renormalising the filters", dict(muon_renorm="none")),
        ("no_crop", "no random crop", dict(crop_pad=0)),
        ("no_progressive", "every epoch at 32 px (same steps)", dict(resolution_schedule="")),
        cutout,
        ("fp32", "fp32 instead of mixed precision (time only)", dict(precision="fp32")),
        ("no_channels_last", "NCHW instead of channels_last (time only)", dict(channels_last=False)),
    ]
    if base.resolution_schedule:  # without a schedule every image stays at 32 px and the mode changes nothing
        switches.append(("crop_resolution", "a random window of each epoch's side instead of downsampling",
                         dict(resolution_mode="crop")))
    variants = [study.make_variant(base, "full", "the full recipe")]
    notes = []
    for name, change, fields in switches:
        if all(getattr(base, k) == v for k, v in fields.items()):
            notes.append(f"{name} skipped: the base recipe already has {', '.join(f'{k}={v}' for k, v in fields.items())}")
            continue
        variants.append(study.make_variant(base, name, change, reference="full", **fields))
    return variants, notes


def cumulative(base: speedrun.Config) -> tuple[list[study.Variant], list[str]]:
    """A baseline with Page's seven tricks off, then the tricks added back one at a time in the order
    of his "bag of tricks" post; each step is compared with the step before it."""
    steps = [("label_smoothing", "+ label smoothing", dict(label_smoothing=0.0)),
             ("celu", "+ CELU", dict(activation="relu")),
             ("ghost_bn", "+ ghost BN", dict(ghost_bn_splits=1)),
             ("frozen_bn_scale", "+ frozen BN scale", dict(bn_scale_frozen=False)),
             ("whitening", "+ patch whitening", dict(whiten=False)),
             ("ema", "+ EMA", dict(ema=False)),
             ("tta", "+ flip TTA", dict(tta="none"))]
    off = {k: v for _, _, fields in steps for k, v in fields.items()}
    variants = [study.make_variant(base, "baseline", "the recipe with the 7 tricks below off", **off)]
    notes = []
    for name, change, fields in steps:
        if all(getattr(base, k) == v for k, v in fields.items()):
            notes.append(f"+{name} skipped: the base recipe has it off too")
            continue
        for k in fields:
            off[k] = getattr(base, k)
        variants.append(study.make_variant(base, f"+{name}", change, reference=variants[-1].name, **off))
    return variants, notes


def make_study(args, base: speedrun.Config) -> study.Study:
    if args.mode == "leave-one-out":
        variants, notes = leave_one_out(base)
        title = "Tricks, leave-one-out: the full recipe, then each trick off alone"
        notes = ["Δ columns: variant minus `full`"] + notes
    else:
        variants, notes = cumulative(base)
        title = "Tricks, cumulative: added one at a time in Page's order"
        notes = ["Δ columns: each step minus the step before it",
                 "baseline: this base recipe with the seven tricks off; augmentation, one-cycle schedule, "
                 "batch size and epochs stay as in the base recipe"] + notes
    variants = study.pick_variants(variants, args.variants)
    if any(v.name in ("fp32", "no_channels_last") for v in variants):
        notes.append(TIME_ONLY_NOTE)
    return study.Study("tricks" if args.mode == "leave-one-out" else "cumulative", title, variants, notes)


def build_parser():
    p = study.build_parser(__doc__)
    p.add_argument("--mode", choices=("leave-one-out", "cumulative"), default="leave-one-out",
                   help="leave-one-out: each trick off alone; cumulative: tricks added in Page's order (default: leave-one-out)")
    p.add_argument("--variants", default=None, metavar="A,B,...",
                   help="run only these variants (default: all of the mode's; names are listed in an error for a wrong one)")
    return p


def folder_name(args) -> str:
    return "tricks" if args.mode == "leave-one-out" else "tricks-cumulative"


def main(argv=None) -> int:
    return study.main(build_parser(), make_study, folder_name, "ablations/tricks.py", argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Pictures of a run: its loss and accuracy per epoch, and the training images as the preset augments them.

    python bench/pictures.py runs/X.json                     # loss and accuracy per epoch of each run in a result
    python bench/pictures.py --augment --preset airbench94   # 10 training images (one per class) and their views
    python bench/pictures.py --augment --preset cpu --images 4 --epochs-shown 6 --seed 3
    python bench/pictures.py runs/a.json runs/b.json --augment --out pictures/

curves-<result>.png: per epoch, the training loss (left) and the training, plain test and EMA+TTA test
accuracy (right, 0-100%) of every run in a speedrun.py result JSON; a diverged run stops where its loss
left the finite numbers. augmentations-<preset>.png: each image as stored, then each augmentation step
of the recipe alone (crop/translate, flip, colour jitter, cutout; a step the recipe switches off is
named in the title), then every step together at each epoch, with the epoch's resolution where the
recipe has a resolution schedule. The draws are the trainer's own (speedrun.EpochAugmenter): those a
CPU run with --seed draws for these images, epoch by epoch; the caption under a view says what was drawn.
Needs matplotlib.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

# Each augmentation step alone: (column title, the Config fields that leave only that step on).
ALL_OFF = dict(crop_pad=0, flip="none", brightness=0.0, contrast=0.0, cutout=0)
STEPS = (("crop / translate", ("crop_pad",)), ("flip", ("flip",)), ("colour jitter", ("brightness", "contrast")),
         ("cutout", ("cutout",)))


# =============================================================================================
# Loss and accuracy per epoch
# =============================================================================================


def result_scale(result: dict) -> str:
    """The run's size for a title: preset, width, images, epochs, device, seeds."""
    cfg, runs = result.get("config") or {}, result.get("runs") or []
    train, test = (min(n, cut) if cut else n for n, cut in zip(speedrun.CIFAR10_SIZES, (cfg.get("subset"), cfg.get("test_subset"))))
    seeds = [r["seed"] for r in runs]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]})"
    width = "" if cfg.get("width", 1.0) == 1.0 else f", width {cfg['width']:g}"
    return (f"preset {result.get('preset') or '?'}{width}, {train:,} training / {test:,} test images, "
            f"{speedrun.plural(cfg.get('epochs', 0), 'epoch')}, {seed_text}; "
            f"{(result.get('environment') or {}).get('device_name', '?')}")


def draw_curves(path: Path, result: dict, name: str, plt) -> Path:
    """curves-<name>.png: loss and the three accuracies per epoch, one line per run and measure."""
    runs = result.get("runs") or []
    if not runs:
        raise ValueError(f"{name} holds no finished run ('runs' is empty): nothing to draw")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.8))
    measures = (("train_acc", "train (augmented batches)", "tab:green"), ("test_acc", "test, trained weights", "tab:blue"),
                ("tta_acc", "test, EMA + TTA (evaluated)", "tab:red"))
    alpha = 1.0 if len(runs) == 1 else max(0.25, 1.0 / len(runs) ** 0.5)
    for k, run in enumerate(runs):
        rows = run["epochs"]
        points = [(r["epoch"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        if points:
            ax_loss.plot(*zip(*points), marker="o", ms=3, color="tab:gray", alpha=alpha,
                         label="training loss" if k == 0 else None)
        for key, label, colour in measures:
            points = [(r["epoch"], 100 * r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax_acc.plot(*zip(*points), marker="o", ms=3, color=colour, alpha=alpha, label=label if k == 0 else None)
    target = (result.get("config") or {}).get("target_acc")
    if target:
        ax_acc.axhline(100 * target, color="gray", ls="--", lw=1, label=f"target {100 * target:g}%")
    ax_loss.set_ylim(bottom=0)
    ax_acc.set_ylim(0, 100)
    for ax, ylabel in ((ax_loss, "training loss (label-smoothed cross-entropy)"), (ax_acc, "accuracy, %")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(color="0.9")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    runs_text = f"{len(runs)} runs, one line each" if len(runs) > 1 else "one run"
    fig.suptitle(f"Loss and accuracy per epoch: {name} ({runs_text})\n{result_scale(result)}", fontsize=10)
    return speedrun_tools.save_chart(fig, path)


# =============================================================================================
# Training images and their augmented views
# =============================================================================================


def one_per_class(labels, count: int) -> list[int]:
    """Indices of the first image of each class in turn (then the next of each), `count` in all."""
    labels = [int(y) for y in labels]
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(len(speedrun.CLASSES))]
    picked, rank = [], 0
    while len(picked) < min(count, len(labels)):
        picked += [ids[rank] for ids in by_class if rank < len(ids)][:count - len(picked)]
        rank += 1
    return picked


def _pick(draw: speedrun.EpochDraw, chosen: torch.Tensor) -> speedrun.EpochDraw:
    """The draw of the chosen images only (a per-image tensor cut; the epoch's side kept)."""
    return speedrun.EpochDraw(*(t[chosen] if isinstance(t, torch.Tensor) else t for t in
                                (getattr(draw, f.name) for f in dataclasses.fields(draw))))


def caption(d: speedrun.EpochDraw, k: int, cfg: speedrun.Config) -> str:
    """What was drawn for image k: the crop's shift, the flip, the jitter, the cutout's corner."""
    parts = []
    if d.crop_dy is not None:
        parts.append(f"shift {int(d.crop_dy[k]) - cfg.crop_pad:+d},{int(d.crop_dx[k]) - cfg.crop_pad:+d}")
    if d.flips is not None:
        parts.append("flipped" if bool(d.flips[k]) else "not flipped")
    if d.shift is not None:
        parts.append(f"b{float(d.shift[k]):+.2f} c×{float(d.scale[k]):.2f}")
    if d.cut_y is not None:
        parts.append(f"cut at {int(d.cut_y[k])},{int(d.cut_x[k])}")
    return "\n".join(parts)


def augmented_views(cfg: speedrun.Config, images, n_train: int, chosen: list[int], seed: int, epochs_shown: int):
    """The columns of the picture: [(title, images (K, 3, H, W) normalised, captions per image)].
    `images` are the chosen training images (uint8 NHWC) out of n_train; the draws are those of a CPU
    run with `seed` (the trainer's generator: each epoch's draw for all n_train images, then its shuffle)."""
    device = torch.device("cpu")
    x = speedrun.to_device(images, device, torch.float32)
    pick = torch.tensor(chosen)
    columns = [("as stored", x, [""] * len(chosen))]
    for title, fields in STEPS:
        alone = dataclasses.replace(cfg, **{**ALL_OFF, **{f: getattr(cfg, f) for f in fields}})
        if all(getattr(alone, f) == ALL_OFF[f] for f in fields):
            continue  # the recipe has this step off
        d = _pick(speedrun.EpochAugmenter(alone, speedrun.seed_everything(seed, device)).draw(n_train, 0, device), pick)
        columns.append((f"{title} alone", speedrun.EpochAugmenter(alone, None).apply(x, d),
                        [caption(d, k, alone) for k in range(len(chosen))]))
    gen = speedrun.seed_everything(seed, device)
    augmenter = speedrun.EpochAugmenter(cfg, gen)
    for epoch in range(epochs_shown):
        d = augmenter.draw(n_train, epoch, device)
        torch.randperm(n_train, device=device, generator=gen)  # the epoch's shuffle: the next epoch draws after it
        d = _pick(d, pick)
        title = f"epoch {epoch + 1}" + (f": {d.side} px ({cfg.resolution_mode})" if cfg.resolution_schedule else "")
        columns.append((title, augmenter.apply(x, d), [caption(d, k, cfg) for k in range(len(chosen))]))
    return columns


def draw_augmentations(path: Path, cfg: speedrun.Config, preset: str, arrays, count: int, seed: int,
                       epochs_shown: int, plt) -> Path:
    train_x, train_y = arrays[:2]
    chosen = one_per_class(train_y, count)
    columns = augmented_views(cfg, train_x[chosen], len(train_x), chosen, seed, epochs_shown)
    mean = torch.tensor(speedrun.MEAN).view(3, 1, 1)
    std = torch.tensor(speedrun.STD).view(3, 1, 1)
    fig, axes = plt.subplots(len(chosen), len(columns), figsize=(1.35 * len(columns) + 0.6, 1.55 * len(chosen) + 1.2),
                             squeeze=False)
    for j, (title, views, captions) in enumerate(columns):
        for i in range(len(chosen)):
            ax = axes[i][j]
            ax.imshow((views[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[i], fontsize=5.5, labelpad=2)
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(speedrun.CLASSES[int(train_y[chosen[i]])], fontsize=7)
    off = [title for title, fields in STEPS if all(getattr(cfg, f) == ALL_OFF[f] for f in fields)]
    width = "" if cfg.width == 1.0 else f", width {cfg.width:g}"
    fig.suptitle(f"Training images and their augmented views, preset {preset}{width} ({cfg.flip} flips; "
                 f"{'off in this recipe: ' + ', '.join(off) if off else 'every step on'})\n"
                 f"the draws of a CPU run with seed {seed} over {len(train_x):,} training images, "
                 f"{epochs_shown} of its {cfg.epochs:g} epochs", fontsize=9)
    return speedrun_tools.save_chart(fig, path)


# =============================================================================================
# Command line
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = speedrun_tools.tool_parser(__doc__)
    p.usage = "%(prog)s [RESULT.json ...] [--augment [--preset NAME] [FLAG ...]] [--out DIR]  (--help lists every flag)"
    speedrun_tools.hide_flags(p, "runs", "workers")  # nothing is trained here
    g = p.add_argument_group("pictures")
    g.add_argument("results", type=Path, nargs="*", metavar="RESULT.json", help="speedrun.py result files to draw")
    g.add_argument("--augment", action="store_true", help="draw the training images and their augmented views")
    g.add_argument("--images", type=int, default=10, help="images in the augmentation picture, one per class in turn "
                                                          "(default: 10)")
    g.add_argument("--epochs-shown", type=int, default=4, help="epochs of full augmentation drawn, from the first; "
                                                               "at most the recipe's (default: 4)")
    g.add_argument("--out", type=Path, default=None,
                   help="folder for the PNG files (default: a new runs/pictures-<time>/); never overwritten")
    return p


def read_result(path: Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
        result["runs"][0]["epochs"][0]["epoch"]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give a result JSON that speedrun.py wrote (--out)") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{path} is not a speedrun.py result with a finished run (runs -> epochs)") from None
    return result


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = speedrun_tools.log_lines(args.quiet)
    try:
        if not args.results and not args.augment:
            raise ValueError("nothing to draw: give result JSON files, --augment, or both")
        if args.images < 1 or args.epochs_shown < 1:
            raise ValueError(f"--images and --epochs-shown must be at least 1, got {args.images} and {args.epochs_shown}")
        results = {path: read_result(path) for path in args.results}
        cfg = speedrun.config_from_args(args)
        plt = speedrun_tools.pyplot()
        if plt is None:
            raise ValueError("matplotlib is not installed: pip install matplotlib (the pictures need it)")
        out = speedrun.reserve(args.out or Path("runs") / f"pictures-{speedrun.timestamp()}", "--out", folder=True,
                               numbered=args.out is None)
        arrays = None
        if args.augment:
            arrays = speedrun.subsets(speedrun.load_cifar10(cfg.data_dir or None, url=args.data_url, quiet=args.quiet), cfg)
    except (ValueError, speedrun.DataError) as e:
        speedrun.release_outputs()
        parser.exit(2, f"error: {e}\n")
    for path, result in results.items():
        log(f"written: {draw_curves(out / f'curves-{path.stem}.png', result, path.name, plt)}")
    if arrays is not None:
        epochs = min(args.epochs_shown, math.ceil(cfg.epochs))
        path = draw_augmentations(out / f"augmentations-{args.preset}.png", cfg, args.preset, arrays, args.images,
                                  cfg.seed, epochs, plt)
        log(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Evaluate saved weights (`speedrun.py --save PATH`) on the CIFAR-10 test set: the plain
accuracy, the accuracy with the recipe's test-time augmentation, and the gain between them.

    python bench/evaluate.py runs/w.pt                          # on this machine's device, its default precision
    python bench/evaluate.py a.pt b.pt --device cpu --precision fp32 --out eval.json
    python bench/evaluate.py e1.pt --tta-unsure-frac 0.25     # TTA only for the least sure quarter (hiverge's)

Its use is to evaluate the same weights on two machines (weights trained on a GPU, evaluated there
and on a CPU): a difference in the TTA gain between devices is then a difference in evaluation,
not in training. The evaluation is speedrun's own (speedrun.predict, the saved config's TTA).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)


def evaluate(path: Path, arrays, device: torch.device, precision: str, test_subset: int = 0,
             tta_unsure_frac: float | None = None) -> dict:
    """Plain and TTA accuracy of the weights at `path` on the test arrays (the first test_subset
    images, 0 = all), on `device` in `precision`; the TTA views for the saved config's fraction of
    the least sure images, or for `tta_unsure_frac` of them."""
    model, cfg = speedrun.load_checkpoint(path, device)
    saved = dataclasses.asdict(cfg)  # the run's own config: what bench/ledger.py matches the run by
    unsure = cfg.tta_unsure_frac if tta_unsure_frac is None else tta_unsure_frac
    cfg = dataclasses.replace(cfg, precision=precision, test_subset=test_subset, tta_unsure_frac=unsure)
    dtype = speedrun.compute_dtype(cfg, device)
    _, _, test_x, test_y = speedrun.subsets(arrays, cfg)
    test_x, test_y = speedrun.to_device(test_x, device, dtype), torch.from_numpy(test_y).to(device)
    accuracy = {name: speedrun.accuracy(speedrun.predict(model, test_x, cfg, device, dtype, tta=tta), test_y)
                for name, tta in (("plain", "none"), ("tta", cfg.tta))}
    return dict(weights=str(path), device=str(device), precision=str(dtype).replace("torch.", ""), tta=cfg.tta,
                tta_unsure_frac=cfg.tta_unsure_frac, test_images=len(test_y), plain_acc=accuracy["plain"],
                tta_acc=accuracy["tta"], tta_gain=accuracy["tta"] - accuracy["plain"], config=saved)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="+", type=Path, help="files written by speedrun.py --save")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU) | cuda | cpu | mps")
    p.add_argument("--precision", default="auto", choices=tuple(speedrun.PRECISIONS),
                   help="autocast and data dtype; auto: fp16 on CUDA, else fp32 (default: auto)")
    p.add_argument("--data-dir", default=None, help="folder holding CIFAR-10 (default: $CIFAR10_HOME, else ~/.cache/cifar10)")
    p.add_argument("--test-subset", type=int, default=0, metavar="M",
                   help="evaluate on the first M test images only (default 0: all 10,000)")
    p.add_argument("--tta-unsure-frac", type=float, default=None, metavar="F",
                   help="give the TTA views only to this fraction of the test images, the least sure ones "
                        "(default: the saved config's)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here (never overwritten)")
    args = p.parse_args(argv)
    try:
        if args.tta_unsure_frac is not None and not 0 <= args.tta_unsure_frac <= 1:
            raise ValueError(f"--tta-unsure-frac {args.tta_unsure_frac:g}: give a fraction from 0 to 1")
        if args.test_subset < 0:
            raise ValueError(f"--test-subset {args.test_subset}: give a number of test images, or 0 for all")
        missing = [str(w) for w in args.weights if not w.is_file()]
        if missing:
            raise ValueError(f"no such weights file: {', '.join(missing)}; write one with speedrun.py --save PATH")
        if args.out:
            speedrun.reserve(args.out, "--out")
        device = speedrun.pick_device(args.device)
        arrays = speedrun.load_cifar10(args.data_dir, quiet=True)
        results = [evaluate(w, arrays, device, args.precision, args.test_subset, args.tta_unsure_frac)
                   for w in args.weights]
    except (ValueError, speedrun.DataError) as e:
        speedrun.release_outputs()
        p.exit(2, f"error: {e}\n")
    rows = [[Path(r["weights"]).name, r["device"], r["precision"], r["tta"], f"{r['tta_unsure_frac']:g}",
             f"{100 * r['plain_acc']:.2f}",
             f"{100 * r['tta_acc']:.2f}", f"{100 * r['tta_gain']:+.2f}"] for r in results]
    print("\n".join(speedrun_tools.markdown_table(["weights", "device", "precision", "TTA", "TTA for", "plain %", "TTA %",
                                             "gain, points"],
                                            rows)))
    if args.out:
        speedrun.save_json(dict(environment=speedrun.environment(device), results=results), args.out)
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark our whole-epoch vectorized augmentation against a conventional per-sample pipeline.

    python profile/data_pipeline.py --device cpu --subset 10000
    python profile/data_pipeline.py --loader-workers 0 2 4 8 --timed-epochs 3

Both produce one epoch of shuffled, augmented, normalised training batches on the device, with
the config's crop padding, flips and cutout:
- vectorized: the trainer's own epoch (TrainingSetup.epoch_batches): the whole training set,
  already on the device, augmented in one shuffled copy in the training memory layout, from
  which batches are views;
- per-sample: a torch.utils.data.Dataset that converts, normalises, pads, crops and flips one
  image at a time, a DataLoader with worker processes (shuffled, default settings, so workers
  start anew each epoch, as in most CIFAR tutorials), and each batch copied to the device
  (from pinned memory on CUDA).
Each pipeline is timed over --timed-epochs epochs after one untimed warm-up epoch (which, for the
DataLoader, still leaves the worker start-up inside every timed epoch).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import _common
from _common import speedrun, speedrun_tools

FULL_EPOCH = speedrun.CIFAR10_SIZES[0]


def add_flags(group) -> None:
    group.add_argument("--loader-workers", type=int, metavar="N", nargs="+", default=None,
                       help="DataLoader worker counts to try (default: 0 and min(4, CPU cores))")
    group.add_argument("--timed-epochs", type=int, metavar="N", default=2, help="timed epochs per pipeline (default: 2)")
    group.add_argument("--json", type=Path, metavar="PATH", default=None, help="also write the results to this JSON file")


class PerSampleCIFAR(Dataset):
    """The conventional pipeline's dataset: uint8 HWC images, augmented one at a time in __getitem__."""

    def __init__(self, images, labels, crop_pad: int, flip: bool, cutout: int):
        self.images, self.labels = images, labels
        self.crop_pad, self.flip, self.cutout = crop_pad, flip, cutout
        self.mean = torch.tensor(speedrun.MEAN).view(3, 1, 1)
        self.std = torch.tensor(speedrun.STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255)
        x = (x - self.mean) / self.std
        if self.crop_pad:
            p = self.crop_pad
            x = F.pad(x[None], (p, p, p, p), mode="reflect")[0]
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, dy:dy + 32, dx:dx + 32]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(2)
        if self.cutout:
            cy, cx = torch.randint(0, 32 - self.cutout + 1, (2,)).tolist()
            x = x.clone()
            x[:, cy:cy + self.cutout, cx:cx + self.cutout] = 0
        return x, int(self.labels[i])


def loader_epoch(loader, device, dtype) -> int:
    seen = 0
    for xb, yb in loader:
        xb = xb.to(device, dtype, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        seen += xb.shape[0]
    return seen


def time_epochs(run_epoch, device, repeats: int) -> tuple[float, int]:
    """Mean seconds per epoch over `repeats` epochs after one warm-up epoch, and images per epoch."""
    run_epoch(0)
    speedrun.synchronize(device)
    t0 = time.perf_counter()
    for epoch in range(1, repeats + 1):
        images = run_epoch(epoch)
    speedrun.synchronize(device)
    return (time.perf_counter() - t0) / repeats, images


def main(argv=None) -> int:
    parser, args, cfg, device = _common.parse_args(__doc__, add_flags, argv)
    workers = args.loader_workers if args.loader_workers is not None else [0, min(4, os.cpu_count() or 1)]
    workers = sorted(set(workers))
    if min(workers) < 0 or args.timed_epochs < 1:
        parser.exit(2, "error: --loader-workers must be 0 or more and --timed-epochs at least 1\n")
    try:
        if args.json is not None:
            speedrun.reserve(args.json, "--json")
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    data = _common.load_data(parser, cfg, device, args)
    n = data.train_x.shape[0]
    try:
        setup = speedrun.TrainingSetup(cfg, data, device, cfg.seed)  # the trainer's augmenter and epoch
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    images, labels = speedrun.load_cifar10(cfg.data_dir or None, url=args.data_url, quiet=True)[:2]
    images, labels = images[:n], labels[:n]
    dtype = speedrun.compute_dtype(cfg, device)

    results = []
    sec, seen = time_epochs(lambda e: setup.epoch_batches(data, e)[1].shape[0], device, args.timed_epochs)
    results.append(dict(pipeline=f"vectorized whole-epoch ({device})", workers=None, s_per_epoch=sec, images=seen))

    # per sample, an alternating flip costs what a random one does: one coin per image (the first epoch's)
    dataset = PerSampleCIFAR(images, labels, cfg.crop_pad, cfg.flip != "none", cfg.cutout)
    for w in workers:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=w, drop_last=True,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
        sec, seen = time_epochs(lambda e: loader_epoch(loader, device, dtype), device, args.timed_epochs)
        results.append(dict(pipeline=f"per-sample Dataset + DataLoader, {w} worker{'s' if w != 1 else ''}",
                            workers=w, s_per_epoch=sec, images=seen))
    for r in results:
        r["images_per_s"] = r["images"] / r["s_per_epoch"]
        r["s_per_50k_epoch"] = FULL_EPOCH / r["images_per_s"]

    lines = [_common.describe_machine(device), f"command: {speedrun_tools.command_line(__file__, argv)}",
             f"one epoch = {n} training images in batches of {cfg.batch_size} (crop_pad {cfg.crop_pad}, flip {cfg.flip}, "
             f"cutout {cfg.cutout}); mean of {args.timed_epochs} timed epoch(s) after a warm-up epoch", "",
             f"{'pipeline':<48} {'images/s':>11} {'s/epoch':>9} {'s per 50k':>10}"]
    for r in results:
        lines.append(f"{r['pipeline']:<48} {r['images_per_s']:11,.0f} {r['s_per_epoch']:9.3f} {r['s_per_50k_epoch']:10.3f}")
    best = max(results[1:], key=lambda r: r["images_per_s"])
    lines.append(f"vectorized is {results[0]['images_per_s'] / best['images_per_s']:.1f}x the images/s of the best "
                 f"per-sample pipeline ({best['workers']} workers)")
    print("\n".join(lines))
    if args.json is not None:
        record = dict(machine=_common.describe_machine(device), command=speedrun_tools.command_line(__file__, argv), results=results)
        speedrun.save_json(record, args.json)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

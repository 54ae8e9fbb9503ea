"""Every preset's numerics, pinned: a tiny seeded CPU run of each (and one in the NCHW layout) must
give the per-epoch losses and accuracies and the final weights recorded in fingerprints.json.

The runs are 5 steps long and use one torch thread, so that they are bit-identical on one kind of
CPU whatever its core count, and nearly so on another (a different order of floating-point sums is
amplified by every training step: after 5 steps, measured here between 1 and 2 threads, the losses
moved by at most 5e-5 and the global weight norm by 6e-6, relative; a 1% change of the learning
rate moves them by at least 1e-3 and 2e-5). A change of method (a formula, a default, an order of
operations) moves a fingerprint; a change that does so on purpose says so in its commit and
rewrites the file:
    SPEEDRUN_UPDATE_FINGERPRINTS=1 python -m pytest tests/test_fingerprints.py
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import correlated_images, preset_config, speedrun

FILE = Path(__file__).with_name("fingerprints.json")
LOSS_RTOL, NORM_RTOL, TENSOR_RTOL = 2e-4, 1e-5, 5e-2  # losses, the global weight norm, each tensor's
N_TRAIN = 64  # 2 batches of 32 an epoch: 2.5 epochs are 5 steps
# (name in the file, preset, fields replaced besides the shrinking); the NCHW case runs Part I's
# reshape of the ghost-BN groups, every other case the channels_last statistics. E1's schedules are
# shrunk with its epochs, so that its resolutions, LR floor and late lookahead all act.
SHRUNK = {"fulcrum_e1": dict(resolution_schedule="24,28,32", lr_schedule_epochs=1.5, ema_start_epochs=1.5, ema_every=1)}
CASES = [(name, name, SHRUNK.get(name, {})) for name in speedrun.PRESETS] + [
    ("davidnet-nchw", "davidnet", {"channels_last": False})]


def learnable_data(n: int, seed: int):
    """Smooth random images plus one fixed template per class: a task a tiny network learns in a few steps."""
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    return correlated_images(n, seed=seed) * 0.5 + correlated_images(10, seed=99)[labels], labels


def fingerprint(preset: str, **fields) -> dict:
    cfg = preset_config(preset, epochs=2.5, eval_batch_size=50, subset=0, test_subset=0, **fields)
    data = speedrun.DeviceData(*learnable_data(N_TRAIN, 1), *learnable_data(100, 2), 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = speedrun.train(cfg, data, log=speedrun.silent, seed=3)
    finally:
        torch.set_num_threads(threads)
    rows = [[e[k] for k in ("train_loss", "train_acc", "test_acc", "tta_acc")] for e in run["epochs"]]
    weights = {k: [v.double().sum().item(), v.double().norm().item()]
               for k, v in run["model"].state_dict().items() if v.is_floating_point()}
    return dict(epochs=rows, weights=weights)


def global_norm(weights: dict) -> float:
    return math.sqrt(sum(norm ** 2 for _, norm in weights.values()))


@pytest.fixture(scope="module")
def pinned():
    return json.loads(FILE.read_text()) if FILE.exists() else {}


@pytest.mark.parametrize("name,preset,fields", CASES, ids=[c[0] for c in CASES])
def test_preset_numerics_match_their_fingerprint(name, preset, fields, pinned):
    got = fingerprint(preset, **fields)
    if os.environ.get("SPEEDRUN_UPDATE_FINGERPRINTS"):
        pinned[name] = got
        FILE.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        return
    assert name in pinned, f"no fingerprint for {name}: record it (see this file's docstring)"
    want = pinned[name]
    assert len(got["epochs"]) == len(want["epochs"])
    for g, w in zip(got["epochs"], want["epochs"]):
        assert g[:2] == pytest.approx(w[:2], rel=LOSS_RTOL)  # training loss and accuracy
        assert g[2:] == pytest.approx(w[2:], abs=1.5 / 100)  # test accuracies: at most one of 100 images flips
    assert sorted(got["weights"]) == sorted(want["weights"])
    assert global_norm(got["weights"]) == pytest.approx(global_norm(want["weights"]), rel=NORM_RTOL)
    for k, (total, norm) in want["weights"].items():  # each tensor, loosely: its place and scale
        assert got["weights"][k][1] == pytest.approx(norm, rel=TENSOR_RTOL, abs=1e-6), k


def test_a_changed_method_moves_the_fingerprint(pinned):
    # the tolerances are tight enough to see a change of one hyperparameter by 1%
    moved = fingerprint("airbench94", lr=1.5 * 1.01)
    want = pinned["airbench94"]
    assert abs(global_norm(moved["weights"]) / global_norm(want["weights"]) - 1) > 2 * NORM_RTOL
    assert any(abs(g[0] / w[0] - 1) > 2 * LOSS_RTOL for g, w in zip(moved["epochs"], want["epochs"]))

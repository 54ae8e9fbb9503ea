"""Every preset's numerics, pinned: a tiny seeded CPU run of each (and one in the NCHW layout) must
give the per-epoch losses and accuracies and the final weights recorded in fingerprints.json.

A change of method (a formula, an order of operations that changes results beyond rounding, a
default) moves a fingerprint; float noise between CPUs does not (relative tolerance 1e-4). A
change that moves one on purpose says so in its commit and rewrites the file:
    SPEEDRUN_UPDATE_FINGERPRINTS=1 python -m pytest tests/test_fingerprints.py
"""
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import correlated_images, preset_config, speedrun

FILE = Path(__file__).with_name("fingerprints.json")
RTOL = 1e-4
# (name in the file, preset, fields replaced besides the shrinking); the NCHW case runs Part I's
# reshape of the ghost-BN groups, every other case the channels_last statistics. E1's schedules are
# shrunk with its epochs, so that its resolutions, LR floor and late lookahead all act.
SHRUNK = {"fulcrum_e1": dict(resolution_schedule="24,28,32", lr_schedule_epochs=2.25, ema_start_epochs=2)}
CASES = [(name, name, SHRUNK.get(name, {})) for name in speedrun.PRESETS] + [
    ("davidnet-nchw", "davidnet", {"channels_last": False})]


def learnable_data(n: int, seed: int):
    """Smooth random images plus one fixed template per class: a task a tiny network learns in a few steps."""
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    return correlated_images(n, seed=seed) * 0.5 + correlated_images(10, seed=99)[labels], labels


def fingerprint(preset: str, **fields) -> dict:
    cfg = preset_config(preset, epochs=2.5, eval_batch_size=50, subset=0, test_subset=0, **fields)
    data = speedrun.DeviceData(*learnable_data(256, 1), *learnable_data(100, 2), 0.0)
    run = speedrun.train(cfg, data, log=speedrun.silent, seed=3)
    rows = [[e[k] for k in ("train_loss", "train_acc", "test_acc", "tta_acc")] for e in run["epochs"]]
    weights = {k: [v.double().sum().item(), v.double().norm().item()]
               for k, v in run["model"].state_dict().items() if v.is_floating_point()}
    return dict(epochs=rows, weights=weights)


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
        assert g[:2] == pytest.approx(w[:2], rel=RTOL)  # training loss and accuracy
        assert g[2:] == pytest.approx(w[2:], abs=1.5 / 100)  # test accuracies: at most one of 100 images flips
    assert sorted(got["weights"]) == sorted(want["weights"])
    for k, (total, norm) in want["weights"].items():
        assert got["weights"][k][1] == pytest.approx(norm, rel=RTOL, abs=1e-9), k
        assert got["weights"][k][0] == pytest.approx(total, abs=RTOL * max(norm, 1e-9) * 10), k


def test_a_changed_method_moves_the_fingerprint(pinned):
    # the tolerance is tight enough to see a change of one hyperparameter by 1%
    moved = fingerprint("airbench94", lr=1.5 * 1.01)
    want = pinned["airbench94"]
    assert any(abs(moved["weights"][k][1] - n) > RTOL * abs(n) * 2 for k, (_, n) in want["weights"].items())

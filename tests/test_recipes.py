"""Each preset is its published recipe, step for step.

For every preset the reference's published numbers are written out here, with where they come
from, and the whole per-step schedule is derived from them independently of speedrun.py: each
parameter group's LR, weight decay and momentum, which parameters train, and when the moving
average blends and with what decay. The trainer's real optimizer, model and loop
(speedrun.train_epoch over TrainingSetup.steps_per_epoch) are then driven through a full-length
run with a stand-in step function that trains nothing and records what each step would use."""
import math

import numpy as np
import pytest
import torch

import speedrun


def drive_full_run(preset: str, n_train: int = 50000):
    """Per-step records of the real optimizer state over a full run of `preset` on `n_train`
    images: (steps, blends), steps[k] = (groups' (lr, weight_decay, momentum, nesterov, names),
    names of the parameters that take a gradient), blends = [(step, decay)]."""
    cfg = speedrun.make_config(preset, device="cpu")
    # n_train images that are one zero image seen n_train times: the setup reads only their count
    full = speedrun.DeviceData(torch.zeros(1, 3, 32, 32).expand(n_train, 3, 32, 32), torch.zeros(n_train, dtype=torch.long),
                               torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), 0.0)
    setup = speedrun.TrainingSetup(cfg, full, torch.device("cpu"), seed=0)
    names = {id(p): n for n, p in setup.model.named_parameters()}
    steps, blends = [], []

    def stand_in(xb, yb):
        groups = [(g["lr"], g["weight_decay"], g.get("momentum", setup.opt.defaults.get("momentum")),
                   g.get("nesterov", setup.opt.defaults.get("nesterov")),
                   frozenset(names[id(p)] for p in g["params"])) for g in setup.opt.param_groups]
        training = frozenset(n for n, p in setup.model.named_parameters() if p.requires_grad)
        steps.append((groups, training))
        return torch.zeros(()), torch.zeros(len(yb), 10)
    setup.step_fn = stand_in

    ema = setup.make_ema()
    if ema is not None:
        real_update = ema.update

        def recording_update(step):
            real_update(step)
            blends.append((step, ema.decay_at(step)))
        ema.update = recording_update
    step = 0
    for n_steps in setup.steps_per_epoch:
        b = setup.local_batch
        x = torch.zeros(1).expand(n_steps * b)  # the stand-in never looks at the images
        y = torch.zeros(n_steps * b, dtype=torch.long)
        _, _, step = speedrun.train_epoch(setup, ema, x, y, step)
    return cfg, setup, steps, blends


def group_of(groups, name):
    (found,) = [g for g in groups if name in g[4]]
    return found


def test_davidnet_is_pages_final_recipe_at_every_step():
    # Page, "How to train your ResNet" part 8; davidcpage/cifar10-fast new_dawn.py and
    # bag_of_tricks.ipynb: batch 512 with the last partial batch dropped (97 a epoch), 10 epochs;
    # Nesterov momentum 0.9; LR PiecewiseLinear([0, 2, 8], [0, 1.0, 0.1]) in epochs, flat after
    # 8, divided by the batch size, read after counting the step (step k takes k / 97 epochs);
    # BN biases at 64x the LR with weight decay 5e-4 x 512 / 64, the rest 5e-4 x 512; BN scales
    # frozen; whitening frozen; EMA of momentum 0.99 every 5 batches (rho = 0.99**5) after batches
    # 0, 5, ..., 95 of each epoch (the counter restarts every epoch), from the initial weights.
    batch, n_batches, epochs = 512, 50000 // 512, 10
    total = n_batches * epochs
    cfg, setup, steps, blends = drive_full_run("davidnet")
    assert len(steps) == total == 970
    for k, (groups, training) in enumerate(steps, start=1):
        lr = float(np.interp(k / n_batches, [0, 2, 8, 10], [0, 1.0, 0.1, 0.1])) / batch
        weights = group_of(groups, "head.weight")
        bn = group_of(groups, "layer1.0.2.bias")
        assert weights[0] == pytest.approx(lr, rel=1e-12, abs=1e-15) and bn[0] == pytest.approx(64 * lr, rel=1e-12, abs=1e-15)
        assert weights[1] == pytest.approx(5e-4 * batch) and bn[1] == pytest.approx(5e-4 * batch / 64)
        assert all(g[2] == 0.9 and g[3] is True for g in groups)
        assert len(groups) == 2 and all("weight" not in n for n in bn[4]), "BN scales are frozen, not in a group"
        assert "whiten.weight" not in training
    expected = [(e * n_batches + i + 1, 0.99 ** 5) for e in range(epochs) for i in range(0, n_batches, 5)]
    assert len(expected) == 200
    assert [s for s, _ in blends] == [s for s, _ in expected]
    assert all(d == pytest.approx(0.99 ** 5, rel=1e-12) for _, d in blends)


def test_airbench94_is_keller_jordans_recipe_at_every_step():
    # KellerJordan/cifar10-airbench, legacy/airbench94.py (94.01% over 1,000 runs, 3.83 s on an
    # A100): batch 1024, 9.9 epochs, drop_last (48 batches), total ceil(48 x 9.9) = 476 steps;
    # kilostep_scale = 1024 x (1 + 1 / (1 - 0.85)); lr = 11.5 / kilostep_scale; wd = 0.0153 x 1024 /
    # kilostep_scale; BN biases ("norm" parameters) at lr x 64 with weight_decay wd / (lr x 64),
    # every other trainable parameter, the whitening bias included, at lr with weight_decay wd / lr;
    # SGD momentum 0.85, Nesterov. LambdaLR get_lr(step) with the 0-based step: warm-up
    # int(476 x 0.23) = 109 steps from 0.2 to 1.0, then linear to 0.07 at 476. The whitening bias
    # takes a gradient while epoch < 3. Lookahead every 5 steps with decay 0.95**5 x (step/476)**3,
    # then copied into the model; at step 476 the model takes the lookahead state.
    momentum, batch = 0.85, 1024
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = 11.5 / kilostep, 0.0153 * batch / kilostep
    total, warmup = math.ceil(48 * 9.9), int(math.ceil(48 * 9.9) * 0.23)
    assert (total, warmup) == (476, 109)

    def get_lr(step):
        if step < warmup:
            return 0.2 * (1 - step / warmup) + step / warmup
        frac = (step - warmup) / (total - warmup)
        return (1 - frac) + 0.07 * frac

    cfg, setup, steps, blends = drive_full_run("airbench94")
    assert len(steps) == total
    for step, (groups, training) in enumerate(steps):
        other = group_of(groups, "head.weight")
        norm = group_of(groups, "layer1.0.2.bias")
        assert other is group_of(groups, "whiten.bias")
        assert other[0] == pytest.approx(lr * get_lr(step), rel=1e-12)
        assert norm[0] == pytest.approx(64 * lr * get_lr(step), rel=1e-12)
        assert other[1] == pytest.approx(wd / lr, rel=1e-12) and norm[1] == pytest.approx(wd / (64 * lr), rel=1e-12)
        assert all(g[2] == momentum and g[3] is True for g in groups)
        assert ("whiten.bias" in training) == (step // 48 < 3)
        assert "whiten.weight" not in training and not any(n.endswith("2.weight") for n in training), "BN scales frozen"
    assert blends == [(s, pytest.approx(0.95 ** 5 * (s / total) ** 3, rel=1e-12)) for s in range(5, total + 1, 5)]
    assert setup.steps_per_epoch == [48] * 9 + [44]


def assert_hiverges_groups(groups, training, step, factor, muon_lr, filters, bias_steps, wd):
    """hiverge's parameter groups at one step, its LRs times `factor`: the head at 0.5415 and the BN
    biases at 0.0573 (Nesterov SGD, momentum 0.825, weight_decay wd / its LR), Muon's filters at
    muon_lr (momentum 0.655), the whitening bias at 0.0573 x (1 - step/bias_steps) while it trains."""
    head, norm = group_of(groups, "head.weight"), group_of(groups, "layer1.0.2.bias")
    assert head[0] == pytest.approx(0.5415 * factor, rel=1e-12) and head[1] == pytest.approx(wd / 0.5415, rel=1e-12)
    assert norm[0] == pytest.approx(0.0573 * factor, rel=1e-12) and norm[1] == pytest.approx(wd / 0.0573, rel=1e-12)
    assert head[2] == norm[2] == 0.825
    muon = group_of(groups, next(iter(filters)))
    assert muon[4] == filters and muon[0] == pytest.approx(muon_lr * factor, rel=1e-12) and muon[2] == 0.655
    if step < bias_steps:
        bias = group_of(groups, "whiten.bias")
        assert bias[0] == pytest.approx(0.0573 * (1 - step / bias_steps), rel=1e-12)
        assert bias[1] == pytest.approx(wd / 0.0573, rel=1e-12)
    assert ("whiten.bias" in training) == (step < bias_steps)


def test_record_is_airbench94_muon_with_hiverges_changes_at_every_step():
    # hiverge's cifar10_speedrun.py of October 2025 (fork ljbuturovic/cifar10-speedrun at 06c6072:
    # 94.02% over 2,000 runs, 1.98 s on an A100), on top of KellerJordan/cifar10-airbench
    # airbench94_muon.py: batch 1536, drop_last (32 batches), total_train_steps = ceil(7.65 x 32)
    # = 245; wd = 1.0418e-6 x 1536. Nesterov SGD, momentum 0.825: the head at 0.5415 and the BN
    # biases at 0.0573, each with weight_decay wd / its LR, times 1 - step/245 (0-based step, no
    # warm-up); the whitening bias at 0.0573 x (1 - step/7) for its ceil(0.2 x 32) = 7 steps, then
    # no gradient. Muon for the 3x3 filters: lr 0.205 x (1 - step/245), Nesterov momentum 0.655,
    # decoupled decay lr x wd, renormalised when step - last >= 2 + int(15 x step/245) (1-based
    # step); Newton-Schulz in fp16 (on a GPU). No EMA.
    batch, total, bias_steps = 1536, math.ceil(7.65 * 32), math.ceil(0.2 * 32)
    wd = 1.0418e-6 * batch
    assert (total, bias_steps) == (245, 7)
    cfg, setup, steps, blends = drive_full_run("record")
    assert isinstance(setup.opt, speedrun.Muon) and blends == [] and setup.make_ema() is None
    assert len(steps) == total
    filters = {n for n, p in setup.model.named_parameters() if p.ndim == 4 and n != "whiten.weight"}
    assert len(filters) == 6
    for step, (groups, training) in enumerate(steps):
        assert_hiverges_groups(groups, training, step, 1 - step / total, 0.205, filters, bias_steps, wd)
    muon_group = next(g for g in setup.opt.param_groups if g["orthogonalize"])
    assert muon_group["decoupled_wd"] == pytest.approx(wd) and setup.opt.coeffs == (3.4576, -4.7391, 2.0843)
    assert muon_group["ns_steps"] == 3 and setup.opt.ns_dtype == torch.float16


def test_record_renormalises_its_filters_on_hiverges_growing_schedule():
    # the 37 steps of hiverge's rule over 245 steps, written out from the rule by hand
    published = [2, 4, 6, 8, 10, 12, 14, 16, 19, 22, 25, 28, 31, 35, 39, 43, 47, 52, 57, 62, 68, 74, 80, 87, 94, 102,
                 110, 119, 128, 138, 149, 160, 172, 185, 199, 214, 230]
    cfg = speedrun.make_config("record")
    opt = speedrun.build_optimizer(speedrun.build_model(cfg), cfg, total_steps=245, bias_steps=7)
    renormed = []
    for step in range(1, 246):
        opt.step()  # no gradients: only the step count and the renormalisation bookkeeping move
        if opt.last_renorm == step:
            renormed.append(step)
    assert renormed == published


def test_fulcrum_e1_is_its_recipe_at_every_step():
    # fulcrumresearch/cifar-10-speedrun at ddec65f, runners/recipes/e1.py (94.046% over 200 runs,
    # 1.828 s on an A100) on top of hiverge's October recipe: batch 1536, 32 batches an epoch,
    # total ceil(8.875 x 32) = 284 steps; the LR factor max(1 - s/272, 0.05) with s the 0-based
    # step and 272 = ceil(8.5 x 32), for the head (0.5415), the BN biases (0.0573) and Muon's
    # filters (0.2255, momentum 0.655); the whitening bias at 0.0573 x (1 - s/7) for ceil(0.2 x 32)
    # = 7 steps. Lookahead: at step 264 = 272 - 8 the average is a copy of the weights; after
    # steps 268, 272, ..., 284 it is blended with decay 0.7 and copied back. Sides by epoch: 24,
    # 24, 24, 28, 28, 28, 32, 32, 32 (the last epoch, 28 batches, at 32).
    batch, total, decay_steps, bias_steps = 1536, math.ceil(8.875 * 32), math.ceil(8.5 * 32), math.ceil(0.2 * 32)
    wd = 1.0418e-6 * batch
    assert (total, decay_steps, bias_steps) == (284, 272, 7)
    cfg, setup, steps, blends = drive_full_run("fulcrum_e1")
    assert len(steps) == total and setup.steps_per_epoch == [32] * 8 + [28]
    filters = {n for n, p in setup.model.named_parameters() if p.ndim == 4 and n != "whiten.weight"}
    for step, (groups, training) in enumerate(steps):
        assert_hiverges_groups(groups, training, step, max(1 - step / decay_steps, 0.05), 0.2255, filters, bias_steps, wd)
    assert sum(max(1 - s / decay_steps, 0.05) == 0.05 for s in range(total)) == 25  # the floor holds from step 259
    assert blends == [(264, 0.0)] + [(s, pytest.approx(0.7, rel=1e-12)) for s in range(268, 285, 4)]
    sides = [setup.augment.draw(8, epoch, "cpu").side for epoch in range(9)]
    assert sides == [24, 24, 24, 28, 28, 28, 32, 32, 32]
    assert cfg.whiten_samples == 5000 and cfg.tta == "flip_translate" and cfg.tta_unsure_frac == 1.0


def test_fulcrum_e1_renormalises_its_filters_on_the_rule_spanning_272_steps():
    # E1 keeps hiverge's rule, 2 + int(15 x step/272), counted over its 272 decay steps; it goes on
    # growing past 272 (written out from the rule by hand: the last renormalisation is at step 281)
    published = [2, 4, 6, 8, 10, 12, 14, 16, 18, 21, 24, 27, 30, 33, 36, 40, 44, 48, 52, 57, 62, 67, 72, 78, 84, 90, 97,
                 104, 112, 120, 129, 138, 148, 158, 169, 180, 192, 205, 219, 233, 248, 264, 281]
    cfg, setup, steps, blends = drive_full_run("fulcrum_e1")
    opt = setup.opt
    renormed = []
    for step in range(1, 285):
        opt.step()
        if opt.last_renorm == step:
            renormed.append(step)
    assert renormed == published

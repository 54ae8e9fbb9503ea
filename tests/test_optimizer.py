"""Optimizer, schedule, loss and EMA: parameter groups, Muon and its Newton-Schulz step, the LR
schedules, the step count, label smoothing, the moving average and lookahead."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import preset_config, random_device_data, tiny_config
import speedrun


def test_frozen_bn_scales_leave_bn_biases_training_at_their_own_lr_and_decay():
    cfg = tiny_config(bn_scale_frozen=True, bias_lr_scale=64.0)
    model = speedrun.build_model(cfg)
    opt = speedrun.build_optimizer(model, cfg, total_steps=100, bias_steps=0)
    bns = [m for m in model.modules() if isinstance(m, speedrun.GhostBatchNorm)]
    assert bns and all(not m.weight.requires_grad for m in bns)
    weights, bn_group = opt.param_groups
    assert {id(p) for p in bn_group["params"]} == {id(m.bias) for m in bns}
    speedrun.set_lr(opt, cfg, step=19, total=100)  # the peak: step 20 of 100
    assert weights["lr"] == pytest.approx(cfg.lr / cfg.batch_size)
    assert bn_group["lr"] == pytest.approx(64 * cfg.lr / cfg.batch_size)
    assert weights["weight_decay"] == pytest.approx(5e-4 * cfg.batch_size)
    assert bn_group["weight_decay"] == pytest.approx(5e-4 * cfg.batch_size / 64)
    assert not any(p is model.whiten.weight for g in opt.param_groups for p in g["params"])
    unfrozen = speedrun.build_model(tiny_config(bn_scale_frozen=False))
    assert all(m.weight.requires_grad for m in unfrozen.modules() if isinstance(m, speedrun.GhostBatchNorm))


def test_whitening_bias_trains_with_the_weights_then_stops_taking_a_gradient():
    cfg = preset_config("airbench94", whiten_bias_epochs=1.0, lr_schedule="constant")
    data = random_device_data(n_train=64, n_test=8)  # 2 batches of 32 per epoch: the bias trains for 2 steps
    setup = speedrun.TrainingSetup(cfg, data, torch.device("cpu"), seed=0)
    bias = setup.model.whiten.bias
    assert bias is not None and bias.requires_grad and torch.equal(bias, torch.zeros(24))
    group = next(g for g in setup.opt.param_groups if any(p is bias for p in g["params"]))
    assert group is setup.opt.param_groups[0], "the weights' group: base LR and base decay, as in airbench"
    seen = []

    def recording_step(x, y):
        seen.append(bias.requires_grad)
        return real_step(x, y)
    real_step, setup.step_fn = setup.step_fn, recording_step
    x, y = setup.epoch_batches(data, 0)
    speedrun.train_epoch(setup, None, x, y, step=0)
    after_first_epoch = bias.detach().clone()
    assert not torch.equal(after_first_epoch, torch.zeros(24)), "trained in its first epoch"
    speedrun.train_epoch(setup, None, x, y, step=2)
    assert seen == [True, True, False, False]
    assert torch.equal(bias, after_first_epoch) and bias.grad is None, "no gradient, no update, no decay"


def test_newton_schulz_precision_changes_nothing_off_cuda():
    g = torch.randn(2, 16, 72, generator=torch.Generator().manual_seed(0))
    coeffs = speedrun.NS_COEFFICIENTS["hiverge"]
    assert torch.equal(speedrun.orthogonalize(g, 3, coeffs, torch.float16), speedrun.orthogonalize(g, 3, coeffs, torch.bfloat16))


def test_orthogonalize_approaches_the_polar_factor():
    g = torch.randn(64, 144, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    for m, polar in ((g, u @ vh), (g.T, (u @ vh).T)):  # wide and tall
        o = speedrun.orthogonalize(m, 5)
        s = torch.linalg.svdvals(o)
        assert 0.5 < s.min() and s.max() < 1.3, "every singular value pushed near 1"
        cosine = (o * polar).sum() / (o.norm() * polar.norm())
        assert cosine > 0.95, "the same singular vectors as the input"
    torch.testing.assert_close(speedrun.orthogonalize(g, 0), g / g.norm(), rtol=1e-4, atol=1e-7)  # zero steps: normalise


def test_batched_orthogonalization_equals_one_matrix_at_a_time():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(8, 27, generator=g), torch.randn(16, 72, generator=g), torch.randn(30, 12, generator=g)]
    coeffs = speedrun.NS_COEFFICIENTS["hiverge"]
    for batched, m in zip(speedrun.orthogonalize_all(mats, 3, coeffs), mats):
        assert batched.shape == m.shape
        torch.testing.assert_close(batched, speedrun.orthogonalize(m, 3, coeffs), rtol=1e-5, atol=1e-6)
    keller = speedrun.orthogonalize(mats[0], 3)
    assert not torch.allclose(keller, speedrun.orthogonalize(mats[0], 3, coeffs)), "the coefficients matter"


def test_muon_steps_filters_along_orthogonal_directions_and_the_rest_by_sgd():
    cfg = preset_config("airbench94", optimizer="muon", lr_schedule="constant", muon_lr=0.1, whiten_bias_epochs=0.0)
    model = speedrun.build_model(cfg)
    opt = speedrun.build_optimizer(model, cfg, total_steps=100, bias_steps=0)
    assert isinstance(opt, speedrun.Muon)
    muon = next(g for g in opt.param_groups if g.get("orthogonalize"))
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.whiten]
    assert {id(p) for p in muon["params"]} == {id(p) for p in convs}
    assert muon["momentum"] == cfg.muon_momentum and muon["weight_decay"] == 0.0
    speedrun.set_lr(opt, cfg, step=0, total=10)
    assert muon["lr"] == pytest.approx(0.1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    before = [p.detach().clone() for p in convs] + [model.head.weight.detach().clone()]
    speedrun.smoothed_cross_entropy(model(x), y, 0.2).backward()
    head_grad = model.head.weight.grad.clone()
    opt.step()
    for p, b in zip(convs, before):
        step = ((b - p) / 0.1).reshape(p.shape[0], -1)
        expected_norm = max(1.0, step.shape[0] / step.shape[1]) ** 0.5
        s = torch.linalg.svdvals(step / expected_norm)
        assert 0.5 < s.max() < 1.3, "a filter bank moves by an orthogonalised step"
    head_group = next(g for g in opt.param_groups if any(p is model.head.weight for p in g["params"]))
    wd, lr = head_group["weight_decay"], head_group["lr"]
    d = head_grad + wd * before[-1]
    torch.testing.assert_close(model.head.weight, before[-1] - lr * (d + cfg.momentum * d), rtol=1e-5, atol=1e-7)


def test_muon_renormalises_then_decays_its_filters():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    groups = [dict(params=[conv.weight], lr=0.5, orthogonalize=True, decoupled_wd=0.1, momentum=0.6)]
    opt = speedrun.Muon(groups, momentum=0.9, ns_steps=3, renorm=speedrun.MUON_RENORMS["every_step"], total_steps=10)
    conv.weight.grad = torch.zeros_like(conv.weight)  # no gradient: the step only renormalises and decays
    opt.step()
    assert conv.weight.norm().item() == pytest.approx(6 ** 0.5 * (1 - 0.5 * 0.1), rel=1e-5)
    plain = speedrun.Muon([dict(params=[nn.Parameter(conv.weight.detach() * 3)], lr=0.5, orthogonalize=True)],
                          momentum=0.9, ns_steps=3, total_steps=10)
    p = plain.param_groups[0]["params"][0]
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    plain.step()
    assert torch.equal(p, before), "renorm none and no decay: a zero gradient moves nothing"


def test_one_cycle_schedule_is_piecewise_linear_in_steps():
    cfg = speedrun.make_config()  # 10 epochs of 10 steps: 0 -> 1 at step 20 -> 0.1 at step 80 -> flat
    f = lambda k: speedrun.lr_factor(cfg, k - 1, 100)  # noqa: E731  (the LR of step k, read after counting it)
    assert f(0) == 0 and f(10) == pytest.approx(0.5) and f(20) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.55) and f(80) == pytest.approx(0.1) and f(95) == pytest.approx(0.1)
    ys = [f(k) for k in range(1, 101)]
    assert max(ys) == pytest.approx(1.0) and ys.index(max(ys)) == 19
    assert all(a <= b for a, b in zip(ys[:19], ys[1:20])) and all(a >= b for a, b in zip(ys[19:], ys[20:]))
    linear = speedrun.make_config(lr_schedule="linear")
    assert [speedrun.lr_factor(linear, k, 10) for k in (0, 4, 9)] == [0.9, 0.5, 0.0]
    at_start = speedrun.make_config(lr_schedule="linear", lr_schedule_at_start=True)
    assert [speedrun.lr_factor(at_start, k, 10) for k in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert speedrun.lr_factor(speedrun.make_config(lr_schedule="constant"), 7, 10) == 1.0


def test_one_cycle_can_start_above_zero():
    cfg = speedrun.make_config("airbench94")  # 476 steps, peak at int(0.23 x 476) = 109, read before each step
    f = [speedrun.lr_factor(cfg, k, 476) for k in (0, 109, 476)]
    assert f == pytest.approx([0.2, 1.0, 0.07])
    assert speedrun.lr_factor(cfg, 54, 476) == pytest.approx(0.2 + 0.8 * 54 / 109)


def test_fractional_epochs_round_the_step_count_up():
    assert speedrun.epochs_to_steps(9.9, 48) == 476
    assert speedrun.epochs_to_steps(9.8, 195) == 1911  # 9.8 x 195 = 1911.0000000000002 in floats
    assert speedrun.epochs_to_steps(0.5, 3) == 2
    with pytest.raises(ValueError, match="epochs must be positive"):
        speedrun.make_config(epochs=0)


def test_label_smoothed_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    logits, target, s = torch.randn(7, 10, generator=g), torch.randint(0, 10, (7,), generator=g), 0.2
    logp = logits.log_softmax(1)
    expected = ((1 - s) * -logp[torch.arange(7), target] + s * -logp.mean(1)).sum()
    torch.testing.assert_close(speedrun.smoothed_cross_entropy(logits, target, s), expected)
    torch.testing.assert_close(speedrun.smoothed_cross_entropy(logits, target, 0.0), F.cross_entropy(logits, target, reduction="sum"))


def test_ema_starts_from_the_initial_weights_and_blends_on_each_epochs_every_kth_batch():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = speedrun.EMA(model, speedrun.make_config(ema_momentum=0.9, ema_every=2), total_steps=40)
    start = copy.deepcopy(ema.model.state_dict())
    decay = 0.9 ** 2
    due = [ema.due(step, batch) for step, batch in zip(range(1, 8), [0, 1, 2, 0, 1, 2, 3])]
    assert due == [True, False, True, True, False, True, False], "after batches 0, 2, ... of every epoch"
    for k in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model[1].running_mean.add_(1.0)
        before = copy.deepcopy(ema.model.state_dict())
        ema.update(k)
        for n, v in model.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(ema.model.state_dict()[n], decay * before[n] + (1 - decay) * v)
            else:
                assert torch.equal(ema.model.state_dict()[n], v)
    assert not torch.equal(start["0.weight"], ema.model.state_dict()["0.weight"])
    assert not any(p.requires_grad for p in ema.model.parameters()) and ema.eval_model is ema.model


def test_ema_warmup_blends_the_first_updates_as_plain_means():
    model = nn.Linear(3, 2)
    ema = speedrun.EMA(model, speedrun.make_config(ema_momentum=0.9, ema_every=2, ema_warmup=True), total_steps=40)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(1)
    torch.testing.assert_close(ema.model.weight, start + 0.5, msg="the first blend is the mean of two")
    decays = [ema.decay_at(1)]
    for k in range(2, 30):
        ema.update(k)
        decays.append(ema.decay_at(k))
    assert decays[:3] == [0.5, pytest.approx(2 / 3), 0.75] and decays[-1] == pytest.approx(0.81)


def test_lookahead_pulls_the_weights_back_and_ends_at_the_average():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = speedrun.Lookahead(model, speedrun.make_config(ema_momentum=0.9, ema_every=2), total_steps=8)
    assert ema.eval_model is model
    for step in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        before_ema = copy.deepcopy(ema.model.state_dict())
        live = copy.deepcopy(model.state_dict())
        assert ema.due(step, batch=0) == (step % 2 == 0), "every k-th step of the run, whatever the epoch"
        if not ema.due(step, 0):
            continue
        ema.update(step)
        d = 0.9 ** 2 * (step / 8) ** 3
        for k, v in ema.model.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, d * before_ema[k] + (1 - d) * live[k])
                assert torch.equal(model.state_dict()[k], v), "the model is pulled back to the EMA"
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.finish()
    assert torch.equal(model[0].weight, ema.model[0].weight)


def test_late_lookahead_starts_as_a_copy_then_blends_at_a_constant_decay_every_k_steps():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    cfg = speedrun.make_config(ema=True, ema_mode="late_lookahead", ema_momentum=0.5, ema_every=2, ema_start_epochs=1)
    ema = speedrun.LateLookahead(model, cfg, total_steps=12, start=5)
    assert ema.eval_model is model
    for step in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        before_ema, live = copy.deepcopy(ema.model.state_dict()), copy.deepcopy(model.state_dict())
        assert ema.due(step, batch=0) == (step in (5, 7, 9, 11))
        if not ema.due(step, 0):
            continue
        ema.update(step)
        d = 0.0 if step == 5 else 0.5 ** 2
        for k, v in ema.model.state_dict().items():
            if v.is_floating_point():  # parameters and BN statistics alike
                torch.testing.assert_close(v, d * before_ema[k] + (1 - d) * live[k])
                assert torch.equal(model.state_dict()[k], v), "the weights are set to the average"


def test_late_lookahead_leaves_a_run_that_ends_before_its_start_alone():
    model = nn.Linear(3, 2)
    cfg = speedrun.make_config(ema=True, ema_mode="late_lookahead", ema_start_epochs=1)
    ema = speedrun.LateLookahead(model, cfg, total_steps=4, start=10)
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = model.weight.clone()
    ema.finish()
    assert torch.equal(model.weight, trained)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_the_lr_floor_holds_the_factor_above_it_over_the_schedules_span(floor):
    cfg = speedrun.make_config("record", lr_floor=floor)
    model = speedrun.build_model(cfg)
    opt = speedrun.build_optimizer(model, cfg, total_steps=20, bias_steps=0)
    head = next(g for g in opt.param_groups if any(p is model.head.weight for p in g["params"]))
    for step in range(30):  # past the schedule's 20 steps the factor holds its last value
        speedrun.set_lr(opt, cfg, step, 20)
        assert head["lr"] == pytest.approx(head["peak_lr"] * max(floor, 1 - step / 20, 0.0), rel=1e-12)

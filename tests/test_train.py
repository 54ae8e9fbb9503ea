"""Loss, schedule, EMA, TTA, the timer's rule, reproducibility, and one real-data run."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import random_device_data, tiny_config
import speedrun


def test_label_smoothed_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    logits, target, s = torch.randn(7, 10, generator=g), torch.randint(0, 10, (7,), generator=g), 0.2
    logp = logits.log_softmax(1)
    expected = ((1 - s) * -logp[torch.arange(7), target] + s * -logp.mean(1)).sum()
    torch.testing.assert_close(speedrun.smoothed_cross_entropy(logits, target, s), expected)
    torch.testing.assert_close(speedrun.smoothed_cross_entropy(logits, target, 0.0), F.cross_entropy(logits, target, reduction="sum"))


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
    at_start = speedrun.make_config(lr_schedule="linear", lr_schedule_at="start")
    assert [speedrun.lr_factor(at_start, k, 10) for k in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert speedrun.lr_factor(speedrun.make_config(lr_schedule="constant"), 7, 10) == 1.0


def test_fractional_epochs_round_the_step_count_up():
    assert speedrun.total_steps(speedrun.make_config(epochs=9.9), 48) == 476
    assert speedrun.total_steps(speedrun.make_config(epochs=10.0), 97) == 970  # no float noise past 970
    assert speedrun.total_steps(speedrun.make_config(epochs=0.5), 3) == 2
    with pytest.raises(ValueError, match="epochs must be positive"):
        speedrun.make_config(epochs=0)


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


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_tta_averages_the_logits_of_the_views():
    cfg, net = tiny_config(), Linear()
    x = torch.randn(5, 3, 32, 32)
    cpu, f32 = torch.device("cpu"), torch.float32
    torch.testing.assert_close(speedrun.predict(net, x, cfg, cpu, f32, tta="none"), net(x))
    torch.testing.assert_close(speedrun.predict(net, x, cfg, cpu, f32, tta="flip"), (net(x) + net(x.flip(3))) / 2)
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = p[..., :32, :32], p[..., 2:, 2:]
    six = (0.25 * (net(x) + net(x.flip(3))) + 0.125 * (net(up_left) + net(up_left.flip(3)) + net(down_right) + net(down_right.flip(3))))
    torch.testing.assert_close(speedrun.predict(net, x, cfg, cpu, f32, tta="flip_translate"), six)
    # Views are independent of how the test set is cut into evaluation batches.
    small = tiny_config(eval_batch_size=2)
    torch.testing.assert_close(speedrun.predict(net, x, small, cpu, f32), speedrun.predict(net, x, cfg, cpu, f32))


def test_classification_metrics():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    m = speedrun.classification_metrics(pred, target, classes=3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert list(m["per_class_acc"].values()) == [0.5, 1.0, 0.5]
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    p, r = [0.5, 2 / 3, 1.0], [0.5, 1.0, 0.5]
    assert m["macro_f1"] == pytest.approx(sum(2 * a * b / (a + b) for a, b in zip(p, r)) / 3)


def quiet(*args, **kwargs):
    pass


def test_same_seed_same_run_on_cpu_and_other_seed_differs():
    data = random_device_data()
    cfg = tiny_config(cutout=4, flip="alternating")
    a = speedrun.train(cfg, data, log=quiet, seed=3)
    b = speedrun.train(cfg, data, log=quiet, seed=3)
    c = speedrun.train(cfg, data, log=quiet, seed=4)
    key = lambda r: [(e["train_loss"], e["train_acc"], e["test_acc"], e["tta_acc"]) for e in r["epochs"]]  # noqa: E731
    assert key(a) == key(b)
    assert all(torch.equal(v, b["model"].state_dict()[n]) for n, v in a["model"].state_dict().items())
    assert key(a) != key(c)


def test_time_to_target_follows_the_timing_rule():
    data = random_device_data()
    reached = speedrun.train(tiny_config(target_acc=1e-6, epochs=3), data, log=quiet)
    first = reached["epochs"][0]
    assert reached["epochs_to_target"] == 1
    # whitening + training of epoch 1 (cumulative train_s) + that epoch's one evaluation
    assert reached["time_to_target_s"] == pytest.approx(first["train_s"] + first["eval_s"])
    assert first["train_s"] >= reached["whitening_s"] > 0
    last = reached["epochs"][-1]  # the whole budget: whitening + every epoch + the last evaluation
    assert reached["full_budget_s"] == pytest.approx(last["train_s"] + last["eval_s"])
    never = speedrun.train(tiny_config(target_acc=1.0), data, log=quiet)
    assert never["time_to_target_s"] is None and never["epochs_to_target"] is None


def test_too_small_training_set_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        speedrun.train(tiny_config(batch_size=256, ghost_bn_splits=16), random_device_data(100), log=quiet)


def test_real_data_narrow_network_beats_chance_clearly(real_data_dir):
    """A half-width network on 4,000 real images for two epochs: far above the 10% of chance.
    EMA is off: it averages over about 100 steps and this run has 124."""
    cfg = tiny_config(data_dir=str(real_data_dir), subset=4000, test_subset=1000, width=0.5, epochs=2,
                      batch_size=64, ghost_bn_splits=8, lr=0.5, ema=False, whiten_samples=2000, eval_batch_size=500)
    rows = []
    result = speedrun.run_many(cfg, log=rows.append)
    acc = result["summary"]["acc_mean"]
    assert acc >= 0.45, f"accuracy {acc:.3f} after two epochs on real data"
    assert result["data_load_s"] > 0 and any("EMA+TTA acc" in r for r in rows)
    assert math.isclose(sum(sum(r) for r in result["runs"][0]["confusion_matrix"]), 1000)

"""The switches behind --preset airbench94: 2x2 whitening with negatives and a briefly trained
bias, the airbench network, identity init, a one-cycle start above zero, lookahead; and Muon and
TTA for unsure images, which the record preset uses."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import correlated_images, random_device_data, tiny_config
import speedrun


def airbench_config(**overrides):
    """The airbench94 preset, shrunk to train in seconds on a CPU."""
    small = dict(width=0.125, epochs=2, batch_size=32, whiten_samples=64, eval_batch_size=64, device="cpu", precision="fp32")
    return speedrun.make_config("airbench94", **{**small, **overrides})


def test_two_by_two_whitening_with_negatives():
    cfg = airbench_config(whiten_eps=1e-6, whiten_samples=300)
    x = correlated_images()
    model = speedrun.build_model(cfg)
    speedrun.init_whitening(model, x, cfg)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    torch.testing.assert_close(w[12:], -w[:12])
    out = F.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    torch.testing.assert_close(out.T @ out / out.shape[0], torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)


def test_whitening_bias_trains_with_the_weights_then_stops_taking_a_gradient():
    cfg = airbench_config(whiten_bias_epochs=1.0, lr_schedule="constant")
    data = random_device_data(n_train=64, n_test=8)  # 2 batches of 32 per epoch: the bias trains for 2 steps
    setup = speedrun.prepare_training(cfg, data, torch.device("cpu"), seed=0)
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
    speedrun.train_epoch(setup, cfg, None, x, y, step=0)
    after_first_epoch = bias.detach().clone()
    assert not torch.equal(after_first_epoch, torch.zeros(24)), "trained in its first epoch"
    speedrun.train_epoch(setup, cfg, None, x, y, step=2)
    assert seen == [True, True, False, False]
    assert torch.equal(bias, after_first_epoch) and bias.grad is None, "no gradient, no update, no decay"


def test_airbench_network_shape():
    model = speedrun.build_model(speedrun.make_config("airbench94"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [
        (3, 24, (2, 2)), (24, 64, (3, 3)), (64, 64, (3, 3)), (64, 256, (3, 3)), (256, 256, (3, 3)),
        (256, 256, (3, 3)), (256, 256, (3, 3))]
    assert not any(isinstance(m, speedrun.Residual) for m in model.modules())
    assert isinstance(model.prep, nn.GELU) and model.head.in_features == 256
    bns = [m for m in model.modules() if isinstance(m, speedrun.GhostBatchNorm)]
    assert all(m.splits == 1 and m.eps == 1e-12 and m.momentum == 0.4 and not m.weight.requires_grad for m in bns)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dirac_init_passes_the_first_channels_through():
    cfg = airbench_config(conv_init="dirac")
    model = speedrun.build_model(cfg)
    conv = model.layer2[1][0]  # 64 -> 64 at width 1/8: 32 -> 32 channels
    x = torch.randn(2, conv.in_channels, 8, 8)
    torch.testing.assert_close(conv(x)[:, :conv.in_channels], x)
    widening = model.layer1[0][0]  # 24 -> 8: the first 8 filters pass input channels 0..7 through
    z = torch.randn(2, widening.in_channels, 8, 8)
    torch.testing.assert_close(widening(z), z[:, :widening.out_channels])
    default = speedrun.build_model(airbench_config(conv_init="default")).layer2[1][0]
    assert not torch.allclose(default(x)[:, :conv.in_channels], x)


def test_one_cycle_can_start_above_zero():
    cfg = speedrun.make_config("airbench94")  # 476 steps, peak at int(0.23 x 476) = 109, read before each step
    f = [speedrun.lr_factor(cfg, k, 476) for k in (0, 109, 476)]
    assert f == pytest.approx([0.2, 1.0, 0.07])
    assert speedrun.lr_factor(cfg, 54, 476) == pytest.approx(0.2 + 0.8 * 54 / 109)


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


def test_airbench94_preset_trains_end_to_end_and_reproducibly():
    data = random_device_data(n_train=128, n_test=64)
    a = speedrun.train(airbench_config(), data, log=lambda *x: None, seed=2)
    b = speedrun.train(airbench_config(), data, log=lambda *x: None, seed=2)
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    assert a["model"].whiten.weight.shape == (24, 3, 2, 2)
    # lookahead: the evaluated model is the trained one, which ends at the EMA's values
    assert isinstance(a["model"], speedrun.AirbenchNet) and a["model"].training is False


def test_new_switches_are_checked():
    with pytest.raises(ValueError, match="arch='vgg' is not one of"):
        speedrun.make_config(arch="vgg")
    with pytest.raises(ValueError, match="whiten_kernel=4 is not one of"):
        speedrun.make_config(whiten_kernel=4)
    with pytest.raises(ValueError, match="ema_mode='polyak' is not one of"):
        speedrun.make_config(ema_mode="polyak")
    assert tiny_config().arch == "resnet9"


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


def test_muon_steps_filters_along_orthogonal_directions_and_the_rest_by_sgd():
    cfg = airbench_config(optimizer="muon", lr_schedule="constant", muon_lr=0.1, whiten_bias_epochs=0.0)
    model = speedrun.build_model(cfg)
    opt = speedrun.build_optimizer(model, cfg)
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


def test_tta_only_for_the_least_confident_images():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x = torch.randn(40, 3, 32, 32)
    cpu, f32 = torch.device("cpu"), torch.float32
    plain = speedrun.predict(net, x, tiny_config(tta="flip"), cpu, f32, tta="none")
    full = speedrun.predict(net, x, tiny_config(tta="flip"), cpu, f32)
    half = speedrun.predict(net, x, tiny_config(tta="flip", tta_unsure_frac=0.25), cpu, f32)
    unsure = plain.softmax(1).amax(1).argsort()[:10]
    sure = plain.softmax(1).amax(1).argsort()[10:]
    torch.testing.assert_close(half[unsure], full[unsure])
    torch.testing.assert_close(half[sure], plain[sure])
    torch.testing.assert_close(speedrun.predict(net, x, tiny_config(tta="flip", tta_unsure_frac=0.0), cpu, f32), plain)
    with pytest.raises(ValueError, match="tta_unsure_frac is a fraction"):
        speedrun.make_config(tta_unsure_frac=1.5)


def test_each_arch_builds_its_own_network_and_weights_rebuild_it(tmp_path):
    for arch, kind in speedrun.NETWORKS.items():
        cfg = speedrun.make_config("airbench94" if arch == "airbench" else "davidnet", width=0.125)
        model = speedrun.build_model(cfg)
        assert type(model) is kind
        path = tmp_path / f"{arch}.pt"
        speedrun.save_weights(model, cfg, path)
        again = speedrun.load_weights(path)
        assert type(again) is kind
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())

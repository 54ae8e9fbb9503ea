"""The network's parts: whitening, ghost batch norm, frozen scales, widths."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import correlated_images, tiny_config
import speedrun


def patch_covariance(x, k=3):
    p = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * k * k)
    return p.T.double() @ p.double() / p.shape[0]


def test_whitening_makes_patch_covariance_near_identity():
    x = correlated_images()
    before = patch_covariance(x)
    assert (before - torch.eye(27, dtype=torch.float64)).abs().max() > 0.1, "input patches are correlated"
    w = speedrun.whitening_filters(x, 3, eps=1e-6)
    out = F.conv2d(x, w).permute(0, 2, 3, 1).reshape(-1, 27).double()
    cov = out.T @ out / out.shape[0]
    torch.testing.assert_close(cov, torch.eye(27, dtype=torch.float64), atol=2e-3, rtol=0)


def test_whitening_eps_shrinks_small_directions_only():
    x = correlated_images()
    w = speedrun.whitening_filters(x, 3, eps=1e-2)
    out = F.conv2d(x, w).permute(0, 2, 3, 1).reshape(-1, 27).double()
    var = (out.T @ out / out.shape[0]).diag()
    evals = torch.linalg.eigvalsh(patch_covariance(x)).flip(0)
    torch.testing.assert_close(var, evals / (evals + 1e-2), atol=2e-3, rtol=1e-3)
    assert (var[1:] <= var[:-1] + 1e-6).all() and var[-1] < 0.5 * var[0], "largest eigenvalue first, small ones shrunk"


def test_ghost_bn_equals_bn_on_each_split():
    splits, n, c = 4, 32, 6
    bn = speedrun.GhostBatchNorm(c, splits)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = torch.randn(n, c, 5, 5) * 3 + 1
    y = bn.train()(x)
    for s in range(splits):
        part = x[s::splits]
        ref = F.batch_norm(part, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        torch.testing.assert_close(y[s::splits], ref)
        mean = part.mean((0, 2, 3))
        torch.testing.assert_close(bn.running_mean.view(splits, c)[s], 0.1 * mean)


def test_ghost_bn_evaluates_with_the_mean_of_the_split_statistics():
    bn = speedrun.GhostBatchNorm(3, 2)
    bn.running_mean.copy_(torch.tensor([1., 2, 3, 3, 4, 5]))
    bn.running_var.copy_(torch.tensor([1., 1, 1, 3, 3, 3]))
    x = torch.randn(5, 3, 4, 4)
    ref = (x - torch.tensor([2., 3, 4]).view(1, 3, 1, 1)) / torch.sqrt(torch.tensor(2.) + bn.eps)
    torch.testing.assert_close(bn.eval()(x), ref)


def test_one_split_is_plain_batch_norm():
    ghost, plain = speedrun.GhostBatchNorm(8, 1), nn.BatchNorm2d(8)
    x = torch.randn(16, 8, 4, 4)
    torch.testing.assert_close(ghost.train()(x), plain.train()(x))
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    torch.testing.assert_close(ghost.eval()(x), plain.eval()(x))


def test_bn_scale_frozen_and_bn_group_learning_rate():
    cfg = tiny_config(bn_scale_frozen=True, bias_lr_scale=64.0)
    model = speedrun.build_model(cfg)
    opt = speedrun.build_optimizer(model, cfg)
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


def test_architecture_follows_the_width_and_switches():
    model = speedrun.build_model(speedrun.make_config())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [27, 64, 128, 128, 128, 256, 512, 512, 512]
    assert model.head.in_features == 512 and model.head.bias is None
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    half = speedrun.build_model(speedrun.make_config(width=0.5, whiten=False, residual=False, activation="relu"))
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 64, 128, 256]
    assert not any(isinstance(m, nn.CELU) for m in half.modules())
    celu = [m for m in model.modules() if isinstance(m, nn.CELU)]
    assert celu and all(m.alpha == 0.3 for m in celu)

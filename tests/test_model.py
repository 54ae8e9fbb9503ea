"""The networks and their parts: whitening, ghost batch norm, widths, the two network classes and their init switches."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import config_written_before, correlated_images, preset_config
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


def test_two_by_two_whitening_decorrelates_patches_and_adds_each_filters_negative():
    cfg = preset_config("airbench94", whiten_eps=1e-6, whiten_samples=300)
    x = correlated_images()
    model = speedrun.build_model(cfg)
    speedrun.init_whitening(model, x, cfg)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    torch.testing.assert_close(w[12:], -w[:12])
    out = F.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    torch.testing.assert_close(out.T @ out / out.shape[0], torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)


def test_whitening_bias_starts_at_zero_or_at_pytorchs_uniform_init():
    zero = speedrun.build_model(speedrun.make_config("airbench94")).whiten.bias
    default = speedrun.build_model(speedrun.make_config("record")).whiten.bias
    assert torch.equal(zero, torch.zeros(24))
    bound = 1 / 12 ** 0.5  # fan-in 3 x 2 x 2
    assert default.abs().max() <= bound and default.abs().max() > bound / 2


def test_whitening_bias_counts_as_trainable_only_until_it_is_frozen():
    assert speedrun.trainable_whiten_bias(speedrun.build_model(speedrun.make_config("davidnet"))) is None  # no bias
    model = speedrun.build_model(speedrun.make_config("airbench94"))
    assert speedrun.trainable_whiten_bias(model) is model.whiten.bias
    model.whiten.bias.requires_grad_(False)
    assert speedrun.trainable_whiten_bias(model) is None

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


def test_ghost_bn_normalises_a_channels_last_batch_as_it_does_the_same_batch_in_nchw():
    x = torch.randn(32, 6, 5, 5) * 3 + 1
    nchw, last = (speedrun.GhostBatchNorm(6, 4, momentum=0.3) for _ in range(2))
    with torch.no_grad():
        for bn in (nchw, last):  # a trained scale and bias, the same in both
            bn.weight.copy_(torch.linspace(0.5, 2, 6))
            bn.bias.copy_(torch.linspace(-1, 1, 6))
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous(), "the channels_last path runs, not the reshape"
    y_nchw, y_last = nchw.train()(x), last.train()(cl)
    torch.testing.assert_close(y_last, y_nchw)
    torch.testing.assert_close(last.running_mean, nchw.running_mean)
    torch.testing.assert_close(last.running_var, nchw.running_var)
    y_last.sum().backward()  # and the gradients reach the BN parameters alike
    y_nchw.sum().backward()
    torch.testing.assert_close(last.bias.grad, nchw.bias.grad)


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


def test_airbench_network_is_three_conv_groups_without_prep_conv_or_residuals():
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


def test_activation_after_the_whitening_can_differ_from_the_others():
    model = speedrun.build_model(speedrun.make_config("record"))
    assert isinstance(model.prep, nn.GELU)
    assert all(not isinstance(m, nn.GELU) for m in model.layer1.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.layer1.modules())
    same = speedrun.build_model(speedrun.make_config("airbench94", activation="silu"))
    assert isinstance(same.prep, nn.SiLU)


def test_dirac_init_passes_the_first_channels_through():
    cfg = preset_config("airbench94", dirac_init=True)
    model = speedrun.build_model(cfg)
    conv = model.layer2[1][0]  # 64 -> 64 at width 1/8: 32 -> 32 channels
    x = torch.randn(2, conv.in_channels, 8, 8)
    torch.testing.assert_close(conv(x)[:, :conv.in_channels], x)
    widening = model.layer1[0][0]  # 24 -> 8: the first 8 filters pass input channels 0..7 through
    z = torch.randn(2, widening.in_channels, 8, 8)
    torch.testing.assert_close(widening(z), z[:, :widening.out_channels])
    default = speedrun.build_model(preset_config("airbench94", dirac_init=False)).layer2[1][0]
    assert not torch.allclose(default(x)[:, :conv.in_channels], x)


def test_unit_std_head_starts_at_standard_deviation_one():
    model = speedrun.build_model(speedrun.make_config("record"))
    assert model.head.weight.std().item() == pytest.approx(1.0) and model.head_scale == 1 / 256
    assert speedrun.build_model(speedrun.make_config("airbench94")).head.weight.std() < 0.2


def test_each_arch_builds_its_own_network_and_weights_rebuild_it(tmp_path):
    for arch, kind in speedrun.NETWORKS.items():
        cfg = speedrun.make_config("airbench94" if arch == "airbench" else "davidnet", width=0.125)
        model = speedrun.build_model(cfg)
        assert type(model) is kind
        path = tmp_path / f"{arch}.pt"
        speedrun.save_weights(model, cfg, path)
        again = speedrun.load_checkpoint(path)[0]
        assert type(again) is kind
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_weights_saved_before_the_switch_tables_went_plain_load_with_todays_fields(tmp_path):
    cfg = speedrun.make_config("record", width=0.125)
    model = speedrun.build_model(cfg)
    speedrun.save_weights(model, cfg, tmp_path / "new.pt")
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    torch.save(dict(blob, config=config_written_before(cfg, "record")), tmp_path / "old.pt")
    again, again_cfg = speedrun.load_checkpoint(tmp_path / "old.pt")
    assert again_cfg == cfg and all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("preset", ["airbench94", "davidnet"])  # the two networks (record's is airbench94's)
def test_compiled_low_precision_step_has_finite_gradients(preset):
    # Inductor (the default torch.compile backend) computes a bf16/fp16 activation in float32 and
    # does not round it where autocast would: the global max-pool's backward then compares those
    # unrounded values with the rounded maximum, matches none, and divides by a count of 0: NaN
    # in every gradient below the head, so a compiled airbench run diverged at its second step.
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = preset_config(preset, precision="bf16")
    model = speedrun.build_model(cfg, "cpu")
    speedrun.init_whitening(model, correlated_images(64), cfg)
    x = correlated_images(32).contiguous(memory_format=torch.channels_last)
    with speedrun.autocast(torch.device("cpu"), torch.bfloat16):
        logits = torch.compile(model)(x)  # inductor, as the trainer compiles
    speedrun.smoothed_cross_entropy(logits, torch.arange(32) % 10, cfg.label_smoothing).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("arch", ["resnet9", "airbench"])
def test_every_whitening_kernel_from_1_to_7_builds_a_network_that_classifies_32_pixel_images(arch):
    for k in range(1, 8):
        cfg = speedrun.make_config(arch=arch, whiten_kernel=k, width=0.125, ghost_bn_splits=1)
        model = speedrun.build_model(cfg).eval()
        assert model.whiten.out_channels == 3 * k * k and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

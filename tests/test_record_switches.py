"""The switches the record preset adds: colour jitter, the whitening bias's start and schedule,
the activation after the whitening, a unit-std head, batched Newton-Schulz with hiverge's
coefficients, Muon's decoupled decay and renormalisation, and equal-weight 6-view TTA."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import random_device_data
import speedrun


def record_config(**overrides):
    """The record preset, shrunk to train in seconds on a CPU."""
    small = dict(width=0.125, epochs=2, batch_size=32, whiten_samples=64, eval_batch_size=64, device="cpu", precision="fp32")
    return speedrun.make_config("record", **{**small, **overrides})


def test_colour_jitter_shifts_then_scales_each_image_within_its_ranges():
    cfg = speedrun.make_config(crop_pad=0, flip="none", brightness=0.2, contrast=0.3)
    augment = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(500, 3, 32, 32)
    draw = augment.draw(500, 0, "cpu")
    assert draw.shift.abs().max() <= 0.2 and (draw.scale - 1).abs().max() <= 0.3
    assert draw.shift.min() < -0.15 and draw.shift.max() > 0.15, "uniform over the whole range"
    torch.testing.assert_close(augment.apply(x, draw), (x + draw.shift.view(-1, 1, 1, 1)) * draw.scale.view(-1, 1, 1, 1))
    assert speedrun.EpochAugmenter(speedrun.make_config(), torch.Generator()).draw(8, 0, "cpu").shift is None


def test_whitening_bias_starts_at_zero_or_at_pytorchs_uniform_init():
    zero = speedrun.build_model(speedrun.make_config("airbench94")).whiten.bias
    default = speedrun.build_model(speedrun.make_config("record")).whiten.bias
    assert torch.equal(zero, torch.zeros(24))
    bound = 1 / 12 ** 0.5  # fan-in 3 x 2 x 2
    assert default.abs().max() <= bound and default.abs().max() > bound / 2


def test_activation_after_the_whitening_can_differ_from_the_others():
    model = speedrun.build_model(speedrun.make_config("record"))
    assert isinstance(model.prep, nn.GELU)
    assert all(not isinstance(m, nn.GELU) for m in model.layer1.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.layer1.modules())
    same = speedrun.build_model(speedrun.make_config("airbench94", activation="silu"))
    assert isinstance(same.prep, nn.SiLU)


def test_unit_std_head_and_its_scale():
    model = speedrun.build_model(speedrun.make_config("record"))
    assert model.head.weight.std().item() == pytest.approx(1.0) and model.head_scale == 1 / 256
    assert speedrun.build_model(speedrun.make_config("airbench94")).head.weight.std() < 0.2


def test_batched_orthogonalization_equals_one_matrix_at_a_time():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(8, 27, generator=g), torch.randn(16, 72, generator=g), torch.randn(30, 12, generator=g)]
    coeffs = speedrun.NS_COEFFICIENTS["hiverge"]
    for batched, m in zip(speedrun.orthogonalize_all(mats, 3, coeffs), mats):
        assert batched.shape == m.shape
        torch.testing.assert_close(batched, speedrun.orthogonalize(m, 3, coeffs), rtol=1e-5, atol=1e-6)
    keller = speedrun.orthogonalize(mats[0], 3)
    assert not torch.allclose(keller, speedrun.orthogonalize(mats[0], 3, coeffs)), "the coefficients matter"


def test_muon_renormalises_then_decays_its_filters():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    groups = [dict(params=[conv.weight], lr=0.5, orthogonalize=True, decoupled_wd=0.1, momentum=0.6)]
    opt = speedrun.Muon(groups, momentum=0.9, ns_steps=3, renorm="every_step", total_steps=10)
    conv.weight.grad = torch.zeros_like(conv.weight)  # no gradient: the step only renormalises and decays
    opt.step()
    assert conv.weight.norm().item() == pytest.approx(6 ** 0.5 * (1 - 0.5 * 0.1), rel=1e-5)
    plain = speedrun.Muon([dict(params=[nn.Parameter(conv.weight.detach() * 3)], lr=0.5, orthogonalize=True)],
                          momentum=0.9, ns_steps=3)
    p = plain.param_groups[0]["params"][0]
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    plain.step()
    assert torch.equal(p, before), "renorm none and no decay: a zero gradient moves nothing"


def test_equal_weight_tta_averages_the_six_views():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x = torch.randn(5, 3, 32, 32)
    cfg = speedrun.make_config(tta="flip_translate_equal")
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, x.flip(3), p[..., :32, :32], p[..., 2:, 2:], p[..., :32, :32].flip(3), p[..., 2:, 2:].flip(3)]
    expected = torch.stack([net(v) for v in views]).mean(0)
    got = speedrun.predict(net, x, cfg, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_record_preset_trains_end_to_end_and_reproducibly():
    data = random_device_data(n_train=128, n_test=64)
    a = speedrun.train(record_config(), data, log=lambda *x: None, seed=3)
    b = speedrun.train(record_config(), data, log=lambda *x: None, seed=3)
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    assert a["final_acc"] == b["final_acc"] and not a["diverged"]
    assert not a["model"].whiten.bias.requires_grad, "frozen after its steps"

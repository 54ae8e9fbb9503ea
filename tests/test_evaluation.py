"""Evaluation: test-time augmentation's views and weights, TTA for the unsure images only, and the metrics."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import preset_config, tiny_config
import speedrun


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
    with pytest.raises(ValueError, match=r"tta_unsure_frac must be in \[0, 1\]"):
        speedrun.make_config(tta_unsure_frac=1.5)


def test_confusion_matrix_and_macro_metrics_match_a_hand_count():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    m = speedrun.classification_metrics(pred, target, classes=3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert list(m["per_class_acc"].values()) == [0.5, 1.0, 0.5]
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    p, r = [0.5, 2 / 3, 1.0], [0.5, 1.0, 0.5]
    assert m["macro_f1"] == pytest.approx(sum(2 * a * b / (a + b) for a, b in zip(p, r)) / 3)


def test_saved_weights_evaluate_to_the_runs_own_plain_and_tta_accuracy(real_data_dir, tmp_path, capsys):
    from bench import evaluate
    cfg = preset_config("airbench94", subset=512, test_subset=500, epochs=1, batch_size=64, eval_batch_size=500,
                        data_dir=str(real_data_dir))
    run = speedrun.train(cfg, log=speedrun.silent)  # lookahead: the evaluated model is the trained one
    weights, out = tmp_path / "w.pt", tmp_path / "eval.json"
    speedrun.save_weights(run["model"], cfg, weights)
    assert evaluate.main([str(weights), "--device", "cpu", "--data-dir", str(real_data_dir), "--test-subset", "500",
                          "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["test_images"] == 500 and result["tta"] == "flip_translate"
    assert result["tta_acc"] == pytest.approx(run["final_acc"], abs=1e-9)
    assert result["plain_acc"] == pytest.approx(run["epochs"][-1]["test_acc"], abs=1e-9)
    assert result["tta_gain"] == pytest.approx(result["tta_acc"] - result["plain_acc"])
    assert result["config"] == dataclasses.asdict(cfg), "the run's own config, which bench/ledger.py matches it by"
    assert f"{100 * result['tta_acc']:.2f}" in capsys.readouterr().out
    # the same weights with the views for the least sure quarter only: predict's own selective TTA
    selective = tmp_path / "selective.json"
    assert evaluate.main([str(weights), "--device", "cpu", "--data-dir", str(real_data_dir), "--test-subset", "500",
                          "--tta-unsure-frac", "0.25", "--out", str(selective)]) == 0
    (quarter,) = json.loads(selective.read_text())["results"]
    data = speedrun.load_data(cfg, torch.device("cpu"))
    expected = speedrun.predict(run["model"].eval(), data.test_x, dataclasses.replace(cfg, tta_unsure_frac=0.25),
                                torch.device("cpu"), torch.float32)
    assert quarter["tta_unsure_frac"] == 0.25 and quarter["plain_acc"] == result["plain_acc"]
    assert quarter["config"]["tta_unsure_frac"] == cfg.tta_unsure_frac != 0.25, "the saved config, not the evaluation's"
    assert quarter["tta_acc"] == pytest.approx(speedrun.accuracy(expected, data.test_y), abs=1e-9)


def test_evaluating_a_missing_weights_file_says_how_to_make_one(tmp_path, capsys):
    from bench import evaluate
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(tmp_path / "none.pt"), "--device", "cpu"])
    assert stop.value.code == 2 and "speedrun.py --save" in capsys.readouterr().err

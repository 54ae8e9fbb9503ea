"""bench/pictures.py: the loss and accuracy of every run and epoch of a result, and the training
images' augmented views, which are the trainer's own draws for those images, epoch by epoch."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from helpers import random_device_data, tiny_config
import speedrun
import speedrun_tools
from bench import pictures

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib (optional) is not installed")


def test_augmented_views_are_the_trainers_own_draws_epoch_by_epoch():
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(96) % 10
    cfg = tiny_config(flip="alternating", cutout=8, brightness=0.2, contrast=0.2, crop_pad=2)
    chosen = pictures.one_per_class(labels, 4)
    assert chosen == [0, 1, 2, 3]
    columns = pictures.augmented_views(cfg, train_x[chosen], len(train_x), chosen, seed=3, epochs_shown=3)
    titles = [title for title, _, _ in columns]
    assert titles == ["as stored", "crop / translate alone", "flip alone", "colour jitter alone", "cutout alone",
                      "epoch 1", "epoch 2", "epoch 3"]
    x = speedrun.to_device(train_x, "cpu", torch.float32)
    data = speedrun.DeviceData(x, torch.as_tensor(labels), x[:8], torch.as_tensor(labels[:8]), 0.0)
    setup = speedrun.TrainingSetup(cfg, data, torch.device("cpu"), seed=3)
    for epoch, (_, views, captions) in enumerate(columns[-3:]):
        trained_on = setup.epoch_batches(data, epoch)[0].contiguous().flatten(1)
        for view in views:  # each view is one of the images this epoch of the run trains on
            assert (trained_on - view.flatten()).abs().amax(1).min() < 1e-6
        assert all("shift" in c and "flipped" in c and "cut at" in c for c in captions)
    flips = [[("not flipped" not in c) for c in captions] for _, _, captions in columns[-3:]]
    assert flips[1] == [not f for f in flips[0]] and flips[2] == flips[0], "alternating flips alternate"
    alone = dict((title, views) for title, views, _ in columns)
    assert torch.equal(alone["flip alone"][0], x[0].flip(2)) or torch.equal(alone["flip alone"][0], x[0])
    for cut, image in zip(alone["cutout alone"], x[:4]):  # an 8x8 square set to 0 (the mean), the rest as stored
        changed = (cut != image).any(0)
        assert changed.sum().item() == 64 and (cut[:, changed] == 0).all()


@pytest.mark.parametrize("mode", ["downsample", "crop"])
def test_a_resolution_schedule_shows_each_epoch_at_its_side_as_the_trainer_draws_it(mode):
    train_x = np.random.default_rng(1).integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(96) % 10
    cfg = tiny_config(resolution_schedule="16,24", resolution_mode=mode)
    chosen = pictures.one_per_class(labels, 3)
    columns = pictures.augmented_views(cfg, train_x[chosen], len(train_x), chosen, seed=3, epochs_shown=3)
    assert [t for t, _, _ in columns[-3:]] == [f"epoch 1: 16 px ({mode})", f"epoch 2: 24 px ({mode})",
                                               f"epoch 3: 24 px ({mode})"]
    x = speedrun.to_device(train_x, "cpu", torch.float32)
    data = speedrun.DeviceData(x, torch.as_tensor(labels), x[:8], torch.as_tensor(labels[:8]), 0.0)
    setup = speedrun.TrainingSetup(cfg, data, torch.device("cpu"), seed=3)
    for epoch, (_, views, _) in enumerate(columns[-3:]):
        trained_on = setup.epoch_batches(data, epoch)[0].contiguous().flatten(1)
        for view in views:
            assert (trained_on - view.flatten()).abs().amax(1).min() < 1e-6


@needs_matplotlib
def test_curves_chart_draws_every_run_and_epoch_of_a_result(tmp_path, monkeypatch):
    cfg = tiny_config(runs=2, epochs=3)
    result = speedrun.run_many(cfg, log=speedrun.silent, data=random_device_data(), preset="davidnet")
    result.pop("model")
    path = tmp_path / "r.json"
    speedrun.save_json(result, path)
    drawn = {}
    monkeypatch.setattr(speedrun_tools, "save_chart", lambda fig, p: drawn.setdefault(p.name, fig) and p)
    assert pictures.main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    fig = drawn["curves-r.png"]
    loss, acc = fig.axes
    losses = [list(line.get_ydata()) for line in loss.get_lines()]
    assert losses == [[e["train_loss"] for e in run["epochs"]] for run in json.loads(path.read_text())["runs"]]
    assert acc.get_ylim() == (0, 100) and len(acc.get_lines()) == 2 * 3 + 1  # 3 measures per run, the target
    title = " ".join(fig._suptitle.get_text().split())
    assert "preset davidnet" in title and "3 epochs" in title and "2 seeds (0..1)" in title


@needs_matplotlib
def test_the_augmentation_picture_of_a_preset_is_written(real_data_dir, tmp_path):
    out = tmp_path / "pics"
    assert pictures.main(["--augment", "--preset", "cpu", "--images", "2", "--epochs-shown", "1", "--quiet",
                          "--data-dir", str(real_data_dir), "--out", str(out)]) == 0
    png = (out / "augmentations-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("argv,message", [
    ([], "nothing to draw"),
    (["missing.json"], "missing.json: no such file"),
    (["--augment", "--images", "0"], "--images and --epochs-shown must be at least 1"),
    (["--augment", "--save", "w.pt"], "unrecognized arguments: --save"),
])
def test_bad_input_is_one_line_with_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        pictures.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists(), "a refused command wrote nothing"


def test_an_output_folder_that_holds_files_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.png").write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        pictures.main(["--augment", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.png").read_bytes() == b"x"

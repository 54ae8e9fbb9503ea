"""One run: reproducibility, the timer's rule, clear errors, each airbench preset end to end, and one real-data run."""
import math

import pytest
import torch

from helpers import preset_config, random_device_data, tiny_config
import speedrun


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


def test_a_run_whose_loss_leaves_the_finite_numbers_stops_there_and_is_marked_diverged():
    result = speedrun.train(tiny_config(lr=1e9, epochs=3), random_device_data(), log=quiet)
    assert result["diverged"] and result["diverged_epoch"] == 1 and len(result["epochs"]) == 1
    assert result["epochs"][0]["train_loss"] is None and result["epochs"][0]["tta_acc"] is None
    assert result["final_acc"] is None and result["full_budget_s"] is None and result["time_to_target_s"] is None
    assert result["whitening_s"] > 0 and "model" in result

def test_too_small_training_set_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        speedrun.train(tiny_config(batch_size=256, ghost_bn_splits=16), random_device_data(100), log=quiet)


def test_airbench94_preset_trains_end_to_end_and_reproducibly():
    data = random_device_data(n_train=128, n_test=64)
    a = speedrun.train(preset_config("airbench94"), data, log=lambda *x: None, seed=2)
    b = speedrun.train(preset_config("airbench94"), data, log=lambda *x: None, seed=2)
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    assert a["model"].whiten.weight.shape == (24, 3, 2, 2)
    # lookahead: the evaluated model is the trained one, which ends at the EMA's values
    assert isinstance(a["model"], speedrun.AirbenchNet) and a["model"].training is False


def test_record_preset_trains_end_to_end_and_reproducibly():
    data = random_device_data(n_train=128, n_test=64)
    a = speedrun.train(preset_config("record"), data, log=lambda *x: None, seed=3)
    b = speedrun.train(preset_config("record"), data, log=lambda *x: None, seed=3)
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    assert a["final_acc"] == b["final_acc"] and not a["diverged"]
    assert not a["model"].whiten.bias.requires_grad, "frozen after its steps"


def test_real_data_narrow_network_beats_chance_clearly(real_data_dir):
    """A half-width network on 4,000 real images for two epochs: far above the 10% of chance.
    EMA is off: it averages over about 100 steps and this run has 124."""
    cfg = tiny_config(data_dir=str(real_data_dir), subset=4000, test_subset=1000, width=0.5, epochs=2,
                      batch_size=64, ghost_bn_splits=8, lr=0.5, ema=False, whiten_samples=2000, eval_batch_size=500)
    rows = []
    result = speedrun.run_many(cfg, log=rows.append)
    acc = result["summary"]["acc_mean"]
    assert acc >= 0.45, f"accuracy {acc:.3f} after two epochs on real data"
    assert result["data_load_s"] > 0 and any("eval acc" in r for r in rows)
    assert math.isclose(sum(sum(r) for r in result["runs"][0]["confusion_matrix"]), 1000)


@pytest.mark.parametrize("preset", ["airbench94", "davidnet"])
def test_the_warm_up_compiles_every_graph_the_timed_run_needs(monkeypatch, preset):
    # Compile guards on the batches' memory layout, on which parameters take a gradient (the
    # whitening bias freezes mid-run) and on grad mode (evaluation), and an EMA copy is a network of
    # its own: the warm-up must meet each, so that nothing compiles inside the timer. The cheap
    # aot_eager backend has the same guards as the default one.
    from torch._dynamo.utils import counters
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, mode=None, **kw: compile_(m, backend="aot_eager"))
    torch._dynamo.reset()
    extra = dict(whiten_bias_epochs=1.0) if preset == "airbench94" else dict(ghost_bn_splits=16)
    cfg = preset_config(preset, epochs=3, compile=True, eval_every=2, **extra)
    data = random_device_data(n_train=64, n_test=64)
    speedrun.warm_up(cfg, data, torch.device("cpu"))
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    speedrun.train(cfg, data, log=lambda *a: None)
    assert counters["stats"]["unique_graphs"] == compiled, "a graph was compiled inside the timed run"


def test_runs_given_a_gpu_without_an_index_use_this_processs_gpu(monkeypatch):
    # torch.cuda.set_device needs an index; a caller passing plain "cuda" once crashed in building the TrainingSetup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert speedrun.RunCache(torch.device("cuda")).device == torch.device("cuda", 0)
    assert speedrun.RunCache(torch.device("cpu")).device == torch.device("cpu")

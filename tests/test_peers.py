"""bench/peers.py on the CPU: airbench's data files, the schedule, the ratio statistics, the log
parser, and the whole loop with a fake peer. Neither airbench nor a GPU is needed."""
import json
import math
import os
import signal
import sys
import types

import numpy as np
import pytest
import torch

from helpers import fake_arrays
import speedrun
from bench import peers

TINY = ["--subset", "256", "--test-subset", "128", "--width", "0.125", "--epochs", "1", "--batch-size", "64",
        "--ghost-bn-splits", "4", "--whiten-samples", "128", "--device", "cpu", "--peak-size", "64"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- airbench's cifar10/train.pt and test.pt ----------------------------------------------------


def test_prepared_files_round_trip_exactly_in_airbench_layout(tmp_path):
    train_x, train_y, test_x, test_y = fake_arrays(seed=3)
    written = peers.prepare_airbench_data(tmp_path, train_x, train_y, test_x, test_y)
    assert [w["reused"] for w in written.values()] == [False, False]
    for name, x, y in (("train.pt", train_x, train_y), ("test.pt", test_x, test_y)):
        blob = torch.load(tmp_path / "cifar10" / name, map_location="cpu", weights_only=True)  # as torch >= 2.6 loads it
        assert sorted(blob) == ["classes", "images", "labels"]
        assert blob["images"].dtype == torch.uint8 and blob["images"].shape == (len(x), 32, 32, 3)
        assert blob["labels"].dtype == torch.int64
        assert np.array_equal(blob["images"].numpy(), x) and np.array_equal(blob["labels"].numpy(), y)
        assert blob["classes"] == list(speedrun.CLASSES) and blob["classes"][0] == "airplane"
        # NHWC uint8 -> NCHW [0, 1], normalised with our mean and std, is exactly our device tensor
        nchw = blob["images"].permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(speedrun.MEAN).view(1, 3, 1, 1), torch.tensor(speedrun.STD).view(1, 3, 1, 1)
        assert torch.allclose((nchw - mean) / std, speedrun.to_device(x, "cpu", torch.float32), atol=1e-6)


def test_prepared_files_are_reused_when_equal_and_refused_when_different(tmp_path):
    arrays = fake_arrays(seed=1)
    peers.prepare_airbench_data(tmp_path, *arrays)
    stamp = (tmp_path / "cifar10" / "train.pt").stat().st_mtime_ns
    again = peers.prepare_airbench_data(tmp_path, *arrays)
    assert [w["reused"] for w in again.values()] == [True, True]
    assert (tmp_path / "cifar10" / "train.pt").stat().st_mtime_ns == stamp
    other = fake_arrays(seed=2)
    with pytest.raises(peers.PeerError, match="holds other data.*delete it or choose another --airbench-dir"):
        peers.prepare_airbench_data(tmp_path, *other)


# -- schedule and statistics --------------------------------------------------------------------


@pytest.mark.parametrize("names,rounds", [(["a", "b", "peer"], 6), (["a", "peer"], 4), (["a", "b", "peer"], 1)])
def test_schedule_runs_every_trainer_once_per_round_with_the_order_rotated(names, rounds):
    schedule = peers.interleaved_schedule(names, rounds)
    assert len(schedule) == rounds
    for k, order in enumerate(schedule):
        assert sorted(order) == sorted(names)
        assert order == names[k % len(names):] + names[:k % len(names)]
    for name in names:
        assert sum(order.count(name) for order in schedule) == rounds
        if rounds % len(names) == 0:  # then every trainer holds every position equally often
            positions = [order.index(name) for order in schedule]
            assert all(positions.count(p) == rounds // len(names) for p in range(len(names)))


def test_ratio_statistics_match_a_recomputation():
    pairs = [(1.0, 2.0), (1.2, 2.0), (0.9, 2.5), (1.1, 2.2)]
    stats = peers.ratio_stats(pairs)
    assert stats["rounds"] == 4
    assert stats["ratio"] == pytest.approx((4.2 / 4) / (8.7 / 4))
    per_round = [0.5, 0.6, 0.36, 0.5]
    assert stats["per_round"] == pytest.approx(per_round)
    mean = sum(per_round) / 4
    sd = math.sqrt(sum((r - mean) ** 2 for r in per_round) / 3)
    half = 3.182446305284263 * sd / 2  # Student t, 97.5% quantile, 3 degrees of freedom; sqrt(4) = 2
    assert stats["mean_of_ratios"] == pytest.approx(mean)
    assert stats["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-6)
    assert peers.ratio_stats([])["ratio"] is None


def test_compare_pairs_by_round_and_skips_rounds_that_never_reached_the_target():
    runs = []
    for k, (ours, ttt, peer) in enumerate([(2.0, 1.5, 4.0), (3.0, None, 4.0), (2.5, 2.0, 5.0)]):
        runs += [dict(trainer="record", round=k, time_s=ours, time_to_target_s=ttt),
                 dict(trainer=peers.PEER, round=k, time_s=peer)]
    result = peers.compare(runs, "record")
    assert result["full_budget"]["rounds"] == 3
    assert result["full_budget"]["ratio"] == pytest.approx(2.5 / (13 / 3))
    assert result["time_to_target"]["rounds"] == 2
    assert result["time_to_target"]["per_round"] == pytest.approx([1.5 / 4.0, 2.0 / 5.0])


def test_targets_use_the_full_budget_ratio_and_its_inclusive_or_strict_limit():
    summary = {"record": {"acc_mean": 0.9401}, "davidnet": {"acc_mean": 0.9399}}
    ratios = {"record": {"full_budget": {"ratio": 0.50, "ci95": [0.45, 0.55]}},
              "davidnet": {"full_budget": {"ratio": 2.5, "ci95": [2.4, 2.6]}}}
    targets = peers.check_targets(summary, ratios)
    assert targets["record"]["met"] and not targets["record"]["ratio_ci95_upper_met"]  # <= 0.50 is inclusive
    assert not targets["davidnet"]["acc_met"] and not targets["davidnet"]["ratio_met"]  # < 2.5 is strict


# -- airbench's printed log ---------------------------------------------------------------------


def test_parse_reads_accuracy_and_seconds_from_the_final_eval_row():
    text = "\n".join([
        "-" * 40,
        "|  run  |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |",
        "|      1  |      0  |  0.5000  |  0.6000  |  0.7000  |          |          |",
        "|         |      9  |  0.2000  |  0.9000  |  0.9350  |          |          |",
        "|         |   eval  |  0.2000  |  0.9000  |  0.9350  |  0.9412  |  2.7183  |",
        "-" * 40])
    assert peers.parse_airbench94_log(text) == (0.9412, 2.7183)
    with pytest.raises(peers.PeerError, match="no final 'eval' row"):
        peers.parse_airbench94_log(text.replace("eval", "   9"))


# -- the peer missing, or unable to run ---------------------------------------------------------


def test_missing_airbench_stops_before_any_work_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "airbench", None)  # makes `import airbench` fail
    monkeypatch.setattr(speedrun, "load_cifar10", lambda *a, **k: pytest.fail("data read before the peer check"))
    with pytest.raises(SystemExit) as stop:
        peers.main(["--presets", "davidnet", "--out", str(tmp_path / "r.json"), *TINY])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "cannot import airbench" in err and "pip install --no-deps airbench==0.1.8" in err and "torchvision" in err
    assert not (tmp_path / "r.json").exists()


def test_airbench_without_torchvision_says_so(monkeypatch, tmp_path):
    package = tmp_path / "fakes" / "airbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torchvision'\", name='torchvision')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fakes"))
    monkeypatch.delitem(sys.modules, "airbench", raising=False)
    with pytest.raises(peers.PeerError, match="cannot import torchvision.*install torchvision"):
        peers.import_airbench()


def test_real_peer_refuses_a_device_it_cannot_use(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "airbench", types.ModuleType("airbench"))
    with pytest.raises(peers.PeerError, match="CUDA only"):
        peers.make_airbench94_trainer(tmp_path, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(peers.PeerError, match="CUDA_VISIBLE_DEVICES=1"):
        peers.make_airbench94_trainer(tmp_path, torch.device("cuda", 1))


def test_real_peer_wrapper_runs_train94_in_the_data_folder_and_reads_its_row(monkeypatch, tmp_path):
    """The airbench94 wrapper with a stand-in module: working directory, seed, printed row."""
    peers.prepare_airbench_data(tmp_path, *fake_arrays())
    seen = {}

    def train94(run, verbose):
        seen.update(cwd=os.getcwd(), verbose=verbose, draw=torch.rand(1).item())
        assert os.path.isfile(os.path.join("cifar10", "test.pt"))  # airbench's relative path
        print("|         |   eval  |  0.2  |  0.9  |  0.93  |  0.9431  |  3.1416  |")
        return object()

    monkeypatch.setitem(sys.modules, "airbench", types.SimpleNamespace(train94=train94))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    here = os.getcwd()
    train_once = peers.make_airbench94_trainer(tmp_path, torch.device("cuda"))
    record = train_once(11)
    assert (record["acc"], record["time_s"]) == (0.9431, 3.1416) and record["wall_s"] >= 0
    assert seen["cwd"] == str(tmp_path.resolve()) and seen["verbose"] is True and os.getcwd() == here
    torch.manual_seed(11)
    assert seen["draw"] == torch.rand(1).item()  # seeded through torch's global generator


def test_unknown_preset_lists_those_that_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        peers.main(["--presets", "davidnet,no_such_preset", "--out", str(tmp_path / "r.json"), *TINY],
                   make_peer=lambda folder, device: pytest.fail("peer built for a bad request"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown preset(s) no_such_preset" in err and ", ".join(speedrun.PRESETS) in err


def test_existing_out_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("keep")
    with pytest.raises(SystemExit):
        peers.main(["--presets", "davidnet", "--out", str(out), *TINY], make_peer=lambda f, d: pytest.fail("ran"))
    assert out.read_text() == "keep" and "already exists" in capsys.readouterr().err


# -- the whole benchmark with a fake peer -------------------------------------------------------


def test_benchmark_end_to_end_with_a_fake_peer(real_data_dir, tmp_path, one_thread, capsys):
    calls = dict(folders=[], seeds=[])

    def fake_peer(folder, device):
        calls["folders"].append(folder)
        assert device == torch.device("cpu")

        def train_once(seed):
            calls["seeds"].append(seed)
            assert (folder / "cifar10" / "train.pt").is_file() and (folder / "cifar10" / "test.pt").is_file()
            return dict(acc=0.9400 + 0.0001 * seed, time_s=2.0 + 0.25 * seed, wall_s=3.0)
        return train_once

    out = tmp_path / "peers.json"
    presets = [p for p in ("davidnet", "cpu") if p in speedrun.PRESETS]
    assert peers.main(["--presets", ",".join(presets), "--runs", "2", "--seed", "5", "--out", str(out),
                       "--data-dir", str(real_data_dir), *TINY], make_peer=fake_peer) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["complete"] is True and result["rounds_finished"] == 2
    assert set(result) >= {"kind", "command", "environment", "peer", "timers", "comparison_note", "ratio_method",
                           "target_acc", "data", "configs", "runs_per_trainer", "seed", "schedule", "warm_up", "runs",
                           "summary", "ratios", "targets", "flops"}
    names = [*presets, peers.PEER]
    assert set(result["timers"]) == {"ours_full_budget_s", "ours_time_to_target_s", "airbench94_time_s", "wall_s"}
    assert result["timers"] == peers.TIMERS
    assert calls["folders"] == [tmp_path / "peers-airbench"]
    assert result["data"]["n_train"] == 256 and result["data"]["n_test"] == 128
    blob = torch.load(tmp_path / "peers-airbench" / "cifar10" / "train.pt", weights_only=True)
    with np.load(real_data_dir / speedrun.CACHE_NAME) as z:
        assert np.array_equal(blob["images"].numpy(), z["train_x"][:256])

    # warm-up first (seed + runs), then rotated rounds seeded seed + k
    assert [w["trainer"] for w in result["warm_up"]] == names and {w["seed"] for w in result["warm_up"]} == {7}
    assert calls["seeds"] == [7, 5, 6]
    assert result["schedule"] == peers.interleaved_schedule(names, 2)
    assert [r["trainer"] for r in result["runs"]] == [n for order in result["schedule"] for n in order]
    assert [r["seed"] for r in result["runs"]] == [5] * len(names) + [6] * len(names)

    for preset in presets:
        cfg = result["configs"][preset]
        assert (cfg["subset"], cfg["width"], cfg["epochs"], cfg["device"]) == (256, 0.125, 1, "cpu")
        mine = {r["round"]: r for r in result["runs"] if r["trainer"] == preset}
        peer = {r["round"]: r for r in result["runs"] if r["trainer"] == peers.PEER}
        for r in mine.values():
            assert 0 <= r["acc"] <= 1 and r["time_s"] > r["whitening_s"] > 0 and r["wall_s"] > 0
        full = result["ratios"][preset]["full_budget"]
        expected = (sum(r["time_s"] for r in mine.values()) / 2) / ((2.0 + 1.25 + 2.0 + 1.5) / 2)
        assert full["ratio"] == pytest.approx(expected)
        assert full["per_round"] == pytest.approx([mine[k]["time_s"] / peer[k]["time_s"] for k in (0, 1)])
        summary = result["summary"][preset]
        assert summary["runs"] == 2 and summary["acc_mean"] == pytest.approx(np.mean([r["acc"] for r in mine.values()]))
        flops = result["flops"][preset]
        assert flops["achieved_tflops"] * 1e12 == pytest.approx(flops["timed_flops"] / summary["time_s"]["mean"])
        assert 0 < flops["fraction_of_peak"]
        assert f"{preset} / {peers.PEER}, full budget: ratio {full['ratio']:.3f}" in printed

    s = result["summary"][peers.PEER]
    assert s["acc_mean"] == pytest.approx(0.94055) and s["frac_at_target"] == 1.0
    assert "runs_reaching_target" not in s, "the peer has no early stop: no time-to-target figures for it"
    assert result["summary"][presets[0]]["runs_reaching_target"] is not None
    assert s["time_s"]["min"] == 3.25 and s["time_s"]["max"] == 3.5
    t, p = speedrun.one_sided_t_test([0.9405, 0.9406], 0.94)
    assert s["p_value"] == pytest.approx(p)


def test_speedruns_flags_apply_to_every_preset_and_a_single_preset_or_another_target_is_refused():
    args = peers.build_parser().parse_args(["--epochs", "3", "--width", "0.25", "--runs", "4", "--device", "cpu"])
    overrides, runs, seed, device, data_dir = peers.split_overrides(args)
    assert overrides == {"epochs": 3.0, "width": 0.25} and (runs, seed, device, data_dir) == (4, 0, "cpu", "")
    cfgs = peers.preset_configs(["davidnet", "airbench94"], overrides, torch.device("cpu"))
    assert all(c.epochs == 3 and c.width == 0.25 and c.runs == 1 for c in cfgs.values())
    assert peers.split_overrides(peers.build_parser().parse_args([]))[1:] == (10, 0, "auto", "")
    with pytest.raises(ValueError, match="--presets"):
        peers.split_overrides(peers.build_parser().parse_args(["--preset", "cpu"]))
    with pytest.raises(ValueError, match="--target-acc: the comparison is at airbench94's own target, 0.94"):
        peers.split_overrides(peers.build_parser().parse_args(["--target-acc", "0.93"]))
    assert peers.split_overrides(peers.build_parser().parse_args(["--target-acc", "0.94"]))[0] == {"target_acc": 0.94}


def test_quiet_prints_only_where_the_results_went(real_data_dir, tmp_path, one_thread, capsys):
    def fake_peer(folder, device):
        return lambda seed: dict(acc=0.94, time_s=2.0, wall_s=2.5)
    out = tmp_path / "peers.json"
    assert peers.main(["--presets", "davidnet", "--runs", "1", "--no-flops", "--quiet", "--out", str(out),
                       "--data-dir", str(real_data_dir), *TINY], make_peer=fake_peer) == 0
    assert capsys.readouterr().out.splitlines() == [f"results written to {out}"]


def test_sigterm_keeps_the_finished_rounds_marked_incomplete(real_data_dir, tmp_path, one_thread, capsys):
    """SIGTERM (a time limit's kill) in round 2 of 3: round 1 is on disk, marked "complete": false,
    exit status 130 with one line that says where; the round in progress is not in the file."""
    seen = []

    def fake_peer(folder, device):
        def train_once(seed):
            seen.append(seed)
            if seed == 1:  # the warm-up is seed 3, round k is seed k: stop inside round 2
                os.kill(os.getpid(), signal.SIGTERM)
            return dict(acc=0.94, time_s=2.0, wall_s=2.5)
        return train_once

    out, handler = tmp_path / "peers.json", signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        peers.main(["--presets", "davidnet", "--runs", "3", "--no-flops", "--out", str(out),
                    "--data-dir", str(real_data_dir), *TINY], make_peer=fake_peer)
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: 1 of 3 rounds finished; they are saved in {out} (marked \"complete\": false)"]
    result = json.loads(out.read_text())
    assert result["complete"] is False and result["rounds_finished"] == 1
    assert [(r["trainer"], r["round"]) for r in result["runs"]] == [("davidnet", 0), (peers.PEER, 0)]
    assert result["summary"]["davidnet"]["runs"] == 1 and result["ratios"]["davidnet"]["full_budget"]["rounds"] == 1
    assert seen == [3, 0, 1] and signal.getsignal(signal.SIGTERM) is handler  # the old handler is back


def test_an_interrupt_before_any_round_writes_no_result(real_data_dir, tmp_path, one_thread, capsys):
    def fake_peer(folder, device):
        def train_once(seed):
            raise KeyboardInterrupt  # Ctrl-C in the warm-up
        return train_once

    out = tmp_path / "peers.json"
    with pytest.raises(SystemExit) as stop:
        peers.main(["--presets", "davidnet", "--runs", "2", "--no-flops", "--out", str(out),
                    "--data-dir", str(real_data_dir), *TINY], make_peer=fake_peer)
    assert stop.value.code == 130 and not out.exists()
    assert "interrupted before any round finished; no result was written" in capsys.readouterr().err

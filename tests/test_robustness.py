"""A bad day: unwritable result paths, diverged runs, interrupts, strict JSON, torchrun's banner."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, random_device_data
import speedrun

TINY = ["--device", "cpu", "--subset", "128", "--test-subset", "64", "--width", "0.125", "--epochs", "2",
        "--batch-size", "32", "--ghost-bn-splits", "4", "--whiten-samples", "64", "--eval-batch-size", "64"]


def strict_json(path):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript's, jq's) do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def fake_result(seed, diverged=False):
    run = dict(seed=seed, epochs=[dict(epoch=1, train_loss=math.nan if diverged else 2.0, train_acc=0.1, test_acc=0.1,
                                       tta_acc=0.1, train_s=1.0, eval_s=0.1)],
               final_acc=None if diverged else 0.5 + seed / 100, time_to_target_s=None, epochs_to_target=None,
               whitening_s=0.1, train_s=1.0, full_budget_s=1.2, model=None)
    if diverged:
        run.update(diverged=True, diverged_epoch=2)
    return run


@pytest.fixture
def fake_training(monkeypatch):
    """speedrun.train replaced by a function of the seed (no data read, nothing trained)."""
    monkeypatch.setattr(speedrun, "load_data", lambda *a, **k: random_device_data())
    plan = {}

    def train(cfg, data=None, log=print, seed=None):
        action = plan.get(seed, "ok")
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "crash":
            raise RuntimeError("injected failure")
        return fake_result(seed, diverged=action == "diverge")

    monkeypatch.setattr(speedrun, "train", train)
    return plan


# -- item 3: --out and --save are checked before any work; a late failure falls back ----------

@pytest.mark.parametrize("flag", ["--out", "--save"])
def test_result_path_under_a_file_fails_before_data_is_read(tmp_path, monkeypatch, capsys, flag):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(speedrun, "load_cifar10", lambda *a, **k: pytest.fail("data read before the path check"))
    argv = [*TINY, flag, str(tmp_path / "afile" / "r.json")] + (["--out", str(tmp_path / "ok.json")] if flag == "--save" else [])
    with pytest.raises(SystemExit) as stop:
        speedrun.main(argv)
    assert stop.value.code == 2
    assert f"{flag} {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's read-only /proc")
def test_result_path_in_a_read_only_folder_fails_before_data_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speedrun, "load_cifar10", lambda *a, **k: pytest.fail("data read before the path check"))
    with pytest.raises(SystemExit) as stop:
        speedrun.main([*TINY, "--out", str(tmp_path / "r.json"), "--save", "/proc/w.pt"])
    assert stop.value.code == 2 and "--save /proc/w.pt: cannot write in /proc" in capsys.readouterr().err


def test_a_result_that_cannot_be_written_at_the_end_goes_to_a_fallback(tmp_path, monkeypatch, fake_training, capsys):
    out = tmp_path / "results" / "r.json"
    real_run_many = speedrun.run_many

    def run_many_then_break_the_folder(*args, **kwargs):
        result = real_run_many(*args, **kwargs)
        shutil.rmtree(tmp_path / "results")
        (tmp_path / "results").write_text("the folder became a file during the run")
        return result

    monkeypatch.setattr(speedrun, "run_many", run_many_then_break_the_folder)
    (tmp_path / "results").mkdir()
    assert speedrun.main([*TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"could not write --out {out}" in captured.err
    fallback = captured.err.split("wrote it to ")[1].split(" instead")[0]
    try:
        assert strict_json(speedrun.Path(fallback))["runs"][0]["seed"] == 0
        assert f"results written to {fallback}" in captured.out
    finally:
        os.unlink(fallback)


# -- item 4: diverged runs, strict JSON -----------------------------------------------------------

def test_json_results_are_strict_even_with_non_finite_numbers(tmp_path):
    result = dict(runs=[dict(final_acc=math.nan, train_loss=math.inf, rows=[-math.inf, 1.5])], summary=dict(t_stat=-math.inf))
    speedrun.save_json(result, tmp_path / "r.json")
    assert strict_json(tmp_path / "r.json") == dict(runs=[dict(final_acc=None, train_loss=None, rows=[None, 1.5])],
                                                    summary=dict(t_stat=None))


def test_a_diverged_run_is_named_reported_and_fails_the_command(tmp_path, fake_training, capsys):
    fake_training[1] = "diverge"
    out = tmp_path / "r.json"
    assert speedrun.main([*TINY, "--runs", "2", "--out", str(out), "--lr", "2"]) == 1
    captured = capsys.readouterr()
    assert "run 2 of 2 (seed 1) diverged in epoch 2" in captured.out and "--lr 0.5 instead of 2" in captured.out
    assert "1 of 2 runs diverged" in captured.out + captured.err
    assert "t = -inf" not in captured.out and "nan" not in captured.out
    result = strict_json(out)
    assert result["summary"]["diverged"] == 1 and result["summary"]["diverged_seeds"] == [1]
    assert result["summary"]["acc_mean"] == pytest.approx(0.5) and result["summary"]["acc_std"] is None
    assert result["runs"][1]["diverged"] is True and result["runs"][1]["epochs"][0]["train_loss"] is None


# -- item 5: interrupts and crashes keep the finished runs ----------------------------------------

def test_ctrl_c_keeps_the_finished_runs_with_a_one_line_message(tmp_path, fake_training, capsys):
    fake_training[2] = "interrupt"
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as stop:
        speedrun.main([*TINY, "--runs", "4", "--out", str(out)])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert err.strip() == f'interrupted: 2 of 4 runs finished; they are saved in {out} (marked "complete": false)'
    result = strict_json(out)
    assert [r["seed"] for r in result["runs"]] == [0, 1] and result["complete"] is False
    assert result["summary"]["runs"] == 2


def test_a_crash_in_a_later_run_keeps_the_earlier_ones(tmp_path, fake_training, capsys):
    fake_training[1] = "crash"
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as stop:
        speedrun.main([*TINY, "--runs", "3", "--out", str(out)])
    assert stop.value.code == 2
    assert f"injected failure (1 finished run saved in {out})" in capsys.readouterr().err
    assert [r["seed"] for r in strict_json(out)["runs"]] == [0]


def test_sigterm_stops_like_ctrl_c_and_keeps_finished_runs(real_data_dir, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "speedrun.py"), "--data-dir", str(real_data_dir), *TINY,
                             "--runs", "5", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # the first run has finished when the second starts
            if line.startswith("run 2 of 5"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("interrupted: 1 of 5 runs finished; they are saved in")
    assert [r["seed"] for r in strict_json(out)["runs"]][:1] == [0]


# -- item 7: torchrun's banner comes after its own checks -----------------------------------------

def test_torchrun_job_with_indivisible_ghost_bn_fails_before_the_banner(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stop:
        speedrun.main([*TINY, "--ghost-bn-splits", "1", "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and "ghost_bn_splits 1 is not a multiple of the 2 processes" in captured.err
    assert "ghost-BN groups per process" not in captured.out


def test_partial_runs_that_nowhere_could_take_are_not_said_to_be_saved(monkeypatch, tmp_path):
    # a full disk everywhere: write_with_fallback has said so and returns None; the interrupt line then
    # must not claim "saved in None"
    monkeypatch.setattr(speedrun, "write_with_fallback", lambda *args, **kwargs: None)
    partial = speedrun.PartialResult()
    partial.writer(tmp_path / "r.json")(dict(runs=[{"seed": 0}]))
    assert partial.path is None and partial.runs == 0

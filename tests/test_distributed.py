"""Several processes: torchrun with gloo on the CPU, and independent runs spread over workers."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, quick_progress_worker, random_device_data, tiny_config
import speedrun

TINY = ["--subset", "512", "--test-subset", "200", "--width", "0.125", "--epochs", "2", "--batch-size", "64",
        "--ghost-bn-splits", "4", "--whiten-samples", "128", "--device", "cpu", "--eval-batch-size", "100"]


def torchrun(*argv, nproc=2, timeout=240, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_each_process_takes_whole_ghost_bn_groups_of_every_batch():
    cfg = tiny_config(batch_size=64, ghost_bn_splits=8)
    alone = speedrun.local_positions(3, cfg, speedrun.Distributed(0, 1))
    assert torch.equal(alone, torch.arange(192))
    shares = [speedrun.local_positions(3, cfg, speedrun.Distributed(r, 4)) for r in range(4)]
    assert torch.equal(torch.sort(torch.cat(shares)).values, torch.arange(192)), "every image once"
    for r, share in enumerate(shares):
        batch, within = share // 64, share % 64
        assert torch.equal(batch, torch.arange(3).repeat_interleave(16)), "16 images of each batch, in batch order"
        local_group = torch.arange(len(share)) % 2  # 8 groups over 4 processes: 2 groups each
        assert torch.equal(within % 8, r * 2 + local_group), "the same images as single-process group r*2 + j"


def test_two_processes_train_like_one(real_data_dir, tmp_path):
    proc = torchrun(ROOT / "tests" / "ddp_worker.py", real_data_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), "ranks' weights differ"
    ddp = torch.load(tmp_path / "result.pt", weights_only=False)
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo", "weights_identical": True}
    cfg = speedrun.make_config(data_dir=str(real_data_dir), subset=512, test_subset=200, width=0.125, epochs=2,
                               batch_size=64, ghost_bn_splits=4, whiten_samples=128, device="cpu", eval_batch_size=100)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process; restored, since later tests' numerics depend on it
    try:
        single = speedrun.train(cfg, log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    # Same images, batches and BN groups: only the order of floating-point sums differs.
    for a, b in zip(ddp["epochs"], single["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)
    assert abs(ddp["final_acc"] - single["final_acc"]) <= 0.03


def test_torchrun_cli_rank_zero_alone_writes_results(real_data_dir, tmp_path):
    out, weights = tmp_path / "r.json", tmp_path / "w.pt"
    proc = torchrun("speedrun.py", "--data-dir", real_data_dir, *TINY, "--out", out, "--save", weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.pt"]
    assert proc.stdout.count("results written to") == 1 and proc.stdout.count("eval acc") == 1
    assert "2 processes (gloo): global batch 64, 32 images and 2 ghost-BN groups per process" in proc.stdout
    result = json.loads(out.read_text())
    assert result["runs"][0]["distributed"]["weights_identical"] is True
    model = speedrun.load_checkpoint(weights)[0]  # the saved network rebuilds and evaluates
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_a_crashing_rank_ends_the_job_with_an_error(real_data_dir, tmp_path):
    proc = torchrun(ROOT / "tests" / "ddp_worker.py", real_data_dir, tmp_path, env={"CRASH_RANK": "1"}, timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert not (tmp_path / "result.pt").exists()


def test_ghost_bn_groups_must_split_over_the_processes(monkeypatch):
    monkeypatch.setattr(speedrun, "process_group", lambda: speedrun.Distributed(0, 2))
    with pytest.raises(ValueError, match="ghost_bn_splits 1 is not a multiple of the 2 processes"):
        speedrun.train(tiny_config(ghost_bn_splits=1), random_device_data(), log=lambda *a: None)


def test_processes_need_a_device_each_and_are_told_what_to_do(monkeypatch):
    speedrun.check_process_devices("cpu", 8)  # CPU processes share the cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    speedrun.check_process_devices("cuda", 2)
    speedrun.check_process_devices("cuda:1", 1)  # alone, a pinned GPU is fine
    with pytest.raises(ValueError, match="cuda:1 pins every process to one GPU; use --device cuda"):
        speedrun.check_process_devices("cuda:1", 2)
    with pytest.raises(ValueError, match="3 processes need 3 GPUs .* 2 are visible; lower --procs, or use --device cpu"):
        speedrun.check_process_devices("auto", 3, fewer="lower --procs")
    # inside a job, each process's device is already its own GPU: a run's own checks must accept it
    speedrun.check_world(speedrun.make_config(device="cuda:1", ghost_bn_splits=16), 2)
    # the check counts this machine's processes: 2 nodes x 2 GPUs is a job of 4 on 2 GPUs each
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(speedrun.dist, "init_process_group", lambda *a, **k: pytest.fail("joined a job it cannot run"))
    with pytest.raises(ValueError, match="3 processes need 3 GPUs"):
        speedrun.init_distributed(speedrun.make_config(device="cuda"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    joined = []
    monkeypatch.setattr(speedrun.dist, "init_process_group", lambda backend, **k: joined.append(backend))
    monkeypatch.setattr(speedrun, "process_group", lambda: speedrun.Distributed(0, 4))
    monkeypatch.setattr(speedrun.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine] * len(out)))
    assert speedrun.init_distributed(speedrun.make_config(device="cuda")).world == 4 and joined == ["nccl"]


def test_runs_spread_over_worker_processes(real_data_dir, tmp_path):
    base = [sys.executable, "speedrun.py", "--data-dir", str(real_data_dir), *TINY, "--runs", "2"]
    spread = subprocess.run(base + ["--workers", "2", "--out", str(tmp_path / "w2.json")], capture_output=True, text=True, cwd=ROOT)
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert "2 runs over 2 worker processes" in spread.stdout
    alone = subprocess.run(base + ["--out", str(tmp_path / "w1.json")], capture_output=True, text=True, cwd=ROOT)
    assert alone.returncode == 0, alone.stderr[-3000:]
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("w2.json", "w1.json"))
    assert [r["seed"] for r in a["runs"]] == [r["seed"] for r in b["runs"]] == [0, 1]
    for x, y in zip(a["runs"], b["runs"]):  # same seeds; only the CPU thread count differs
        assert x["epochs"][-1]["train_loss"] == pytest.approx(y["epochs"][-1]["train_loss"], rel=1e-3)
    assert a["summary"]["runs"] == 2


def test_workers_send_their_runs_progress_lines_to_the_log_named_by_seed_and_a_silent_log_prints_nothing(
        real_data_dir, monkeypatch, capfd):
    monkeypatch.setattr(speedrun, "_pool_worker", quick_progress_worker)  # a progress line every step, in the workers
    cfg = tiny_config(data_dir=str(real_data_dir), subset=256, test_subset=200, batch_size=64, epochs=1, runs=2, workers=2)
    said = []
    assert speedrun.run_many(cfg, log=said.append)["summary"]["runs"] == 2
    steps = [line for line in said if re.fullmatch(r"  \[seed [01], worker [12]\] step \d of 4: [\d,]+ images/s, "
                                                   r"training ends in about \d+ s", line)]
    assert {line[:9] for line in steps} == {"  [seed 0", "  [seed 1"}, said
    assert "2 runs over 2 worker processes (cpu)" in said and not any("train loss" in line for line in said)
    assert len([line for line in said if line.startswith("run ")]) == 2, said
    capfd.readouterr()
    assert speedrun.run_many(cfg, log=speedrun.silent)["summary"]["runs"] == 2
    assert capfd.readouterr().out == ""


def test_a_failing_worker_is_reported(tmp_path):
    (tmp_path / "bad").mkdir()  # a damaged archive: refused, never downloaded again (with or without a network)
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    bad = subprocess.run([sys.executable, "speedrun.py", "--data-dir", str(tmp_path / "bad"), *TINY, "--runs", "2",
                          "--workers", "2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "error: the worker on cpu failed in run" in bad.stderr and "has MD5" in bad.stderr


def test_whitening_bias_freezes_by_gradient_under_torchrun(real_data_dir, tmp_path):
    # freezing changes which parameters take a gradient: each process rebuilds its DDP wrapper then
    out = tmp_path / "r.json"
    proc = torchrun("speedrun.py", "--preset", "airbench94", "--data-dir", real_data_dir, *TINY, "--ghost-bn-splits", "2",
                    "--epochs", "3", "--whiten-bias-epochs", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["distributed"]["weights_identical"] and len(run["epochs"]) == 3

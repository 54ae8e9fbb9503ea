"""ablations/scaling.py: strong and weak scaling over 1 and 2 CPU processes (torchrun, gloo), the
report's arithmetic, skipped process counts, failing jobs and bad flags."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, random_device_data, tiny_config
import speedrun
from ablations import scaling

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

TINY = ["--device", "cpu", "--subset", "512", "--test-subset", "128", "--width", "0.125", "--batch-size", "64",
        "--ghost-bn-splits", "4", "--whiten-samples", "128"]


def run_scaling(*argv, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "ablations" / "scaling.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def one_and_two(real_data_dir, tmp_path_factory):
    """One measurement of P = 1, 2 in both modes; returns (stdout, out folder, report)."""
    out = tmp_path_factory.mktemp("scaling") / "out"
    proc = run_scaling("--procs", "1,2", "--mode", "both", "--steps", "2", "--warmup-steps", "1", "--repeats", "2",
                       *TINY, "--data-dir", real_data_dir, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout, out, json.loads((out / "scaling.json").read_text())


def table_row(text, mode, procs):
    return re.search(rf"^\| {mode} \| {procs} \| (\d+) \| (\d+) \|", text, re.M)


def test_output_names_the_hardware_and_command_then_tabulates_both_modes(one_and_two):
    stdout, out, _ = one_and_two
    lines = stdout.splitlines()
    assert lines[0].startswith("hardware: CPU ") and f"torch {speedrun.torch.__version__}" in lines[0]
    assert lines[1].startswith("command: python ") and "--procs 1,2 --mode both" in lines[1]
    assert lines[2] == scaling.CPU_NOTICE
    md = (out / "scaling.md").read_text()
    for text in (stdout, md):
        assert [table_row(text, m, p).groups() for m, p in (("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2))] == [
            ("64", "64"), ("64", "32"), ("64", "64"), ("128", "64")]
    assert "P=2: strong global batch 64 = 2 x 32, weak global batch 128 = 2 x 64" in stdout
    chart = [out / "scaling.png"] if HAVE_MATPLOTLIB else []  # matplotlib is optional
    assert lines[-1] == "written: " + ", ".join(str(p) for p in [out / "scaling.json", out / "scaling.md", *chart])


def test_report_numbers_are_consistent(one_and_two):
    _, _, report = one_and_two
    rows = {(r["mode"], r["procs"]): r for r in report["rows"]}
    assert sorted(rows) == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    assert report["settings"]["backend"] == "gloo" and report["jobs"]["2"]["backend"] == "gloo"
    assert report["jobs"]["2"]["environment"]["device_name"].endswith(" 1 torch thread)"), "one thread per CPU process"
    for (mode, procs), r in rows.items():
        step_s = r["step_ms"] / 1e3
        assert r["images_per_s"] == pytest.approx(r["global_batch"] / step_s, rel=1e-12)
        assert r["speedup"] == pytest.approx(r["images_per_s"] / rows[mode, 1]["images_per_s"], rel=1e-12)
        assert r["efficiency"] == pytest.approx(r["speedup"] / procs, rel=1e-12)
        assert r["compute_ms"] + r["communication_ms"] == pytest.approx(r["step_ms"], rel=1e-12)
        assert r["communication_ms"] >= 0 and r["communication_frac"] == pytest.approx(r["communication_ms"] / r["step_ms"])
        assert r["compute_ms"] == min(r["no_communication_ms"], r["step_ms"])
        assert r["steps_per_epoch"] == 512 // r["global_batch"]
        assert r["epoch_s"] == pytest.approx(r["steps_per_epoch"] * step_s, rel=1e-12)
        assert r["per_rank_batch"] * procs == r["global_batch"]
        assert r["global_batch"] == (64 if mode == "strong" else 64 * procs)
        assert r["ghost_bn_splits"] == (4 if mode == "strong" else 4 * procs)
        assert r["step_ms_sd"] is not None and r["step_ms_sd"] >= 0, "two repeats give a spread"
    for mode in scaling.MODES:
        assert rows[mode, 1]["speedup"] == 1.0 and rows[mode, 1]["communication_ms"] == 0.0
    assert rows["strong", 1] == {**rows["weak", 1], "mode": "strong"}, "P=1 is one measurement, both modes' baseline"
    # the raw seconds per repeat are kept, and the step time is their mean over the timed steps
    (strong2,) = [c for c in report["jobs"]["2"]["cases"] if c["modes"] == ["strong"]]
    assert len(strong2["synced_s"]) == len(strong2["unsynced_s"]) == 2 and strong2["steps"] == 2
    assert rows["strong", 2]["step_ms"] == pytest.approx(1e3 * sum(strong2["synced_s"]) / 2 / 2, rel=1e-12)
    assert rows["strong", 2]["compute_ms"] == pytest.approx(
        min(1e3 * sum(strong2["unsynced_s"]) / 4, rows["strong", 2]["step_ms"]), rel=1e-12)


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="the chart needs the optional matplotlib")
def test_scaling_chart_is_drawn_as_a_png_file(one_and_two):
    _, out, _ = one_and_two
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_without_matplotlib_a_notice_says_how_to_get_the_chart(one_and_two, tmp_path, monkeypatch):
    _, out, report = one_and_two
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    said = []
    written = scaling.write_reports(tmp_path, report, log=said.append)
    assert said == [scaling.CHART_NOTICE] and "pip install matplotlib" in said[0]
    assert [p.name for p in written] == ["scaling.json", "scaling.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scaling.json", "scaling.md"]
    assert json.loads((tmp_path / "scaling.json").read_text()) == report


def test_an_impossible_process_count_is_skipped_with_a_note(real_data_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_scaling("--procs", "1,3", "--mode", "strong", "--steps", "1", "--warmup-steps", "0", "--repeats", "1",
                       *TINY, "--data-dir", real_data_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = "ghost_bn_splits 4 is not a multiple of 3"
    assert f"skipped strong P=3: {note}" in proc.stdout
    assert f"- strong P=3 skipped: {note}" in (out / "scaling.md").read_text()
    report = json.loads((out / "scaling.json").read_text())
    assert [(r["mode"], r["procs"]) for r in report["rows"]] == [("strong", 1)]
    assert [(s["mode"], s["procs"]) for s in report["skipped"]] == [("strong", 3)]
    assert list(report["jobs"]) == ["1"], "no job is started for a skipped P"


def test_a_slower_run_without_communication_is_noted_not_shown_as_negative():
    case = dict(modes=["strong"], batch_size=64, per_rank_batch=32, ghost_bn_splits=4, n_train=512, steps=2)
    results = {1: dict(cases=[dict(case, per_rank_batch=64, synced_s=[0.2], unsynced_s=[0.2])]),
               2: dict(cases=[dict(case, synced_s=[0.1, 0.14], unsynced_s=[0.13, 0.13])])}
    one, two = scaling.make_rows(results, ["strong"])
    assert (one["step_ms"], one["communication_ms"], one["step_ms_sd"]) == (100.0, 0.0, None)
    assert two["step_ms"] == pytest.approx(60.0) and two["no_communication_ms"] == pytest.approx(65.0)
    assert (two["compute_ms"], two["communication_ms"]) == (two["step_ms"], 0.0)
    assert two["speedup"] == pytest.approx(100 / 60) and two["efficiency"] == pytest.approx(100 / 60 / 2)
    assert two["step_ms_sd"] == pytest.approx(1e3 * 0.02 * 2 ** 0.5 / 2), "sample sd of 0.10 and 0.14 s, over 2 steps"
    assert scaling.noise_notes([one, two]) == [
        "strong P=2: the steps without communication took 65.0 ms, more than with it: "
        "the timing noise exceeds the communication time, shown as 0"]


def test_plan_shares_p1_between_modes_and_skips_what_cannot_run():
    cfg = speedrun.make_config(batch_size=64, ghost_bn_splits=4)
    plan, skipped = scaling.plan_cases(cfg, [1, 2, 3, 16], ["strong", "weak"], n_train=512)
    assert plan[1] == [dict(modes=["strong", "weak"], batch_size=64, ghost_bn_splits=4)]
    assert plan[2] == [dict(modes=["strong"], batch_size=64, ghost_bn_splits=4),
                       dict(modes=["weak"], batch_size=128, ghost_bn_splits=8)]
    assert plan[3] == [dict(modes=["weak"], batch_size=192, ghost_bn_splits=12)]
    assert 16 not in plan
    assert [(s["mode"], s["procs"]) for s in skipped] == [("strong", 3), ("strong", 16), ("weak", 16)]
    assert "fewer than one global batch of 1024" in skipped[2]["reason"]


def test_max_procs_means_powers_of_two_and_itself_and_one_is_always_measured():
    assert scaling.parse_procs(None, 6) == [1, 2, 4, 6]
    assert scaling.parse_procs(None, 8) == [1, 2, 4, 8]
    assert scaling.parse_procs(None, 1) == [1]
    assert scaling.parse_procs("4, 2,2", 99) == [1, 2, 4]


def test_a_failing_job_exits_non_zero_with_the_rank_s_error(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "bad").mkdir()  # a damaged archive: refused, never downloaded again (with or without a network)
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    proc = run_scaling("--procs", "1,2", "--steps", "1", *TINY, "--data-dir", tmp_path / "bad", "--out", out, timeout=120)
    assert proc.returncode == 1
    assert "error: the 1-process job failed (torchrun exit status 1):" in proc.stderr
    assert f"rank 0: DataError: {tmp_path / 'bad' / 'cifar-10-python.tar.gz'} has MD5" in proc.stderr
    assert not out.exists(), "nothing is written when a job fails"


@pytest.mark.parametrize("argv, message", [
    (["--mode", "sideways"], "argument --mode: invalid choice: 'sideways'"),
    (["--procs", "1,x"], "error: --procs takes comma-separated whole numbers"),
    (["--procs", "0,2"], "error: --procs needs process counts of 1 or more"),
    (["--max-procs", "0"], "error: --max-procs must be at least 1"),
    (["--max-procs", "2", "--procs", "1,2"], "error: give --procs or --max-procs, not both"),
    (["--steps", "0"], "error: --steps must be at least 1"),
    (["--save", "w.pt"], "unrecognized arguments: --save"),
    (["--runs", "3"], "error: --runs and --workers do not apply"),
    (["--batch-size", "62"], "error: batch_size 62 is not divisible by ghost_bn_splits 4"),
    (["--subset", "32"], "error: 32 training images are fewer than one batch of 64; lower --batch-size or raise --subset"),
])
def test_bad_flags_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        scaling.main(["--device", "cpu", "--batch-size", "64", "--ghost-bn-splits", "4", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_non_empty_out_folder_is_refused(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_:
        scaling.main(["--device", "cpu", "--procs", "1", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"error: --out {tmp_path} already exists; choose another path" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


def test_timed_steps_are_the_runs_usual_ones_with_the_whitening_bias_already_frozen(monkeypatch):
    cfg = tiny_config(arch="airbench", whiten_kernel=2, whiten_bias_epochs=1.0, batch_size=32, ghost_bn_splits=1)
    bias_trains = []
    real_train_epoch = speedrun.train_epoch

    def recording(setup, ema, x, y, step, progress=None):
        bias_trains.append(setup.model.whiten.bias.requires_grad)
        return real_train_epoch(setup, ema, x, y, step, progress)
    monkeypatch.setattr(speedrun, "train_epoch", recording)
    ctx = speedrun.Distributed()
    case = scaling.measure_case(cfg, random_device_data(n_train=128), ctx, torch.device("cpu"),
                                steps=5, warmup=1, repeats=2)  # 5 steps > the bias's 4: it would freeze inside
    assert bias_trains == [False] * 3 and len(case["synced_s"]) == 2

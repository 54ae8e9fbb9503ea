"""ablations/: variants, the results CSV, resume, shards and merge, workers, the summary's numbers, charts."""
import csv
import dataclasses
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import FIELDS_WRITTEN_BEFORE, ROOT
import speedrun
from ablations import grid, merge, optimizers, study, tricks

TINY = ["--device", "cpu", "--subset", "256", "--test-subset", "128", "--width", "0.125", "--epochs", "2",
        "--batch-size", "64", "--ghost-bn-splits", "4", "--whiten-samples", "128", "--eval-batch-size", "64",
        "--threads", "1", "--target-acc", "0.15"]
PAIR = ["--runs", "2", "--variants", "full,no_tta"]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_script(name, *argv):
    proc = subprocess.run([sys.executable, str(ROOT / "ablations" / name), *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_csv(folder):
    """The CSV as plain dicts of strings, read without the study module."""
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def accuracy_fields(row):
    return (row["variant"], row["seed"], row["final_acc"], row["epochs_to_target"], row["acc_by_epoch"])


@pytest.fixture(scope="module")
def full_study(real_data_dir, tmp_path_factory):
    """A 2-variant x 2-seed leave-one-out study, run end to end from the command line."""
    folder = tmp_path_factory.mktemp("ablations") / "full"
    stdout = run_script("tricks.py", "--data-dir", str(real_data_dir), *TINY, *PAIR, "--study", str(folder))
    return folder, stdout


# -- variants ----------------------------------------------------------------------------------


def changed_fields(a: speedrun.Config, b: speedrun.Config) -> dict:
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_leave_one_out_switches_off_one_trick_per_variant():
    base = speedrun.make_config()
    variants, notes = tricks.leave_one_out(base)
    assert variants[0].name == "full" and variants[0].config == base
    assert {n.split()[0] for n in notes} == {"flip_tta", "tta_all_images", "random_flip", "no_whitening_bias",
                                             "no_whitening_negatives", "default_init", "no_colour_jitter",
                                             "no_muon_renorm", "no_lr_floor", "no_progressive"}, \
        "the other presets' tricks, which davidnet lacks"
    changes = {v.name: changed_fields(base, v.config) for v in variants[1:]}
    assert changes == {
        "no_whitening": dict(whiten=False), "no_label_smoothing": dict(label_smoothing=0.0),
        "relu": dict(activation="relu"), "plain_bn": dict(ghost_bn_splits=1), "bn_scale_trained": dict(bn_scale_frozen=False),
        "constant_lr": dict(lr_schedule="constant"), "linear_lr": dict(lr_schedule="linear"), "no_ema": dict(ema=False),
        "no_tta": dict(tta="none"), "no_flip": dict(flip="none"), "no_crop": dict(crop_pad=0), "cutout": dict(cutout=8),
        "fp32": dict(precision="fp32"), "no_channels_last": dict(channels_last=False)}
    assert all(v.reference == "full" for v in variants[1:])
    # a switch already off in the base would repeat the full recipe: skipped, and said so
    without_ema, notes = tricks.leave_one_out(dataclasses.replace(base, ema=False))
    assert "no_ema" not in [v.name for v in without_ema] and any("no_ema skipped" in n for n in notes)


def test_leave_one_out_covers_the_tricks_of_airbench94_and_the_record():
    airbench = speedrun.make_config("airbench94")
    changes = {v.name: changed_fields(airbench, v.config) for v in tricks.leave_one_out(airbench)[0][1:]}
    assert changes["no_whitening_bias"] == dict(whiten_bias_epochs=0.0) and changes["random_flip"] == dict(flip="random")
    assert changes["default_init"] == dict(dirac_init=False) and changes["flip_tta"] == dict(tta="flip")
    assert changes["no_whitening_negatives"] == dict(whiten_negatives=False) and changes["no_ema"] == dict(ema=False)
    assert "plain_bn" not in changes and "no_colour_jitter" not in changes, "airbench94 has neither trick"
    record = speedrun.make_config("record")
    changes = {v.name: changed_fields(record, v.config) for v in tricks.leave_one_out(record)[0][1:]}
    assert changes["no_colour_jitter"] == dict(brightness=0.0, contrast=0.0)
    assert changes["tta_all_images"] == dict(tta_unsure_frac=1.0) and changes["no_muon_renorm"] == dict(muon_renorm="none")
    assert "no_ema" not in changes, "the record has no EMA to remove"
    assert not {"no_progressive", "crop_resolution", "no_lr_floor"} & set(changes), "the record has none of E1's tricks"


def test_leave_one_out_switches_off_each_of_e1s_tricks():
    e1 = speedrun.make_config("fulcrum_e1")
    changes = {v.name: changed_fields(e1, v.config) for v in tricks.leave_one_out(e1)[0][1:]}
    assert changes["no_progressive"] == dict(resolution_schedule="")
    assert changes["crop_resolution"] == dict(resolution_mode="crop")
    assert changes["no_lr_floor"] == dict(lr_floor=0.0)
    assert changes["no_late_lookahead"] == dict(ema=False) and "no_ema" not in changes


def test_cumulative_adds_one_trick_per_step_in_pages_order():
    base = speedrun.make_config()
    variants, _ = tricks.cumulative(base)
    assert [v.name for v in variants] == ["baseline", "+label_smoothing", "+celu", "+ghost_bn", "+frozen_bn_scale",
                                          "+whitening", "+ema", "+tta"]
    assert len(changed_fields(base, variants[0].config)) == 7
    for before, after in zip(variants, variants[1:]):
        assert after.reference == before.name and len(changed_fields(before.config, after.config)) == 1
    assert variants[-1].config == base, "with every trick added back, the last step is the full recipe"


def test_optimizer_study_compares_every_optimizer_of_speedrun_by_default():
    s = optimizers.make_study(optimizers.build_parser().parse_args([]), speedrun.make_config())
    assert [v.tags["optimizer"] for v in s.variants] == list(speedrun.OPTIMIZERS)


def test_optimizer_study_uses_each_optimizer_at_its_lr():
    args = optimizers.build_parser().parse_args(["--optimizers", "nesterov,adam,adadelta", "--lr-for", "adadelta=100",
                                                 "--lr-multipliers", "0.5,1"])
    s = optimizers.make_study(args, speedrun.make_config())
    by_name = {v.name: v.config for v in s.variants}
    assert by_name["nesterov x1"].lr == 1.0 and by_name["nesterov x0.5"].lr == 0.5
    assert by_name["adam x1"].lr == pytest.approx(optimizers.ADAPTIVE_STEP_LR["adam"] * 512)
    assert by_name["adam x1"].bias_lr_scale == 1.0 and by_name["nesterov x1"].bias_lr_scale == 64.0
    assert by_name["adadelta x0.5"].lr == 50.0 and by_name["adadelta x1"].optimizer == "adadelta"
    assert all(v.reference in (None, "nesterov x1") for v in s.variants)


def test_shards_split_the_jobs_without_overlap():
    variants = tricks.leave_one_out(speedrun.make_config())[0][:5]
    jobs = study.job_list(variants, [3, 4, 5])
    assert [(v.name, s) for v, s in jobs[:6]] == [(v.name, 3) for v in variants] + [(variants[0].name, 4)], "seed-major"
    for n in (1, 2, 3, 4):
        shards = [study.shard_jobs(jobs, (i, n)) for i in range(1, n + 1)]
        keys = [(v.name, s) for part in shards for v, s in part]
        assert sorted(keys) == sorted((v.name, s) for v, s in jobs) and len(set(keys)) == len(jobs)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("script,argv,message", [
    (tricks, ["--shard", "3/2"], "need 1 <= i <= n"),
    (tricks, ["--shard", "half"], "expected i/n"),
    (tricks, ["--variants", "full,no_magic"], "unknown variant(s) no_magic; choose from full, no_whitening"),
    (tricks, ["--max-runs", "-1"], "--max-runs must be 0 or more"),
    (tricks, ["--out", "x.json"], "unrecognized arguments: --out"),
    (tricks, ["--subset", "100", "--batch-size", "128", "--ghost-bn-splits", "4"], "100 training images are fewer than one batch of 128"),
    (grid, ["--x", "colour=1,2"], "'colour' is not a field a grid can sweep"),
    (grid, ["--x", "lr=1,2", "--y", "lr=3"], "both sweep lr"),
    (grid, ["--x", "batch_size=ten"], "batch_size takes a whole number"),
    (grid, ["--x", "batch_size=100,512"], "variant 'batch_size=100 lr=0.5': batch_size 100 is not divisible"),
    (optimizers, ["--optimizers", "nesterov,lion"], "unknown lion"),
    (optimizers, ["--lr-for", "adam=fast"], "'fast' is not a number"),
])
def test_bad_input_is_a_clear_error(script, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--device", "cpu", "--study", str(tmp_path / "s"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists(), "nothing is written for a request that cannot run"


# -- the results file ----------------------------------------------------------------------------


def fake_row(variant, seed, acc, ttt=None):
    return dict(variant=variant, seed=seed, final_acc=acc, time_to_target_s=ttt, epochs_to_target=2 if ttt else None,
                timed_s=1.5 + seed, acc_by_epoch=[acc / 2, acc], seconds_by_epoch=[0.75, 1.5 + seed],
                device_name="CPU (test), with a comma", finished="2026-01-01T00:00:00", diverged_epoch=None)


def test_half_written_last_line_is_ignored_then_cut(tmp_path):
    results = study.ResultsFile(tmp_path / "results.csv")
    rows = [fake_row("full", 0, 0.5, 1.25), fake_row("no_tta", 0, 0.1 + 0.2)]
    for r in rows:
        results.append(r)
    assert results.read() == rows, "values round-trip exactly, None included"
    whole = results.path.read_bytes()
    with open(results.path, "ab") as f:
        f.write(b"full,1,0.4")  # a crash in mid-write
    notes = []
    assert results.read(log=notes.append) == rows and results.path.read_bytes().endswith(b"0.4")
    assert "half-written last line" in notes[0]
    assert results.read(repair=True, log=speedrun.silent) == rows and results.path.read_bytes() == whole
    results.append(fake_row("full", 1, 0.25))
    assert [r["seed"] for r in results.read()] == [0, 0, 1]


def test_damaged_or_foreign_csv_is_refused(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(study.StudyError, match="does not start with the header"):
        study.ResultsFile(path).read()
    path.write_text(",".join(study.CSV_COLUMNS) + "\nfull,zero,0.5,,,1,0.5,1,cpu,now,\n")
    with pytest.raises(study.StudyError, match="line 2 cannot be read"):
        study.ResultsFile(path).read()


def test_paired_difference_pairs_by_seed():
    ref = [fake_row("full", s, a) for s, a in ((0, 0.5), (1, 0.6), (2, 0.7))]
    rows = [fake_row("x", s, a) for s, a in ((2, 0.6), (0, 0.3), (5, 0.9))]  # seed 5 has no partner
    d = study.paired_difference(rows, ref, "final_acc")
    diffs = np.array([0.6 - 0.7, 0.3 - 0.5])
    half = speedrun.student_t_ppf(0.975, 1) * diffs.std(ddof=1) / math.sqrt(2)
    assert d["pairs"] == 2 and d["mean"] == pytest.approx(diffs.mean())
    assert d["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])


# -- end to end: a 2-variant x 2-seed study on the real data -----------------------------------


def test_study_writes_one_csv_line_per_run_and_progress_lines(full_study):
    folder, stdout = full_study
    rows = read_csv(folder)
    assert [(r["variant"], r["seed"]) for r in rows] == [("full", "0"), ("no_tta", "0"), ("full", "1"), ("no_tta", "1")]
    for r in rows:
        accs = [float(a) for a in r["acc_by_epoch"].split()]
        secs = [float(s) for s in r["seconds_by_epoch"].split()]
        assert len(accs) == len(secs) == 2 and float(r["final_acc"]) == accs[-1] and 0 < secs[0] < secs[1]
        assert float(r["timed_s"]) == pytest.approx(secs[-1])
        reached = [e + 1 for e, a in enumerate(accs) if a >= 0.15]
        assert r["epochs_to_target"] == (str(reached[0]) if reached else "")
        assert (r["time_to_target_s"] != "") == bool(reached)
    for k, r in enumerate(rows, 1):
        assert f"run {k} of 4: variant {r['variant']}, seed {r['seed']}:" in stdout
    assert stdout.count("ETA") == 4 and "elapsed" in stdout
    assert "| variant | change | runs |" in stdout, "the summary table is printed at the end"


def test_summary_matches_a_recomputation_from_the_csv(full_study):
    folder, _ = full_study
    rows = read_csv(folder)
    acc = {(r["variant"], int(r["seed"])): float(r["final_acc"]) for r in rows}
    t975 = speedrun.student_t_ppf(0.975, 1)
    summary = json.loads((folder / "summary.json").read_text())
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in (folder / "summary.md").read_text().splitlines() if line.startswith("| no_tta") or line.startswith("| full")}
    for v in summary["variants"]:
        values = np.array([acc[v["name"], 0], acc[v["name"], 1]])
        mean, std = values.mean(), values.std(ddof=1)
        half = t975 * std / math.sqrt(2)
        assert v["runs"] == 2 and v["acc_mean"] == pytest.approx(mean) and v["acc_std"] == pytest.approx(std)
        lo, hi = max(0.0, mean - half), min(1.0, mean + half)  # an accuracy interval stays within [0, 1]
        assert v["acc_ci95"] == pytest.approx([lo, hi])
        assert v["frac_at_target"] == pytest.approx((values >= 0.15).mean())
        cells = table[v["name"]]
        assert cells[3] == f"{100 * mean:.2f} ({100 * std:.2f})"
        assert cells[4] == f"{100 * lo:.2f} .. {100 * hi:.2f}"
        assert cells[5] == f"{100 * (values >= 0.15).mean():.0f}%"
    diffs = np.array([acc["no_tta", s] - acc["full", s] for s in (0, 1)])
    delta = summary["variants"][1]["delta_acc"]
    half = t975 * diffs.std(ddof=1) / math.sqrt(2)
    assert delta["pairs"] == 2 and delta["mean"] == pytest.approx(diffs.mean())
    if diffs.std() > 0:
        assert table["no_tta"][9] == f"{100 * diffs.mean():+.2f} ({100 * (diffs.mean() - half):.2f} .. {100 * (diffs.mean() + half):.2f})"
    assert table["full"][9] == "—", "the reference has no difference from itself"


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_study_draws_each_chart_as_a_png_file(full_study):
    folder, _ = full_study
    for name in ("accuracy.png", "time.png", "curves_epoch.png", "curves_seconds.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_without_matplotlib_tables_are_written_and_a_notice_says_how_to_get_plots(full_study, tmp_path, monkeypatch):
    folder, _ = full_study
    meta = study.read_meta(folder)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    lines = []
    study.write_reports(tmp_path, meta["definition"], study.ResultsFile(folder / "results.csv").read(), meta["sessions"],
                        log=lines.append)
    assert study.PLOT_NOTICE in lines and "pip install matplotlib" in study.PLOT_NOTICE
    assert (tmp_path / "summary.md").read_text() == (folder / "summary.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_resume_after_an_interruption_reruns_nothing(full_study, real_data_dir, tmp_path, capsys):
    folder = tmp_path / "resumed"
    argv = ["--data-dir", str(real_data_dir), *TINY, *PAIR, "--study", str(folder)]
    tricks.main([*argv, "--max-runs", "1"])
    first = read_csv(folder)
    assert len(first) == 1
    with open(folder / "results.csv", "a") as f:
        f.write("no_tta,0,0.12")  # and then a crash while the second run was being saved
    capsys.readouterr()
    tricks.main(argv)
    stdout = capsys.readouterr().out
    assert "4 runs, 1 already done, 3 to run now" in stdout and "half-written last line" in stdout
    rows = read_csv(folder)
    assert rows[0] == first[0], "the finished run was kept, not redone"
    assert [accuracy_fields(r) for r in rows] == [accuracy_fields(r) for r in read_csv(full_study[0])]
    tricks.main(argv)
    assert "0 to run now" in capsys.readouterr().out and read_csv(folder) == rows


def test_a_study_written_before_the_switch_tables_went_plain_resumes_with_nothing_to_rerun(full_study, real_data_dir,
                                                                                           tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(full_study[0], folder)
    meta = json.loads((folder / "study.json").read_text())
    for variant in meta["definition"]["variants"]:  # davidnet's tricks, in the fields of the time
        for name in ("lr_schedule_at_start", "whiten_bias_zero", "whiten_bias_own_lr", "dirac_init", "head_unit_std"):
            del variant["config"][name]
        variant["config"].update(FIELDS_WRITTEN_BEFORE["davidnet"])
    (folder / "study.json").write_text(json.dumps(meta))
    capsys.readouterr()
    tricks.main(["--data-dir", str(real_data_dir), *TINY, *PAIR, "--study", str(folder)])
    assert "0 to run now" in capsys.readouterr().out
    assert read_csv(folder) == read_csv(full_study[0])


def test_a_folder_of_another_study_is_refused(full_study, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(full_study[0], folder)
    with pytest.raises(SystemExit):
        tricks.main([*TINY, "--runs", "2", "--variants", "full,no_ema", "--study", str(folder)])
    assert "holds a different study" in capsys.readouterr().err
    assert read_csv(folder) == read_csv(full_study[0])


def test_two_shards_and_merge_give_the_rows_of_the_unsharded_study(full_study, real_data_dir, tmp_path, capsys):
    argv = ["--data-dir", str(real_data_dir), *TINY, *PAIR]
    tricks.main([*argv, "--shard", "1/2", "--quiet", "--study", str(tmp_path / "a")])
    out_b = run_script("tricks.py", *argv, "--shard", "2/2", "--workers", "2", "--study", str(tmp_path / "b"))
    assert "to run now on cpu, cpu" in out_b, "the second shard ran in two worker processes"
    shard_keys = [{(r["variant"], r["seed"]) for r in read_csv(tmp_path / s)} for s in "ab"]
    assert len(shard_keys[0]) == len(shard_keys[1]) == 2 and not shard_keys[0] & shard_keys[1]
    merged = tmp_path / "merged"
    merge.main([str(merged), str(tmp_path / "a"), str(tmp_path / "b")])
    assert "merged 4 runs from 2 folders" in capsys.readouterr().out
    expected = sorted(accuracy_fields(r) for r in read_csv(full_study[0]))
    assert sorted(accuracy_fields(r) for r in read_csv(merged)) == expected
    merge.main([str(merged), str(tmp_path / "b"), str(full_study[0])])  # every row is there already
    out = capsys.readouterr().out
    assert "merged 4 runs from 3 folders" in out and "; 6 repeated (variant, seed) rows counted once" in out
    assert sorted(accuracy_fields(r) for r in read_csv(merged)) == expected
    for mine, theirs in zip(json.loads((merged / "summary.json").read_text())["variants"],
                            json.loads((full_study[0] / "summary.json").read_text())["variants"]):
        assert (mine["acc_mean"], mine["acc_ci95"], mine.get("delta_acc")) == (theirs["acc_mean"], theirs["acc_ci95"], theirs.get("delta_acc"))


def test_merge_refuses_shards_of_different_studies(full_study, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    meta = study.read_meta(full_study[0])
    meta["definition"]["variants"] = meta["definition"]["variants"][:1]
    study.write_meta(other, meta["definition"], meta["sessions"])
    with pytest.raises(SystemExit):
        merge.main([str(tmp_path / "m"), str(full_study[0]), str(other)])
    assert "holds a different study" in capsys.readouterr().err


def test_grid_and_optimizer_studies_add_their_own_tables_and_charts_and_merge_keeps_them(real_data_dir, tmp_path, capsys):
    base = ["--data-dir", str(real_data_dir), *TINY, "--runs", "1", "--quiet"]
    grid.main([*base, "--x", "batch_size=32,64", "--y", "lr=1.0", "--study", str(tmp_path / "g")])
    text = (tmp_path / "g" / "summary.md").read_text()
    assert "mean accuracy %, rows lr, columns batch_size:" in text and "| lr \\ batch_size | 32 | 64 |" in text
    rows = {r["variant"]: float(r["final_acc"]) for r in read_csv(tmp_path / "g")}
    assert set(rows) == {"batch_size=32 lr=1.0", "batch_size=64 lr=1.0"}
    assert f"| 1.0 | {100 * rows['batch_size=32 lr=1.0']:.2f} | {100 * rows['batch_size=64 lr=1.0']:.2f} |" in text
    optimizers.main([*base, "--optimizers", "nesterov,adam", "--study", str(tmp_path / "o")])
    text = (tmp_path / "o" / "summary.md").read_text()
    assert {r["variant"] for r in read_csv(tmp_path / "o")} == {"nesterov", "adam"}
    assert "| adam | 0.128 | 0.002 |" in text, "best-LR table with lr and step lr"
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "g" / "heatmap_accuracy.png").exists() and (tmp_path / "g" / "heatmap_time.png").exists()
        assert (tmp_path / "o" / "curves_seconds.png").exists()
    merge.merge(tmp_path / "gm", [tmp_path / "g"], log=speedrun.silent)
    assert "| lr \\ batch_size | 32 | 64 |" in (tmp_path / "gm" / "summary.md").read_text()
    merge.merge(tmp_path / "om", [tmp_path / "o"], log=speedrun.silent)
    assert "| adam | 0.128 | 0.002 |" in (tmp_path / "om" / "summary.md").read_text()


# -- diverged runs, intervals, interrupts (issue 13) ---------------------------------------------


def diverged_row(variant, seed, epoch=2):
    return {**fake_row(variant, seed, 0.0), "final_acc": None, "acc_by_epoch": [0.1], "seconds_by_epoch": [0.75],
            "diverged_epoch": epoch}


def two_variant_definition():
    base = speedrun.make_config(device="cpu")
    variants = [study.make_variant(base, "full", "the full recipe"),
                study.make_variant(base, "high_lr", "lr 100", reference="full", lr=100.0),
                study.make_variant(base, "huge_lr", "lr 1e6", reference="full", lr=1e6)]
    return study.Study("tricks", "test", variants).definition()


def test_a_diverged_variant_is_reported_as_diverged_not_as_low_accuracy(tmp_path):
    rows = [fake_row("full", 0, 0.5), fake_row("full", 1, 0.6), fake_row("high_lr", 0, 0.4), diverged_row("high_lr", 1),
            diverged_row("huge_lr", 0, 1), diverged_row("huge_lr", 1, 1)]
    summary = study.write_reports(tmp_path, two_variant_definition(), rows, [], log=speedrun.silent)
    high, huge = summary["variants"][1], summary["variants"][2]
    assert (high["runs"], high["diverged"], high["acc_mean"], high["frac_at_target"]) == (2, 1, 0.4, 0.0)
    assert high["delta_acc"]["pairs"] == 1, "the diverged seed is not paired"
    assert huge["diverged"] == 2 and huge["acc_mean"] is None and huge["diverged_seeds"] == [0, 1]
    table = (tmp_path / "summary.md").read_text()
    assert "| high_lr | lr 100 | 2 (1 diverged) | 40.00 (—) |" in table
    assert "| huge_lr | lr 1e6 | 2 (2 diverged) | diverged (every run) |" in table
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_a_diverged_run_round_trips_through_the_csv_and_its_progress_line(tmp_path):
    result = dict(seed=3, diverged=True, diverged_epoch=2, final_acc=None, time_to_target_s=None, epochs_to_target=None,
                  whitening_s=0.1, train_s=0.5, epochs=[dict(tta_acc=0.1, train_s=0.3)])
    row = study.result_row("huge_lr", result, "cpu")
    results = study.ResultsFile(tmp_path / "results.csv")
    results.append(row)
    assert results.read() == [row] and row["final_acc"] is None and row["diverged_epoch"] == 2
    assert "seed 3: DIVERGED in epoch 2" in study._run_line(1, 2, row, 0.94, 0.0)


def test_epochs_left_unevaluated_by_eval_every_round_trip_and_are_left_out_of_the_curves(tmp_path):
    result = dict(seed=0, diverged=False, final_acc=0.93, time_to_target_s=None, epochs_to_target=None, whitening_s=0.1,
                  train_s=3.0, epochs=[dict(tta_acc=None, train_s=1.0), dict(tta_acc=None, train_s=2.0),
                                       dict(tta_acc=0.93, train_s=3.0)])
    row = study.result_row("full", result, "cpu")
    results = study.ResultsFile(tmp_path / "results.csv")
    results.append(row)
    assert results.read() == [row] and row["acc_by_epoch"] == [None, None, 0.93]
    other = dict(row, seed=1, acc_by_epoch=[0.5, None, 0.91])
    assert study.mean_curves([row, other]) == dict(epoch=[3], acc=[pytest.approx(0.92)], seconds=[3.0])


def test_accuracy_and_time_intervals_never_go_below_zero():
    rows = [fake_row("x", s, a, t) for s, (a, t) in enumerate([(0.0, 0.1), (0.01, 0.1), (0.3, 9.0)])]
    stats = study.variant_stats(rows, None, 0.005)
    assert stats["acc_ci95"][0] == 0.0 and stats["acc_ci95"][1] > 0.1
    assert stats["time_to_target_ci95"][0] == 0.0


def test_interrupt_names_the_folder_and_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    def execute(jobs, devices, on_row, **kwargs):
        on_row(fake_row(jobs[0][0].name, jobs[0][1], 0.5))
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "execute", execute)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        tricks.main([*TINY, *PAIR])  # no --study: a new timestamped folder under studies/
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip()
    folder = err.split("saved in ")[1].split(";")[0]
    assert folder.startswith("studies/tricks-") and len(err.splitlines()) == 1
    assert err.endswith(f"resume with: python ablations/tricks.py {' '.join(TINY)} {' '.join(PAIR)} --study {folder}")
    assert len(read_csv(tmp_path / folder)) == 1


def test_a_study_shows_the_in_run_progress_lines_of_a_single_run_but_not_its_epoch_rows(real_data_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(speedrun.Progress.__init__, "__defaults__", (0.0,))  # a line every step, not every 30 s
    assert tricks.main(["--data-dir", str(real_data_dir), *TINY, "--runs", "1", "--variants", "full",
                        "--study", str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [k for k, line in enumerate(lines) if re.match(r"  step \d+ of 8: [\d,]+ images/s, training ends in", line)]
    finished = next(k for k, line in enumerate(lines) if line.startswith("run 1 of 1: variant full"))
    assert len(progress) >= 6 and max(progress) < finished  # every step after each epoch's first, before the verdict
    assert not any(line.lstrip().startswith("epoch  train loss") for line in lines)
    capsys.readouterr()
    assert tricks.main(["--data-dir", str(real_data_dir), *TINY, "--runs", "1", "--variants", "full", "--quiet",
                        "--study", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().out == ""


def test_a_study_passes_on_the_progress_lines_of_runs_in_worker_processes_too():
    said = []
    log = study.in_run_progress(said.append)
    for line in ["  step 3 of 8: 250 images/s, training ends in about 2 s", "epoch  train loss\n    1      2.1",
                 "  [seed 4, worker 2] step 3 of 8: 250 images/s, training ends in about 2 s", "loading CIFAR-10"]:
        log(line)
    assert said == ["  step 3 of 8: 250 images/s, training ends in about 2 s",
                    "  [seed 4, worker 2] step 3 of 8: 250 images/s, training ends in about 2 s"]
    assert study.in_run_progress(speedrun.silent) is speedrun.silent  # run_jobs's workers then keep no log either


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (optional) is not installed")
def test_study_charts_cut_time_intervals_at_zero_omit_empty_panels_and_name_their_scale(tmp_path, monkeypatch):
    import speedrun_tools
    drawn = {}
    monkeypatch.setattr(speedrun_tools, "save_chart", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    base = speedrun.make_config("cpu", subset=2000, epochs=3)
    the_study = tricks.make_study(tricks.build_parser().parse_args(["--variants", "full,no_tta"]), base)
    rows = [dict(fake_row(v, s, acc), timed_s=t) for s, (v, acc, t) in
            enumerate([("full", 0.6, 1.0), ("no_tta", 0.55, 1.0), ("full", 0.62, 40.0), ("no_tta", 0.58, 60.0)])]
    rows = [dict(r, seed=k // 2) for k, r in enumerate(rows)]  # two seeds, each variant at both: pairs
    sessions = [dict(argv=["ablations/tricks.py", "--preset", "cpu"], environment=dict(torch="2.13.0+cpu"))]
    summary = study.build_summary(the_study.definition(), rows, sessions)
    assert min(summary["variants"][0]["timed_ci95"]) == 0.0  # 2 runs far apart: the t-interval is cut at 0
    study.draw_charts(tmp_path, summary, speedrun_tools.pyplot())
    time_fig, acc_fig = drawn["time.png"], drawn["accuracy.png"]
    (budget,) = time_fig.axes  # nothing reached 94%: no time-to-target panel, and the title says so
    assert "no variant reached 94%" in " ".join(time_fig._suptitle.get_text().split())
    lows = [seg[0][0] for c in budget.collections for seg in c.get_segments()]
    assert lows and min(lows) >= 0.0, "an interval of a time goes below 0 s"
    means, deltas = acc_fig.axes
    assert any(list(line.get_xdata()) == [0, 0] for line in deltas.get_lines()), "the forest plot has no zero line"
    assert not means.patches, "accuracy is drawn as points with intervals, not bars from a cut axis"
    for fig in drawn.values():
        title = " ".join((fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title()).split())
        assert all(w in title for w in ("preset cpu", "2,000 training / 2,000 test images", "3 epochs", "2 seeds",
                                        "CPU (test), with a comma")), title

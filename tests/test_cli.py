"""Command line: flags, presets, errors, the JSON result and saved weights."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
import speedrun


def parse(*argv):
    return speedrun.config_from_args(speedrun.build_parser().parse_args(list(argv)))


def test_help_explains_every_config_field():
    text = speedrun.build_parser().format_help()
    for f in dataclasses.fields(speedrun.Config):
        assert "--" + f.name.replace("_", "-") in text
    for flag in ("--preset", "--out", "--save", "--data-url"):
        assert flag in text
    assert "time_to_target_s" in text, "the timing rule is part of --help"


@pytest.mark.parametrize("preset", list(speedrun.PRESETS))
def test_show_config_prints_the_resolved_recipe_by_area_and_its_steps_then_exits(preset, capsys, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert speedrun.main(["--preset", preset, "--show-config", "--seed", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    cfg = speedrun.make_config(preset, seed=7)
    values = {}
    for line in out:
        if line.startswith("  "):
            name, *rest = line.split()
            values[name] = rest[1] if rest[0] == "*" else rest[0]
    assert list(values) == [f.name for f in dataclasses.fields(speedrun.Config)]
    for f in dataclasses.fields(speedrun.Config):
        value = getattr(cfg, f.name)
        shown = values[f.name].strip("'")
        assert (float(shown) == pytest.approx(value, rel=1e-5)) if isinstance(value, float) else shown == str(value)
        marked = any(line.split()[:2] == [f.name, "*"] for line in out)
        assert marked == (value != getattr(speedrun.Config(), f.name)), f.name
    assert [line for line in out if not line.startswith(" ")][1:-1] == list(speedrun.AREAS.values())
    n = speedrun.image_counts(cfg)[0] // cfg.batch_size
    assert out[-1].startswith(f"steps: {n} batches of {cfg.batch_size}")
    assert f"{speedrun.epochs_to_steps(cfg.epochs, n)} in all" in out[-1]
    assert not list(tmp_path.iterdir()), "nothing is trained or written"


def test_defaults_are_the_davidnet_preset():
    assert parse() == speedrun.make_config("davidnet") == speedrun.Config()


def test_flags_override_the_preset():
    cfg = parse("--preset", "cpu", "--no-ema", "--ghost-bn-splits", "1", "--epochs", "3",
                "--no-whiten", "--lr", "0.5", "--flip", "alternating", "--celu-alpha", "0.5")
    assert (cfg.ema, cfg.ghost_bn_splits, cfg.epochs, cfg.whiten, cfg.lr, cfg.flip, cfg.celu_alpha) == \
           (False, 1, 3, False, 0.5, "alternating", 0.5)
    assert cfg.width == speedrun.PRESETS["cpu"]["width"]


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "0"], "lr must be positive"),
    (["--lr", "-0.1"], "lr must be positive"),
    (["--momentum", "1"], r"momentum must be in \[0, 1\)"),
    (["--ema-momentum", "-0.5"], r"ema_momentum must be in \[0, 1\)"),
    (["--width", "0"], "width must be positive"),
    (["--weight-decay", "-1"], "weight_decay must be 0 or more"),
    (["--bn-momentum", "2"], "bn_momentum must be in"),
    (["--preset", "fastest"], "unknown preset 'fastest'; choose one of davidnet"),
    (["--flip", "sideways"], "flip='sideways' is not one of"),
    (["--batch-size", "500"], "not divisible by ghost_bn_splits"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--preset", "airbench94", "--ema-warmup"], "ema_warmup shapes the average's first blends; ema_mode lookahead"),
    (["--resolution-schedule", "24,x"], "resolution_schedule '24,x': give sides from 9 to 32"),
    (["--resolution-schedule", "24,,28"], "resolution_schedule '24,,28': give sides from 9 to 32"),
    (["--resolution-schedule", "8"], "resolution_schedule '8': give sides from 9 to 32"),
    (["--lr-floor", "1.5"], r"lr_floor must be in \[0, 1\]"),
    (["--whiten-kernel", "9"], "whiten_kernel must be from 1 to 7 pixels"),
    (["--ema-start-epochs", "2"], "ema_start_epochs applies to --ema-mode late_lookahead only"),
])
def test_bad_input_is_a_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "speedrun.py"), *argv], capture_output=True, text=True, cwd=ROOT)


def test_cli_error_exits_2_with_message():
    proc = run_cli("--lr-schedule", "cosine")
    assert proc.returncode == 2 and "error: lr_schedule='cosine' is not one of" in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--preset", "fastest"], "unknown preset 'fastest'; choose one of davidnet"),
    (["--batch-size", "ten"], "argument --batch-size: batch_size takes a whole number, not 'ten'"),
    (["--epochs", "ten"], "argument --epochs: epochs takes a number, not 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--set", "ema=false"], "unrecognized arguments: --set ema=false (see --help)"),
])
def test_bad_flags_are_one_line_errors_not_the_usage(argv, message):
    proc = run_cli(*argv)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_help_gives_examples_the_presets_settings_and_the_data_source():
    text = speedrun.build_parser().format_help()
    assert "python speedrun.py --preset cpu" in text and "torchrun --nproc_per_node" in text
    presets = text[text.index("presets (each sets"):]
    for name, fields in speedrun.PRESETS.items():
        assert f"\n  {name} " in presets
        for key in fields:
            assert f"{key}=" in presets, f"preset {name}: {key} is not listed"
    assert "$CIFAR10_HOME" in text and speedrun.CIFAR10_URL in text and "--data-url" in text


def test_a_full_size_cpu_run_first_points_to_the_cpu_preset(monkeypatch):
    said = []

    class Started(Exception):
        pass

    def start(*args, **kwargs):
        raise Started

    monkeypatch.setattr(speedrun, "run_jobs", start)  # the runs (and the data loading) start here
    with pytest.raises(Started):
        speedrun.run_many(speedrun.make_config(device="cpu"), log=said.append)
    text = "\n".join(said)
    assert "tens of minutes to hours" in text and "python speedrun.py --preset cpu" in text and "10 epochs on all 50,000" in text


TINY = ["--subset", "256", "--test-subset", "200", "--width", "0.125", "--epochs", "2", "--batch-size", "64",
        "--ghost-bn-splits", "4", "--whiten-samples", "128", "--device", "cpu", "--runs", "2", "--eval-batch-size", "100"]


def test_json_result_has_every_field_and_saved_weights_reproduce_the_accuracy(real_data_dir, tmp_path):
    out, weights = tmp_path / "r.json", tmp_path / "w.pt"
    proc = run_cli("--data-dir", str(real_data_dir), *TINY, "--out", str(out), "--save", str(weights))
    assert proc.returncode == 0, proc.stderr
    assert "eval acc" in proc.stdout and "2 runs: TTA accuracy mean" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result) == {"preset", "config", "environment", "data_load_s", "warmup_s", "runs", "summary", "complete"}
    assert result["complete"] is True and result["preset"] == "davidnet"
    assert result["config"]["width"] == 0.125 and result["config"]["runs"] == 2
    assert {"device_name", "torch"} <= set(result["environment"])
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    run = result["runs"][1]
    assert {"epochs", "final_acc", "time_to_target_s", "epochs_to_target", "per_class_acc", "confusion_matrix",
            "macro_precision", "macro_recall", "macro_f1", "whitening_s"} <= set(run)
    assert [e["epoch"] for e in run["epochs"]] == [1, 2]
    assert {"train_loss", "train_acc", "test_acc", "tta_acc", "train_s"} <= set(run["epochs"][0])
    assert sum(map(sum, run["confusion_matrix"])) == 200
    s = result["summary"]
    assert s["runs"] == 2 and s["acc_mean"] == pytest.approx(sum(r["final_acc"] for r in result["runs"]) / 2)
    assert {"acc_std", "acc_min", "acc_max", "frac_at_target", "time_to_target_mean_s", "time_to_target_std_s", "p_value"} <= set(s)
    # The saved weights are the evaluated model of the last run: they reproduce its accuracy, and their
    # config names that run (its seed, one run), not the command's first seed.
    model, saved = speedrun.load_checkpoint(weights)
    assert (saved.seed, saved.runs) == (run["seed"], 1) == (1, 1)
    cfg = speedrun.make_config(**result["config"])
    x, y = speedrun.load_cifar10(real_data_dir)[2:]
    test_x = speedrun.to_device(x[:200], "cpu", torch.float32)
    logits = speedrun.predict(model, test_x, cfg, torch.device("cpu"), torch.float32)
    acc = (logits.argmax(1) == torch.from_numpy(y[:200])).float().mean().item()
    assert acc == pytest.approx(run["final_acc"])
    # Results are never overwritten.
    again = run_cli("--data-dir", str(real_data_dir), *TINY, "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads(out.read_text()) == result


def test_default_out_paths_are_reserved_so_runs_started_in_the_same_second_never_share_one(tmp_path, monkeypatch):
    monkeypatch.setattr(speedrun, "timestamp", lambda: "20260101-120000")
    a = speedrun.default_out_path(tmp_path)
    b = speedrun.default_out_path(tmp_path)
    assert a != b and a.exists() and b.exists(), "each path is created when it is chosen"
    speedrun.release_outputs()
    assert list(tmp_path.iterdir()) == [], "an output never written is removed when the command ends"


def test_each_switch_accepts_exactly_its_tables_choices_and_help_lists_them(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no choice is cut at a hyphen
    text = " ".join(speedrun.build_parser().format_help().split())
    for name, table in speedrun.SWITCHES.items():
        for choice in table:
            assert getattr(speedrun.make_config(**{name: choice}), name) == choice
        with pytest.raises(ValueError, match=f"{name}='nonesuch' is not one of"):
            speedrun.make_config(**{name: "nonesuch"})
        assert "one of " + " | ".join(map(str, table)) in text, name


def test_a_new_output_path_never_names_an_existing_file_or_folder_and_existing_ones_are_refused(tmp_path):
    (tmp_path / "study").mkdir()
    assert speedrun.reserve(tmp_path / "study", "--study", folder=True, numbered=True) == tmp_path / "study-1"
    (tmp_path / "run.prof").write_text("keep")
    assert speedrun.reserve(tmp_path / "run.prof", "--prof", numbered=True) == tmp_path / "run-1.prof"
    with pytest.raises(ValueError, match="--prof .* already exists"):
        speedrun.reserve(tmp_path / "run.prof", "--prof")
    assert (tmp_path / "run.prof").read_text() == "keep"
    speedrun.release_outputs()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.prof", "study"]

"""The bad-day guarantees of every tool (issue 23): outputs reserved and checked before the work,
never overwritten, nothing foreign touched, our own leftovers swept, one-line errors with the right
exit status, and a torchrun job whose processes disagree stopped before training. Each test holds
one line of docs/guarantees.md. Full disks and read-only folders are simulated (CI runs as root,
without mounts)."""
import errno
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, ledger_stop, random_device_data, tiny_config
import speedrun
from ablations import merge, study, tricks

sys.path.insert(0, str(ROOT / "bench"))
import evaluate  # noqa: E402

TINY = ["--device", "cpu", "--subset", "128", "--test-subset", "64", "--width", "0.125", "--epochs", "1",
        "--batch-size", "32", "--ghost-bn-splits", "4", "--whiten-samples", "64", "--eval-batch-size", "64"]
STUDY = [*TINY, "--runs", "1", "--variants", "full,no_tta"]


def load_profile_script(name):
    spec = importlib.util.spec_from_file_location(f"bad_day_{name}", ROOT / "profile" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.append(str(ROOT / "profile"))
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fresh_reservations():
    yield
    speedrun.release_outputs()


@pytest.fixture
def fake_training(monkeypatch):
    """speedrun.train replaced by a seconds-long real model with a fixed result; no data read."""
    monkeypatch.setattr(speedrun, "load_data", lambda *a, **k: random_device_data())

    def train(cfg, data=None, log=print, seed=None):
        run = dict(seed=seed, epochs=[dict(epoch=1, train_loss=2.0, train_acc=0.1, test_acc=0.1, tta_acc=0.1,
                                           train_s=1.0, eval_s=0.1)], final_acc=0.5, time_to_target_s=None,
                   epochs_to_target=None, whitening_s=0.1, train_s=1.0, full_budget_s=1.2)
        return dict(run, model=speedrun.build_model(cfg))

    monkeypatch.setattr(speedrun, "train", train)


def full_disk_for(folder):
    """torch.save as on a full disk inside `folder`: RuntimeError (ENOSPC), as torch raises it."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).startswith(str(folder)):
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0: "
                               "No space left on device")
        return real(obj, f, *args, **kwargs)
    return save


def aged(path, seconds=2 * speedrun.STALE_S):
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


# -- 2. outputs are reserved when checked; the final write never replaces another's file ------------

def test_out_and_save_naming_one_file_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speedrun, "load_cifar10", lambda *a, **k: pytest.fail("data read before the output check"))
    with pytest.raises(SystemExit) as stop:
        speedrun.main([*TINY, "--out", str(tmp_path / "x"), "--save", str(tmp_path / "x")])
    assert stop.value.code == 2 and "--save" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"


def test_a_reserved_output_is_on_disk_so_another_process_cannot_take_it(tmp_path):
    speedrun.reserve(tmp_path / "r.json", "--out")
    other = subprocess.run([sys.executable, "-c", f"import speedrun; speedrun.reserve({str(tmp_path / 'r.json')!r}, '--out')"],
                           capture_output=True, text=True, cwd=ROOT)
    assert other.returncode != 0 and "--out" in other.stderr and "already exists" in other.stderr


def test_a_file_another_process_puts_at_the_output_meanwhile_is_never_replaced(tmp_path, monkeypatch, fake_training,
                                                                                 capsys):
    out = tmp_path / "r.json"
    real_run_many = speedrun.run_many

    def run_many_while_another_writes(*args, **kwargs):
        result = real_run_many(*args, **kwargs)
        out.unlink()
        out.write_text("another process's result")
        return result

    monkeypatch.setattr(speedrun, "run_many", run_many_while_another_writes)
    assert speedrun.main([*TINY, "--out", str(out)]) == 0
    assert out.read_text() == "another process's result"
    fallback = capsys.readouterr().err.split("wrote it to ")[1].split(" instead")[0]
    assert json.loads(open(fallback).read())["runs"][0]["seed"] == 0
    os.unlink(fallback)


# -- 3. a study writes only into a study folder or a new one ---------------------------------------

@pytest.mark.parametrize("where", ["folder", "file", "cwd"])
def test_a_study_refuses_an_existing_folder_or_file_that_is_not_a_study(tmp_path, monkeypatch, capsys, where):
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.chdir(tmp_path)
    target = {"folder": tmp_path / "mine", "file": tmp_path / "notes.txt", "cwd": "."}[where]
    if where == "folder":
        target.mkdir()
        (target / "summary.md").write_text("my own notes")
    elif where == "file":
        target.write_text("my own notes")
    with pytest.raises(SystemExit) as stop:
        tricks.main([*STUDY, "--study", str(target)])
    assert stop.value.code == 2 and "is not a study folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == {"folder": ["mine", "summary.md"], "file": ["notes.txt"],
                                                           "cwd": []}[where]


def test_merge_refuses_an_output_folder_that_is_not_a_study(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.json").write_text("{}")
    (tmp_path / "shard").mkdir()
    study.write_meta(tmp_path / "shard", dict(kind="tricks", variants=[]), [])
    with pytest.raises(SystemExit) as stop:
        merge.main([str(tmp_path / "mine"), str(tmp_path / "shard")])
    assert stop.value.code == 2 and "is not a study folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "summary.json").read_text() == "{}"


# -- 4. the ledger refuses a results folder that is missing or holds no result: tests/test_ledger.py ----


# -- 5. a full disk at the end: the weights go to a fallback, and never exit 1 with a traceback -----

def test_a_full_disk_on_save_writes_the_weights_elsewhere_and_says_where(tmp_path, monkeypatch, fake_training, capsys):
    monkeypatch.setattr(torch, "save", full_disk_for(tmp_path))
    out, weights = tmp_path / "r.json", tmp_path / "w.pt"
    assert speedrun.main([*TINY, "--out", str(out), "--save", str(weights)]) == 0
    captured = capsys.readouterr()
    fallback = captured.err.split("wrote it to ")[1].split(" instead")[0]
    assert f"could not write --save {weights} (" in captured.err and "No space left on device" in captured.err
    assert f"results written to {out}, weights to {fallback}" in captured.out
    assert speedrun.load_checkpoint(fallback)[0](torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert not weights.exists() and [p.name for p in tmp_path.iterdir()] == ["r.json"], "no placeholder, no .part"
    os.unlink(fallback)


def test_a_full_disk_everywhere_is_one_line_and_exit_status_2_not_1(tmp_path, monkeypatch, fake_training, capsys):
    monkeypatch.setattr(torch, "save", full_disk_for("/"))
    assert speedrun.main([*TINY, "--out", str(tmp_path / "r.json"), "--save", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err
    assert "error: could not write --save" in err and "Traceback" not in err
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["final_acc"] == 0.5, "the result is kept"


# -- 6. a torchrun job whose processes were started with different numerics stops before training --

def test_torchrun_processes_with_different_configs_stop_naming_the_fields(tmp_path):
    script = tmp_path / "rank_flags.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import speedrun\n"
        "rank = os.environ['RANK']\n"
        "sys.exit(speedrun.main(['--device', 'cpu', '--ghost-bn-splits', '2', '--seed', rank, '--lr', str(1 + 3 * int(rank)),\n"
        f"                        '--data-dir', {str(tmp_path)!r} + '/no-data-' + rank, '--out', {str(tmp_path / 'r.json')!r}]))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "error: the processes' configs differ in lr, seed;" in proc.stderr, proc.stderr[-2000:]
    assert "data_dir" not in proc.stderr.split("differ in")[1].splitlines()[0], "a machine's own folder may differ"
    assert not (tmp_path / "r.json").exists()


def test_every_numerics_field_must_agree_but_the_machines_own_need_not():
    fields = {f.name for f in speedrun.dataclasses.fields(speedrun.Config)}
    assert set(speedrun.MACHINE_FIELDS) == {"device", "data_dir", "workers"} and set(speedrun.MACHINE_FIELDS) < fields


# -- 7. bounds are checked first, with a message; --help says them ----------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--runs", "1" + "0" * 30, "runs must be at most 100,000"), ("--runs", "1000000000", "runs must be at most 100,000"),
    ("--epochs", "1e9", "epochs must be at most 1,000"), ("--epochs", "1e30", "epochs must be at most 1,000"),
    ("--subset", "60000", "subset must be at most 50,000"), ("--test-subset", "10001", "test_subset must be at most 10,000"),
])
def test_counts_beyond_their_bounds_are_refused_at_once(flag, value, message, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        speedrun.main(["--device", "cpu", flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err and time.perf_counter() - t0 < 5


def test_help_states_the_bounds_of_runs_and_epochs():
    text = " ".join(speedrun.build_parser().format_help().split())
    assert "independent runs (at most 100,000)" in text and "training epochs (at most 1,000)" in text


# -- 8. every tool checks its outputs before the work ---------------------------------------------

def test_every_tool_refuses_an_unwritable_output_before_the_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "out")
    monkeypatch.setattr(speedrun, "load_cifar10", lambda *a, **k: pytest.fail("data read before the output check"))
    monkeypatch.setattr(speedrun, "load_data", lambda *a, **k: pytest.fail("data read before the output check"))
    weights = tmp_path / "w.pt"
    speedrun.save_weights(speedrun.build_model(tiny_config()), tiny_config(), weights)
    cprofile_run, data_pipeline = load_profile_script("cprofile_run"), load_profile_script("data_pipeline")
    for main, argv, flag in ((evaluate.main, [str(weights), "--out", bad], "--out"),
                             (cprofile_run.main, [*TINY, "--prof", bad], "--prof"),
                             (cprofile_run.main, [*TINY, "--out", bad], "--out"),
                             (cprofile_run.main, [*TINY, "--save", bad], "--save"),
                             (data_pipeline.main, [*TINY, "--json", bad], "--json")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and f"{flag} {bad}: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


# -- 10. unusable inputs of the tools are one-line errors, not tracebacks ---------------------------

def test_evaluate_says_in_one_line_that_a_file_is_not_usable_weights(tmp_path, monkeypatch, capsys):
    from helpers import fake_arrays
    monkeypatch.setattr(speedrun, "load_cifar10", lambda *a, **k: fake_arrays())
    good = tmp_path / "good.pt"
    speedrun.save_weights(speedrun.build_model(tiny_config()), tiny_config(), good)
    blob = torch.load(good, weights_only=True)
    files = {"truncated.pt": good.read_bytes()[:500], "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(blob["state_dict"], tmp_path / "other_tool.pt")
    torch.save({**blob, "config": {**blob["config"], "nonesuch": 1}}, tmp_path / "unknown_field.pt")
    torch.save({**blob, "config": {**blob["config"], "width": 0.25}}, tmp_path / "shapes.pt")
    for name in ("truncated.pt", "empty.pt", "other_tool.pt", "unknown_field.pt", "shapes.pt"):
        with pytest.raises(SystemExit) as stop:
            evaluate.main([str(tmp_path / name), "--device", "cpu"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"{tmp_path / name} is not usable weights of speedrun.py --save" in err, name
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("damage", ["a list", "unknown field", "null accuracy"])
def test_ledger_names_a_result_that_is_not_the_trainers(tmp_path, capsys, damage):
    results = tmp_path / "results"
    results.mkdir()
    cfg = speedrun.dataclasses.asdict(speedrun.make_config("airbench94"))
    good = dict(preset="airbench94", config=cfg, environment=dict(device="cpu", device_name="CPU", torch="2"),
                runs=[dict(seed=0, final_acc=0.94, whitening_s=0.1, train_s=1, full_budget_s=1, time_to_target_s=1,
                           epochs=[dict(eval_s=0.1)])])
    bad = {"a list": [good], "unknown field": {**good, "config": {**cfg, "nonesuch": 1}},
           "null accuracy": {**good, "runs": [{**good["runs"][0], "final_acc": None}]}}[damage]
    (results / "bad.json").write_text(json.dumps(bad))
    err = ledger_stop(results, "accuracy", tmp_path, capsys)
    assert f"{results / 'bad.json'}: not a result speedrun.py writes" in err
    assert len(err.strip().splitlines()) == 1


def test_a_damaged_study_json_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("a run started"))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps(dict(definition={}, sessions="not a list")))
    with pytest.raises(SystemExit) as stop:
        tricks.main([*STUDY, "--study", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "study.json is damaged" in err and len(err.strip().splitlines()) == 1


def test_a_study_folder_that_fills_up_while_reports_are_written_is_one_line_with_the_resume_command(tmp_path, monkeypatch,
                                                                                                   capsys):
    def execute(jobs, devices, on_row, **kwargs):
        for variant, seed in jobs:
            on_row(dict(variant=variant.name, seed=seed, final_acc=0.5, time_to_target_s=None, epochs_to_target=None,
                        timed_s=1.0, acc_by_epoch=[0.5], seconds_by_epoch=[1.0], device_name="CPU",
                        finished="2026-01-01T00:00:00", diverged_epoch=None))

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(study, "execute", execute)
    real_write_atomic = speedrun.write_atomic
    monkeypatch.setattr(speedrun, "write_atomic",
                        lambda path, write: (full if path.name == "summary.md" else real_write_atomic)(path, write))
    with pytest.raises(SystemExit) as stop:
        tricks.main([*STUDY, "--study", str(tmp_path / "s"), "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "No space left on device" in err and "resume with:" in err
    assert len(err.strip().splitlines()) == 1 and len((tmp_path / "s" / "results.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("where", ["read-only", "under a file"])
def test_merge_into_a_folder_it_cannot_write_is_one_line(tmp_path, monkeypatch, capsys, where):
    shard = tmp_path / "shard"
    shard.mkdir()
    study.write_meta(shard, dict(kind="tricks", variants=[]), [])
    if where == "read-only":
        def refuse(path, write):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(speedrun, "write_atomic", refuse)  # as root, chmod would not stop the write
        out = tmp_path / "merged"
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "merged"
    with pytest.raises(SystemExit) as stop:
        merge.main([str(out), str(shard)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


# -- 11. a killed write's temporary is removed by the next run of any tool in that folder -----------

def test_the_next_run_in_a_folder_removes_our_stale_temporaries_there_and_nothing_else(tmp_path, fake_training, capsys):
    ours = tmp_path / ".speedrun-12345-ab3d_9xz.part"
    ours.write_bytes(b"\0" * 100)
    aged(ours)
    fresh = tmp_path / ".speedrun-12346-zzzzzzzz.part"  # a run writing now
    fresh.write_bytes(b"")
    theirs = tmp_path / ".thesis.docx.part"
    theirs.write_text("someone else's")
    aged(theirs)
    assert speedrun.main([*TINY, "--out", str(tmp_path / "r.json")]) == 0
    assert not ours.exists() and fresh.exists() and theirs.read_text() == "someone else's"
    assert f"removed {ours}" in capsys.readouterr().err
    (tmp_path / "s").mkdir()  # a study folder resumed: the same sweep inside it
    study.write_meta(tmp_path / "s", dict(kind="tricks", variants=[]), [])
    stale = tmp_path / "s" / ".speedrun-999-qwertyui.part"
    stale.write_bytes(b"")
    aged(stale)
    study.open_folder(tmp_path / "s", "--study")
    assert not stale.exists()

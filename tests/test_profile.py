"""profile/: each script end to end on a tiny CPU run, plus the FLOP counts against hand calculations."""
import dataclasses
import importlib.util
import json
import os
import pstats
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from helpers import ROOT, config_written_before, tiny_config
import speedrun

PROFILE_DIR = ROOT / "profile"
TINY = ["--device", "cpu", "--subset", "256", "--test-subset", "128", "--width", "0.125", "--epochs", "1",
        "--batch-size", "64", "--ghost-bn-splits", "4", "--whiten-samples", "128", "--eval-batch-size", "64"]


def load_script(name):
    """A profile/ script imported as a module (the folder is not a package, on purpose)."""
    if str(PROFILE_DIR) not in sys.path:
        sys.path.append(str(PROFILE_DIR))
    spec = importlib.util.spec_from_file_location(f"profile_script_{name}", PROFILE_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *argv, cwd):
    """Runs `python profile/NAME.py ARGV` from cwd, one torch thread (the test machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(PROFILE_DIR / f"{name}.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_profile_folder_does_not_shadow_the_stdlib_profile_module():
    assert not (PROFILE_DIR / "__init__.py").exists()
    proc = subprocess.run([sys.executable, "-c", "import cProfile, profile; print(profile.__file__)"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip().startswith(str(PROFILE_DIR)), proc.stdout + proc.stderr


# -- cprofile_run.py ----------------------------------------------------------------------------


def test_cprofile_run_writes_a_loadable_profile_with_the_training_function(real_data_dir, tmp_path):
    prof = tmp_path / "run.prof"
    out = run_script("cprofile_run", *TINY, "--data-dir", str(real_data_dir), "--prof", str(prof), "--top", "8",
                     "--quiet", cwd=tmp_path)
    stats = pstats.Stats(str(prof))
    train = [(key, value) for key, value in stats.stats.items()
             if key[2] == "train" and key[0].endswith("speedrun.py")]
    assert len(train) == 1, "speedrun.train is in the profile"
    (_, (_, calls, _, cumulative, _)), = train
    assert calls == 1 and 0 < cumulative <= stats.total_tt * 1.01
    for heading in ("by cumulative time", "by own time", "this repository's functions"):
        assert heading in out
    own_rows = [line for line in out.splitlines() if line.startswith(">>")]
    assert own_rows and all("speedrun.py" in line or "profile/" in line for line in own_rows)
    assert any(line.rstrip().endswith(" train") for line in own_rows)
    assert f"snakeviz {prof}" in out


def test_cprofile_function_names_are_short_and_mark_the_project():
    cprofile_run = load_script("cprofile_run")
    assert cprofile_run.function_name((str(ROOT / "speedrun.py"), 10, "train")) == "speedrun.py:10 train"
    assert cprofile_run.function_name(("~", 0, "<built-in method torch.conv2d>")) == "<built-in> torch.conv2d"
    lib = "/usr/lib/python3/site-packages/torch/nn/modules/conv.py"
    assert cprofile_run.function_name((lib, 5, "forward")) == "torch/nn/modules/conv.py:5 forward"
    assert cprofile_run.is_project(str(ROOT / "speedrun.py")) and not cprofile_run.is_project(lib)


# -- torch_trace.py -----------------------------------------------------------------------------


def test_torch_trace_writes_traces_and_a_breakdown_that_adds_up(real_data_dir, tmp_path):
    torch_trace = load_script("torch_trace")
    trace_dir = tmp_path / "trace"
    out = run_script("torch_trace", *TINY, "--data-dir", str(real_data_dir), "--trace-steps", "2", "--trace-warmup", "1",
                     "--trace-dir", str(trace_dir), cwd=tmp_path)
    events = json.loads((trace_dir / "trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {torch_trace.WINDOW, "speedrun: augmentation", "speedrun: evaluation", "aten::conv2d"} <= names
    board, = (trace_dir / "tensorboard" / "speedrun").glob("*.pt.trace.json")
    assert json.loads(board.read_text())["traceEvents"]

    record = json.loads((trace_dir / "breakdown.json").read_text())
    parts = record["window_us"]
    assert set(parts) == set(torch_trace.CATEGORIES)
    for category in ("conv", "bn", "act", "pool", "loss", "optimizer", "augment", "eval", "whitening"):
        assert parts[category] > 0, category
    # The rows come from the profiler; the wall time from a separate clock around the window.
    assert sum(parts.values()) / 1e6 == pytest.approx(record["window_wall_s"], rel=torch_trace.ADD_UP_TOLERANCE)
    assert f"(tolerance {100 * torch_trace.ADD_UP_TOLERANCE:.0f}%)" in out
    for label in torch_trace.CATEGORIES.values():
        assert label in out
    assert record["run_factors"]["conv"] == 2 and record["run_factors"]["eval"] == 2  # 4 steps/run, 128/64 test images
    try:
        import matplotlib  # noqa: F401
        assert (trace_dir / "breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "pip install matplotlib" in out and not (trace_dir / "breakdown.png").exists()


def test_operator_categories_follow_regions_then_names():
    torch_trace = load_script("torch_trace")

    def chain(*names):  # innermost first
        event = None
        for name in reversed(names):
            event = SimpleNamespace(name=name, cpu_parent=event)
        return event

    assert torch_trace.category_of(chain("aten::empty", "aten::conv2d", torch_trace.WINDOW)) == "conv"
    assert torch_trace.category_of(chain("aten::conv2d", "speedrun: evaluation")) == "eval"
    assert torch_trace.category_of(chain("aten::add_", "Optimizer.step#SGD.step")) == "optimizer"
    assert torch_trace.category_of(chain("autograd::engine::evaluate_function: NativeBatchNormBackward0")) == "bn"
    assert torch_trace.category_of(chain("aten::elu_backward", "CeluBackward0")) == "act"
    assert torch_trace.category_of(chain("aten::amax")) == "pool"
    assert torch_trace.category_of(chain("aten::nll_loss_forward", "aten::cross_entropy_loss")) == "loss"
    assert torch_trace.category_of(chain("aten::index")) == "other"
    assert torch_trace.union_length([(0, 2), (1, 3), (5, 6)]) == 4


# -- flops.py -----------------------------------------------------------------------------------


def test_flop_count_of_a_tiny_network_matches_the_hand_calculation():
    flops = load_script("flops")
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10, bias=False))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    counted = flops.training_step_flops(net, x, y, nn.functional.cross_entropy)
    conv = 2 * 2 * (8 * 8) * 4 * 3 * 3 * 3  # 2 x images x output pixels x out ch x in ch x 3x3
    linear = 2 * 2 * 256 * 10
    assert counted["forward"] == conv + linear == 37888
    # The input needs no gradient: the conv computes only its weight gradient, the linear both.
    assert counted["backward"] == conv + 2 * linear == 48128


def test_flop_count_of_the_resnet9_matches_the_hand_calculation():
    flops = load_script("flops")
    cfg = tiny_config(subset=256, test_subset=128, epochs=2, batch_size=64)  # width 1/8: 8, 16, 32, 64 channels
    # (in channels, out channels, kernel, side of the output before pooling) of every conv
    convs = [(3, 27, 3, 32), (27, 8, 1, 32), (8, 16, 3, 32), (16, 16, 3, 16), (16, 16, 3, 16),
             (16, 32, 3, 16), (32, 64, 3, 8), (64, 64, 3, 4), (64, 64, 3, 4)]
    per_conv = [2 * cin * cout * k * k * side * side for cin, cout, k, side in convs]
    head = 2 * 64 * 10
    forward = sum(per_conv) + head
    whiten, prep = per_conv[0], per_conv[1]
    backward = 2 * forward - 2 * whiten - prep  # frozen whitening: no gradients; prep: weight gradient only
    count = flops.count_run(cfg)
    steps = 2 * (256 // 64)
    assert count["forward_per_image"] == forward
    assert count["parts"]["forward (training)"] == steps * 64 * forward
    assert count["parts"]["backward (training)"] == steps * 64 * backward
    assert count["parts"]["evaluation, timed (one EMA+TTA pass)"] == 128 * 2 * forward  # flip TTA: 2 views
    assert count["parts"]["whitening init"] == 2 * 64 * 30 * 30 * 27 * 27  # patch covariance of 64 images
    assert count["untimed_evaluation"] == 2 * 128 * 3 * forward - 128 * 2 * forward
    assert count["timed_total"] == sum(count["parts"].values())


def test_flop_count_follows_the_whitening_kernel_the_evaluations_and_the_ema_schedule():
    flops = load_script("flops")
    cfg = tiny_config(subset=256, test_subset=128, epochs=3, batch_size=64, whiten_kernel=2, eval_every=2)
    count = flops.count_run(cfg)
    assert count["parts"]["whitening init"] == 2 * 64 * 31 * 31 * 12 * 12  # 2x2 patches: 31 x 31 places, 12 values
    # 3 epochs of 4 steps, evaluated after epochs 2 and 3 (the last): 2 EMA+TTA passes and 2 raw ones, 1 pass timed
    views, per_image = count["tta_views"], count["forward_per_image"]
    assert count["untimed_evaluation"] == 2 * 128 * (views + 1) * per_image - 128 * views * per_image
    elements = sum(v.numel() for v in speedrun.build_model(cfg, "meta").state_dict().values() if v.is_floating_point())
    # average: after batch 0 of each epoch (ema_every 5 > 4 batches); lookahead: after steps 5 and 10 of the run
    assert count["parts"]["EMA (estimate)"] == 3 * elements * flops.EMA_FLOPS_PER_ELEMENT
    lookahead = flops.count_run(dataclasses.replace(cfg, ema_mode="lookahead"))
    assert lookahead["parts"]["EMA (estimate)"] == 2 * elements * flops.EMA_FLOPS_PER_ELEMENT


def test_flop_count_of_the_evaluation_gives_every_view_only_to_the_unsure_fraction():
    flops = load_script("flops")
    cfg = tiny_config(subset=256, test_subset=128, epochs=2, batch_size=64, tta="flip_translate_equal")
    per_image = flops.count_run(cfg)["forward_per_image"]
    assert flops.count_run(cfg)["parts"]["evaluation, timed (one EMA+TTA pass)"] == 128 * 6 * per_image
    unsure = flops.count_run(dataclasses.replace(cfg, tta_unsure_frac=0.25))  # as the record: a quarter get the 6 views
    assert unsure["parts"]["evaluation, timed (one EMA+TTA pass)"] == (128 + 32 * 6) * per_image
    # the last epoch's evaluation is timed; the first's, and both raw (no-TTA) passes, are not
    assert unsure["untimed_evaluation"] == (2 * (128 + 32 * 6 + 128) - (128 + 32 * 6)) * per_image


def test_flops_reports_achieved_rate_of_a_run_trained_here(real_data_dir, tmp_path):
    out = run_script("flops", *TINY, "--data-dir", str(real_data_dir), "--train", "--quiet", "--peak-size", "128",
                     "--json", str(tmp_path / "flops.json"), cwd=tmp_path)
    record = json.loads((tmp_path / "flops.json").read_text())
    measured = record["measured"]
    assert measured["timed_flops"] == record["flops"]["timed_total"] > 0
    assert measured["achieved_flops_per_s"] == pytest.approx(measured["timed_flops"] / measured["seconds"])
    assert measured["fraction_of_peak"] == pytest.approx(measured["achieved_flops_per_s"] / record["peak_flops_per_s"])
    assert f"{100 * measured['fraction_of_peak']:.1f}% of the measured peak" in out


def test_flops_takes_time_and_epochs_from_a_speedrun_result():
    flops = load_script("flops")
    cfg = tiny_config(epochs=3)
    result = dict(config=dataclasses.asdict(cfg), runs=[
        dict(time_to_target_s=2.5, epochs_to_target=2, full_budget_s=3.3),
        dict(time_to_target_s=None, epochs_to_target=None, full_budget_s=3.3)])
    assert flops.config_of_result(result) == cfg
    assert flops.config_of_result(dict(result, config=config_written_before(cfg, "davidnet"))) == cfg
    (s1, e1, _), (s2, e2, _) = flops.timed_runs(result, cfg)
    assert (s1, e1) == (2.5, 2) and (s2, e2) == (pytest.approx(3.3), 3)
    with pytest.raises(ValueError, match="not a speedrun result"):
        flops.config_of_result({"runs": []})


# -- data_pipeline.py ---------------------------------------------------------------------------


def test_data_pipeline_benchmarks_both_pipelines(real_data_dir, tmp_path):
    out = run_script("data_pipeline", *TINY, "--data-dir", str(real_data_dir), "--loader-workers", "1",
                     "--timed-epochs", "1", "--json", str(tmp_path / "pipe.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "pipe.json").read_text())["results"]
    assert [r["workers"] for r in results] == [None, 1]
    for r in results:
        assert r["images"] == 256  # 4 full batches of 64
        assert r["images_per_s"] * r["s_per_epoch"] == pytest.approx(256)
    assert "per-sample Dataset + DataLoader, 1 worker" in out and "vectorized is" in out


def test_per_sample_dataset_normalises_like_the_trainer():
    data_pipeline = load_script("data_pipeline")
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8).numpy()
    plain = data_pipeline.PerSampleCIFAR(images, [0, 1, 2], crop_pad=0, flip=False, cutout=0)
    expected = speedrun.to_device(images, "cpu", torch.float32)
    x, label = plain[1]
    assert label == 1 and torch.allclose(x, expected[1], atol=1e-6)
    augmented = data_pipeline.PerSampleCIFAR(images, [0, 1, 2], crop_pad=4, flip=True, cutout=8)
    x, _ = augmented[1]
    assert x.shape == (3, 32, 32) and (x == 0).all(0).sum() >= 64  # the 8x8 cutout square is zero


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script,argv,message", [
    ("torch_trace", ["--out", "x.json"], "unrecognized arguments: --out"),
    ("torch_trace", ["--trace-steps", "0"], "--trace-steps must be at least 1"),
    ("flops", ["--seconds", "-1"], "--seconds must be positive"),
    ("flops", ["--seconds", "1", "--train"], "give at most one of"),
    ("data_pipeline", ["--loader-workers", "-1"], "--loader-workers must be 0 or more"),
    ("cprofile_run", ["--top", "0"], "--top must be at least 1"),
    ("cprofile_run", ["--flip", "sideways"], "flip='sideways' is not one of"),
])
def test_bad_input_is_a_clear_error(script, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cprofile_run_never_overwrites_a_profile(tmp_path, capsys):
    existing = tmp_path / "old.prof"
    existing.write_text("keep")
    with pytest.raises(SystemExit):
        load_script("cprofile_run").main(["--prof", str(existing)])
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep"


def test_without_matplotlib_the_chart_is_skipped_with_a_hint(tmp_path, monkeypatch):
    common = load_script("_common")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    message = common.bar_chart(tmp_path / "chart.png", ["a", "b"], [1.0, 2.0], "title", "s")
    assert "pip install matplotlib" in message and not (tmp_path / "chart.png").exists()


def test_flops_counts_every_optimizer_and_muons_orthogonalization_only_for_muon():
    flops = load_script("flops")
    assert set(flops.OPTIMIZER_FLOPS_PER_PARAM) == set(speedrun.OPTIMIZERS)
    for name in speedrun.OPTIMIZERS:
        parts = flops.count_run(tiny_config(subset=256, test_subset=128, optimizer=name))["parts"]
        assert parts["optimizer step (estimate)"] > 0
        assert (parts["optimizer orthogonalization (Muon)"] > 0) == (name == "muon")


def test_flop_count_takes_each_epoch_at_its_images_side_and_e1s_late_lookahead():
    flops = load_script("flops")
    cfg = tiny_config(subset=256, test_subset=128, epochs=3, batch_size=64, resolution_schedule="16,32")
    at_32 = flops.count_run(dataclasses.replace(cfg, resolution_schedule=""))
    head = 2 * 64 * 10  # the head sees the pooled features, whatever the side; every conv scales with the area
    step_16 = 64 * ((at_32["forward_per_image"] - head) / 4 + head)
    # epoch 1 at 16 px, epochs 2 and 3 at 32 px (past the list, its last side); 4 steps an epoch
    assert flops.count_run(cfg)["parts"]["forward (training)"] == 4 * step_16 + 8 * 64 * at_32["forward_per_image"]
    e1 = speedrun.make_config("fulcrum_e1")
    elements = sum(v.numel() for v in speedrun.build_model(e1, "meta").state_dict().values() if v.is_floating_point())
    # the copy at step 264, then the blends after steps 268, 272, 276, 280 and 284
    assert flops.count_run(e1)["parts"]["EMA (estimate)"] == 6 * elements * flops.EMA_FLOPS_PER_ELEMENT

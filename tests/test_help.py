"""Every script's --help is its own and true: it exits 0 without a traceback, shows the script's
own description and examples (not speedrun's), lists no flag the script refuses, and every
"(default: X)" it prints is the default the parser really uses."""
import argparse
import dataclasses
import importlib.util
import re
import subprocess
import sys
from unittest import mock

import pytest

from helpers import ROOT
import speedrun
from ablations import grid, merge, optimizers, scaling, study, tricks
from bench import cpu_speed, evaluate, gpu_session, peers, pictures


def profile_script(name):
    """A profile/ script loaded as `python profile/NAME.py` runs it (it imports _common by name)."""
    if str(ROOT / "profile") not in sys.path:
        sys.path.append(str(ROOT / "profile"))
    spec = importlib.util.spec_from_file_location(f"help_of_{name}", ROOT / "profile" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# script path -> its command-line entry (argv -> exit status), and the flags it must not list
SCRIPTS = {
    "speedrun.py": (speedrun.main, ()),
    "ablations/tricks.py": (tricks.main, ("--out", "--save")),
    "ablations/grid.py": (grid.main, ("--out", "--save")),
    "ablations/optimizers.py": (optimizers.main, ("--out", "--save")),
    "ablations/study.py": (study.explain, ()),
    "ablations/merge.py": (merge.main, ()),
    "ablations/scaling.py": (scaling.main, ("--save", "--runs", "--workers")),
    "bench/cpu_speed.py": (cpu_speed.main, ()),
    "bench/evaluate.py": (evaluate.main, ()),
    "bench/peers.py": (peers.main, ("--save", "--preset", "--workers", "--target-acc")),
    "bench/pictures.py": (pictures.main, ("--save", "--runs", "--workers")),
    "bench/gpu_session.py": (gpu_session.main, ("--save", "--preset")),
    "profile/cprofile_run.py": ("cprofile_run", ()),
    "profile/torch_trace.py": ("torch_trace", ("--out", "--save")),
    "profile/data_pipeline.py": ("data_pipeline", ("--out", "--save")),
    "profile/flops.py": ("flops", ("--out", "--save")),
}
FIELDS = {f.name: f for f in dataclasses.fields(speedrun.Config)}


def entry(script):
    main, refused = SCRIPTS[script]
    return (profile_script(main).main if isinstance(main, str) else main), refused


def parser_of(main) -> argparse.ArgumentParser:
    """The parser main() builds: caught as it starts to parse, before anything runs."""
    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Caught(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        with pytest.raises(Caught) as caught:
            main([])
    return caught.value.args[0]


def test_every_script_in_the_tree_is_checked():
    scripts = {str(p.relative_to(ROOT)) for folder in ("ablations", "bench", "profile") for p in (ROOT / folder).glob("*.py")}
    assert scripts - {"ablations/__init__.py", "profile/_common.py", "bench/ledger.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_with_the_scripts_own_description_and_examples(script, capsys):
    main, _ = entry(script)
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and text.startswith("usage:")
    if script != "speedrun.py":
        assert "python speedrun.py --preset cpu        on a CPU" not in text, "speedrun's examples, not the script's"
        assert "Part I, the method" not in text
    examples = re.findall(r"^\s+(?:python|bash) (\S+\.(?:py|sh))", text, re.M)
    started_as = {"bench/gpu_session.py": "bench/gpu_session.sh"}.get(script, script)  # through its shell entry
    assert started_as in examples or script == "ablations/study.py" and "ablations/tricks.py" in text, \
        f"{script}'s help gives no example of itself"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_no_flag_the_script_refuses_and_prints_its_real_defaults(script):
    main, refused = entry(script)
    parser = parser_of(main)
    listed = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert not listed & set(refused), f"{script} lists {sorted(listed & set(refused))}, which it refuses"
    formatter = parser._get_formatter()
    checked = 0
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS):
            continue
        shown = re.search(r"\(default: ([^)]*)\)", formatter._expand_help(action))
        if shown is None:
            continue
        default = FIELDS[action.dest].default if action.default is argparse.SUPPRESS else action.default
        if default in (None, ""):  # unset: the default is described in words, e.g. "a new file under runs/"
            continue
        text = shown.group(1).strip("'")
        if isinstance(default, bool):
            assert text in ({"True", "on"} if default else {"False", "off"}), (script, action.dest, text, default)
        elif isinstance(default, float):
            assert float(text) == default, (script, action.dest, text, default)
        else:  # the value, then perhaps what it means: "0, torch's choice"
            assert text == str(default) or re.match(rf"{re.escape(str(default))}[,:] ", text), (script, action.dest, text, default)
        checked += 1
    assert checked or script in ("ablations/study.py", "ablations/merge.py")


def test_study_scripts_run_five_seeds_by_default_and_say_so():
    for main in (tricks.main, grid.main, optimizers.main):
        parser = parser_of(main)
        assert parser.parse_args([]).runs == study.DEFAULT_RUNS == 5
        assert "(default: 5)" in next(a.help for a in parser._actions if a.dest == "runs")


def test_gpu_session_help_prints_its_usage_and_a_bare_call_is_refused():
    helped = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: bash bench/gpu_session.sh")
    assert all(item in helped.stdout for item in gpu_session.NAMES)
    bare = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], capture_output=True, text=True)
    assert bare.returncode == 2 and "DATA_DIR" in bare.stderr and not bare.stdout
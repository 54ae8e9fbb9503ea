"""The README's set-up commands work from a fresh clone as written, its sample output is whole, and its
layout and switch table match the tree and speedrun.py."""
import re
import shlex

from helpers import ROOT


def readme_section(title):
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def shell_commands(section):
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                yield from (c.strip() for c in line.split("&&"))


def test_setup_commands_need_nothing_outside_the_repository():
    for title in ("Set up and run", "Tests"):
        for command in shell_commands(readme_section(title)):
            words = shlex.split(command)
            assert not any(w.startswith("../") for w in words), f"{command!r} uses a path outside a fresh clone"
            for k, w in enumerate(words):
                if w == "-r":
                    assert (ROOT / words[k + 1]).is_file(), f"{command!r}: no file {words[k + 1]}"
                if w.endswith(".py") and not w.startswith("-"):
                    assert (ROOT / w).is_file(), f"{command!r}: no script {w}"


def test_test_setup_does_not_swap_the_installed_torch():
    for command in shell_commands(readme_section("Tests")):
        assert not re.search(r"\btorch\s*[=<>~!]=", command), f"{command!r} pins torch over the user's install"
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            assert not re.match(r"torch\s*==", line), f"{name} pins an exact torch"


def test_setup_gives_a_cpu_only_install_line_and_names_the_measured_torch():
    setup = readme_section("Set up and run")
    cpu = [c for c in shell_commands(setup) if "download.pytorch.org/whl/cpu" in c]
    assert cpu and cpu[0].startswith("pip install torch --index-url"), "a CPU-only machine gets the CPU wheel"
    assert "macOS" in setup and "NVIDIA" in setup
    assert re.search(r"come from torch\s+\d+\.\d+\.\d+\+cpu", setup) and re.search(r"torch\s+\d+\.\d+\.\d+\+cu\d+", setup)


def test_sample_output_ends_with_where_the_results_went():
    setup = readme_section("Set up and run")
    sample = re.search(r"```\n((?:  step [^\n]*\n|  \.\.\.\n)*epoch .*?)```", setup, re.S).group(1).splitlines()
    assert sample[-2].startswith("time-to-94%:") and sample[-1].startswith("results written to runs/")


def test_layout_names_every_file_of_the_tree_and_the_parts_of_speedrun():
    layout = readme_section("Layout")
    named = set(re.findall(r"^([\w/.]+\.\w+)\s", layout, re.M))
    tracked = {str(p.relative_to(ROOT)) for folder in ("ablations", "bench", "docs", "profile")
               for p in (ROOT / folder).iterdir() if p.is_file() and p.name != "__init__.py"}
    assert tracked <= named, f"the README's layout misses {sorted(tracked - named)}"
    assert all((ROOT / path).is_file() for path in named), "the layout names a file that is not in the tree"
    source = (ROOT / "speedrun.py").read_text()
    banners = re.findall(r"^# (\d|[A-Z])\. (.+)$", source, re.M)
    assert [n for n, _ in banners] == [*"123456789", *"ABCD"]
    assert source.index("# APPENDICES") > source.index("# 9. main") and source.index("# APPENDICES") < source.index("# A. ")


def test_switch_table_gives_each_field_the_choices_of_its_table_in_speedrun():
    import speedrun
    table = readme_section("Every trick is a switch")
    listed = dict(re.findall(r"`(\w+)` \(([^)]*/[^)]*)\)", table))
    for name, choices in listed.items():
        assert {c.strip() for c in choices.split("/")} == set(map(str, speedrun.SWITCHES[name])), name
    assert set(speedrun.SWITCHES) <= set(listed), "a switch's choices are missing from the table"

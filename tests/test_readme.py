"""The README is the entry point: under 250 lines, its first screen holds the generated results
table, the run and test line for each kind of machine, and a link to every docs page; every link
of the README and the docs resolves inside a fresh clone; the layout, switch table and sample
output the pages show match the tree and speedrun.py."""
import dataclasses
import re
import shlex

from helpers import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FIRST_SCREEN = 50  # lines: what a reader sees before scrolling
MACHINES = ("NVIDIA GPU", "CPU-only Linux/Windows", "macOS")
CPU_WHEEL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def first_screen():
    return "".join(README.read_text().splitlines(keepends=True)[:FIRST_SCREEN])


def section(path, title):
    text = path.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def machine_lines():
    """{machine: (run line, test line)} from the README's table of commands."""
    rows = {}
    for line in first_screen().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in MACHINES:
            rows[cells[0]] = tuple(c.strip("`") for c in cells[1:])
    return rows


def links(path):
    """(target, anchor) of every relative Markdown link and image of a page."""
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):
            file, _, anchor = target.partition("#")
            yield file, anchor


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_its_first_screen_has_the_results_table_the_commands_and_the_docs():
    assert len(README.read_text().splitlines()) <= 250
    screen = first_screen()
    assert "<!-- ledger:headline -->" in screen and "<!-- /ledger:headline -->" in screen
    table = screen.split("<!-- ledger:headline -->")[1].split("<!-- /ledger:headline -->")[0]
    assert len(table.strip().splitlines()) >= 3, "the headline table has no row"
    assert set(machine_lines()) == set(MACHINES), "each kind of machine gets its run and test line"
    linked = {(README.parent / f).resolve() for f, _ in links(README) if f and f in screen}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from the README's first screen: {missing}"


def test_each_machine_has_one_line_that_runs_the_main_job_and_one_that_passes_the_tests():
    for machine, (run, test) in machine_lines().items():
        cpu_only = machine != "NVIDIA GPU"
        assert run.endswith("python speedrun.py --preset cpu" if cpu_only else "python speedrun.py"), machine
        assert test.endswith("python -m pytest -q tests") and '".[dev]"' in test, machine
        for line in (run, test):
            assert line.startswith(CPU_WHEEL) == (machine == "CPU-only Linux/Windows"), f"{machine}: {line}"
            words = shlex.split(line.replace("&&", " "))
            assert not any(w.startswith("../") for w in words), f"{line!r} uses a path outside a fresh clone"
            assert not re.search(r"\btorch\s*[=<>~!]=", line), f"{line!r} pins torch over the user's install"
            for w in words:
                if w.endswith(".py"):
                    assert (ROOT / w).is_file(), f"{line!r}: no script {w}"


def test_every_link_of_the_readme_and_docs_resolves_in_a_clone():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} points outside the repository"
        for file, anchor in links(page):
            target = (page.parent / file).resolve() if file else page
            assert target.is_relative_to(ROOT) and target.exists(), f"{page.name}: no {file}"
            if anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
                assert anchor in map(slug, headings), f"{page.name}: no heading #{anchor} in {target.name}"


def test_every_docs_page_is_a_titled_page_that_the_ledger_can_read():
    for page in PAGES[1:]:
        assert page.read_text().startswith("# "), f"{page.name} has no title"
    for page in PAGES:  # a table between ledger markers is one the ledger writes (tests/test_ledger.py)
        text = page.read_text()
        assert text.count("<!-- ledger:") == text.count("<!-- /ledger:"), page.name


def test_sample_output_ends_with_where_the_results_went():
    text = section(README, "## What a run prints")
    sample = re.search(r"```\n(preset [^\n]*\n(?:  step [^\n]*\n|  \.\.\.\n)*epoch .*?)```", text, re.S).group(1).splitlines()
    assert sample[0].startswith("preset cpu on cpu: "), "a run first says what it is about to do"
    assert sample[-2].startswith("time-to-94%:") and sample[-1].startswith("results written to runs/")


def test_readme_command_examples_name_real_scripts_and_flags():
    import speedrun
    flags = {a for action in speedrun.build_parser("x")._actions for a in action.option_strings}
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line.split("  #")[0])
            if words[:2] == ["python", "speedrun.py"]:
                unknown = [w for w in words if w.startswith("--") and w not in flags]
                assert not unknown, f"{line!r}: speedrun.py has no {unknown}"


def test_layout_names_every_file_of_the_tree_and_the_parts_of_speedrun():
    layout = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"^([\w/.]+\.\w+)\s", layout, re.M))
    tracked = {str(p.relative_to(ROOT)) for folder in ("ablations", "bench", "profile")
               for p in (ROOT / folder).iterdir() if p.is_file() and p.name != "__init__.py"}
    assert tracked <= named, f"docs/layout.md misses {sorted(tracked - named)}"
    assert all((ROOT / path).is_file() for path in named), "docs/layout.md names a file that is not in the tree"
    source = (ROOT / "speedrun.py").read_text()
    banners = re.findall(r"^# =+ (\d|[A-Z])\. (.+?) =+$", source, re.M)
    assert [n for n, _ in banners] == [*"1234567", *"ABCDE"]
    assert source.index("# ===== 7. ") < source.index("# APPENDICES") < source.index("# ===== A. ")
    for n, title in banners:  # the docs' layout names each part of the file, as its docstring does
        assert re.search(rf"\b{n.lower()} {re.escape(title.split(':')[0].split(' (')[0].lower()[:12])}", layout.lower()), title


def test_switch_table_gives_each_field_the_choices_of_its_table_in_speedrun():
    import speedrun
    table = (ROOT / "docs" / "switches.md").read_text()
    listed = dict(re.findall(r"`(\w+)` \(([^)]*/[^)]*)\)", table))
    for name, choices in listed.items():
        assert {c.strip() for c in choices.split("/")} == set(map(str, speedrun.SWITCHES[name])), name
    assert set(speedrun.SWITCHES) <= set(listed), "a switch's choices are missing from the table"
    # its rows are speedrun's areas, each holding that area's fields in Config's order
    rows = re.findall(r"^\| (\w[\w ]*?) \| (.*) \|$", table, re.M)[1:]
    fields, areas = [f.name for f in dataclasses.fields(speedrun.Config)], list(speedrun.AREAS.values())
    starts = [fields.index(first) for first in speedrun.AREAS] + [len(fields)]
    by_area = {a: fields[starts[k]:starts[k + 1]] for k, a in enumerate(areas)}
    assert {area: re.findall(r"`(\w+)`", cells) for area, cells in rows} == by_area

"""The set-up the README gives: the package declares every module the scripts import and the
`speedrun` command, every tool run without the install says so in one line, and the test run's
own fetch of CIFAR-10 gives up within seconds when no data comes (the real-data tests are then
skipped, not left hanging)."""
import ast
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import fetch_real_data
from helpers import ROOT
import speedrun

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself needs only 3.10


def test_package_declares_every_module_the_scripts_import_and_the_speedrun_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    installed = set(setup["py-modules"]) | set(setup["packages"])
    assert all((ROOT / f"{m}.py").is_file() for m in setup["py-modules"])
    assert all((ROOT / p / "__init__.py").is_file() for p in setup["packages"])
    assert not (ROOT / "profile" / "__init__.py").exists(), "profile/ must stay a plain folder (stdlib's profile)"
    ours = {p.stem for p in ROOT.glob("*.py")} | {"ablations", "bench"}
    for script in [*ROOT.glob("ablations/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("profile/*.py")]:
        tree = ast.parse(script.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported & ours <= installed, f"{script.name} imports {sorted(imported & ours - installed)}, not installed"
    assert project["project"]["scripts"]["speedrun"] == "speedrun:main" and callable(speedrun.main)
    assert set(project["project"]["dependencies"]) >= {"torch>=2.4", "numpy>=1.24"}
    assert {d.split(">")[0] for d in project["project"]["optional-dependencies"]["dev"]} == {"pytest", "matplotlib"}


# What `python TOOL.py --help` meets in a clone without `pip install -e .`: none of the project's modules
# imports (a None in sys.modules makes the import raise ModuleNotFoundError), and the script's own folder
# first on sys.path, as python puts it there (profile/ scripts import _common by name).
WITHOUT_INSTALL = ("import os, runpy, sys; sys.modules.update(dict.fromkeys(['ablations', 'speedrun', 'speedrun_tools']));"
                   "sys.path[0] = os.path.dirname(sys.argv[1]); sys.argv = [sys.argv[1], '--help'];"
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
TOOLS = sorted(str(p.relative_to(ROOT)) for folder in ("ablations", "bench", "profile") for p in (ROOT / folder).glob("*.py")
               if p.name not in ("__init__.py", "_common.py"))


@pytest.mark.parametrize("tool", TOOLS)
def test_a_tool_run_without_the_install_says_in_one_line_how_to_install(tool):
    done = subprocess.run([sys.executable, "-c", WITHOUT_INSTALL, str(ROOT / tool)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ") and "pip install -e ." in done.stderr, done.stderr


def silent_host():
    """A local HTTP address that accepts connections and never answers; returns (url, close)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []
    done = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def close():
        done.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
    return f"http://127.0.0.1:{server.getsockname()[1]}/cifar-10-python.tar.gz", close


def test_data_fetch_gives_up_within_seconds_when_the_host_never_answers_and_leaves_no_file(tmp_path):
    url, close = silent_host()
    try:
        started = time.monotonic()
        why_not = fetch_real_data(tmp_path / "cifar10", url=url, first_bytes_s=2)
        took = time.monotonic() - started
    finally:
        close()
    assert why_not == f"no data from {url} within 2 s"
    assert took < 12, f"the fetch took {took:.1f} s to give up"
    assert list((tmp_path / "cifar10").iterdir()) == [], "the interrupted download left a file behind"


def test_data_fetch_says_why_when_the_host_refuses_the_connection(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the connection is refused at once
    started = time.monotonic()
    why_not = fetch_real_data(tmp_path / "cifar10", url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", first_bytes_s=30)
    assert why_not and f"127.0.0.1:{port}" in why_not, why_not
    assert time.monotonic() - started < 25
    assert not any((tmp_path / "cifar10").glob("*.tar.gz"))

"""The tests' fixtures: the real CIFAR-10, fetched once a session. Shared helpers are in helpers.py."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ROOT, speedrun

# The scripts the tests start as child processes (the tools, torchrun's workers) import this checkout
# too, as the tests themselves do (pyproject.toml's pythonpath), whether or not it is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# How long the test run waits for the first bytes of CIFAR-10 before it skips the real-data tests:
# long enough for a slow host to answer, short enough that a machine without network moves on.
FIRST_BYTES_S = 15
DATA_NAMES = ("cifar-10-batches-bin", "cifar-10-batches-py", speedrun.CACHE_NAME)


def has_real_data(home: Path) -> bool:
    return any((home / name).exists() for name in DATA_NAMES)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fetch_real_data(home: Path, url: str = speedrun.CIFAR10_URL, first_bytes_s: float = FIRST_BYTES_S) -> str | None:
    """Fill `home` through the trainer's own download (speedrun.load_cifar10, in a child process so
    that it can be stopped). The child is stopped when no byte has arrived after first_bytes_s; once
    bytes flow it may take as long as the download takes. Returns None on success, else why not."""
    home.mkdir(parents=True, exist_ok=True)
    before = folder_bytes(home)
    code = "import sys, speedrun; speedrun.load_cifar10(sys.argv[1], url=sys.argv[2], quiet=True)"
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-c", code, str(home), url], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=errors, text=True)
        started, flowing = time.monotonic(), False
        while child.poll() is None:
            flowing = flowing or folder_bytes(home) > before
            if not flowing and time.monotonic() - started > first_bytes_s:
                stop(child)
                return f"no data from {url} within {first_bytes_s:g} s"
            time.sleep(0.2)
        errors.seek(0)
        lines = [line.strip() for line in errors.read().splitlines() if line.strip()]
    if child.returncode == 0:
        return None
    dropped = [line.removeprefix("note: dropped ").split("; trying ")[0] for line in lines if line.startswith("note: dropped")]
    if dropped:  # the trainer's one line per source it tried, as one line
        return "no source served CIFAR-10: " + "; ".join(dropped)
    return lines[-1].removeprefix("speedrun.DataError: ") if lines else f"the download ended with status {child.returncode}"


def stop(child: subprocess.Popen) -> None:
    """Interrupt the child, so that the download removes its temporary file; kill it if it lingers."""
    child.send_signal(signal.SIGINT) if os.name == "posix" else child.terminate()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


@pytest.fixture(scope="session")
def real_data_dir():
    """The real CIFAR-10 in the default data folder ($CIFAR10_HOME, else ~/.cache/cifar10): there
    already, or downloaded into it once by the trainer's own download; when neither, the tests that
    need it are skipped with one line (pytest keeps a session fixture's skip for every later test)."""
    home = speedrun.default_data_dir()
    if not has_real_data(home):
        why_not = fetch_real_data(home)
        if why_not is not None:
            pytest.skip(f"real CIFAR-10 is not in {home} and could not be downloaded: {why_not}")
    return home

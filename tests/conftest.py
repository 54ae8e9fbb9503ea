"""The tests' fixtures: the real CIFAR-10, fetched once a session. Shared helpers are in helpers.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, speedrun


@pytest.fixture(scope="session")
def real_data_dir():
    """The real CIFAR-10 in the default data folder: fetched by the README's
    `python -c "import speedrun; speedrun.load_cifar10()"`, or on CI by ../shared/tools/get-cifar10."""
    tool = ROOT.parent / "shared" / "tools" / "get-cifar10"
    home = Path(os.environ.get("CIFAR10_HOME") or Path.home() / ".cache" / "cifar10")
    if not any((home / name).exists() for name in ("cifar-10-batches-bin", "cifar-10-batches-py", speedrun.CACHE_NAME)):
        if not tool.exists():
            pytest.skip(f"real CIFAR-10 not found in {home}; fetch it with: "
                        f"python -c \"import speedrun; speedrun.load_cifar10()\"")
        subprocess.run([sys.executable, str(tool), str(home)], check=True, stdout=subprocess.DEVNULL)
    return home

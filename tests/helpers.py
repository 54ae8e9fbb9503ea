"""What the tests share: tiny CIFAR-10-shaped data in the official file formats, tiny configs and
device data. Imported by name (`from helpers import tiny_config`); conftest.py holds the fixtures."""
import dataclasses
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
import speedrun

N_PER_BATCH, N_TEST = 4, 6  # images per fake training batch file, and in the fake test batch


def fake_arrays(seed=0):
    """Random uint8 images (NHWC) and labels shaped like the official splits, only smaller."""
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (5 * N_PER_BATCH, 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8)
    return train_x, rng.integers(0, 10, 5 * N_PER_BATCH), test_x, rng.integers(0, 10, N_TEST)


def _batches(arrays):
    train_x, train_y, test_x, test_y = arrays
    for i in range(5):
        sl = slice(i * N_PER_BATCH, (i + 1) * N_PER_BATCH)
        yield f"data_batch_{i + 1}", train_x[sl], train_y[sl]
    yield "test_batch", test_x, test_y


def md5_sums(folder: Path) -> dict:
    """{file name: MD5} of every file in folder: the checksums a test passes for its fake data."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in Path(folder).iterdir() if p.is_file()}


def write_python_folder(folder: Path, arrays):
    """cifar-10-batches-py/: pickled dicts with bytes keys, as the official (Python 2) files have."""
    folder.mkdir(parents=True)
    for name, x, y in _batches(arrays):
        data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": data}, f)
    return folder


def write_binary_folder(folder: Path, arrays):
    """cifar-10-batches-bin/: records of one label byte then R, G and B planes."""
    folder.mkdir(parents=True)
    for name, x, y in _batches(arrays):
        planes = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        (folder / f"{name}.bin").write_bytes(np.concatenate([y[:, None].astype(np.uint8), planes], 1).tobytes())
    return folder


def make_archive(tmp: Path, kind: str, arrays) -> Path:
    """cifar-10-python.tar.gz or cifar-10-binary.tar.gz holding the fake data."""
    src = tmp / f"src-{kind}"
    folder = src / f"cifar-10-batches-{kind}"
    (write_python_folder if kind == "py" else write_binary_folder)(folder, arrays)
    name = "cifar-10-python.tar.gz" if kind == "py" else "cifar-10-binary.tar.gz"
    path = tmp / name
    with tarfile.open(path, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return path


SIZES = (5 * N_PER_BATCH, N_TEST)


def tiny_config(**overrides):
    """A network small enough to train in seconds on a CPU."""
    base = dict(width=0.125, epochs=2, batch_size=32, ghost_bn_splits=4, whiten_samples=64,
                eval_batch_size=64, device="cpu", precision="fp32")
    return speedrun.make_config("davidnet", **{**base, **overrides})


def preset_config(preset, **overrides):
    """A preset, shrunk to train in seconds on a CPU."""
    small = dict(width=0.125, epochs=2, batch_size=32, whiten_samples=64, eval_batch_size=64, device="cpu", precision="fp32")
    return speedrun.make_config(preset, **{**small, **overrides})


def quick_progress_worker(*args):
    """speedrun's worker process of run_jobs, with a progress line every step instead of every 30 s.
    The workers are spawned: a monkeypatch in the test's process does not reach them, this does."""
    speedrun.Progress.__init__.__defaults__ = (0.0,)
    speedrun._pool_worker(*args)


def random_device_data(n_train=128, n_test=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return speedrun.DeviceData(torch.randn(n_train, 3, 32, 32, generator=g), torch.randint(0, 10, (n_train,), generator=g),
                               torch.randn(n_test, 3, 32, 32, generator=g), torch.randint(0, 10, (n_test,), generator=g), 0.0)


def correlated_images(n=300, seed=0):
    """Smooth random images: neighbouring pixels and channels are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 40, 40, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 5, stride=1)[..., :32, :32]
    return x + 0.5 * x.mean(1, keepdim=True)


# How results, studies and weights stored these fields before five switch tables became yes/no
# fields (written out here, not derived from speedrun's translation, which the tests check)
FIELDS_WRITTEN_BEFORE = {
    "davidnet": dict(lr_schedule_at="end", whiten_bias_init="zero", whiten_bias_schedule="shared", conv_init="default",
                     head_init="default"),
    "record": dict(lr_schedule_at="start", whiten_bias_init="default", whiten_bias_schedule="own", conv_init="dirac",
                   head_init="unit_std")}


def config_written_before(cfg: speedrun.Config, preset: str) -> dict:
    """cfg (of `preset`) as a result of the time stored it: the old fields in place of today's."""
    today = ("lr_schedule_at_start", "whiten_bias_zero", "whiten_bias_own_lr", "dirac_init", "head_unit_std")
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in today}, **FIELDS_WRITTEN_BEFORE[preset]}


def ledger_stop(results: Path, table: str, page_dir: Path, capsys) -> str:
    """What bench/ledger.py says on stderr when it refuses to rebuild `table` from `results`: it
    must stop with exit status 2 (and leave the page as it was, which the callers need not check)."""
    import pytest
    from bench import ledger
    page = page_dir / "README.md"
    page.write_text(f"<!-- ledger:{table} -->\n<!-- /ledger:{table} -->\n")
    with pytest.raises(SystemExit) as stop:
        ledger.main(["--results", str(results), "--pages", str(page)])
    assert stop.value.code == 2
    return capsys.readouterr().err

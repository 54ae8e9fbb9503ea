"""Reading CIFAR-10: both official formats, archives, downloads, checksums, the cache."""
import hashlib
import os
import re
import stat
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from helpers import SIZES, fake_arrays, make_archive, md5_sums, write_binary_folder, write_python_folder
import speedrun


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_same(loaded, arrays):
    for got, want in zip(loaded, arrays):
        np.testing.assert_array_equal(got, want)


def test_python_folder_is_parsed_exactly(tmp_path):
    arrays = fake_arrays()
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", arrays)
    assert_same(speedrun.load_cifar10(tmp_path, py_md5=md5_sums(folder), expect_sizes=SIZES), arrays)


def test_binary_folder_is_parsed_exactly_and_checksummed(tmp_path):
    arrays = fake_arrays()
    folder = write_binary_folder(tmp_path / "cifar-10-batches-bin", arrays)
    sums = {p.name: md5(p) for p in folder.glob("*.bin")}
    assert_same(speedrun.load_cifar10(tmp_path, bin_md5=sums, expect_sizes=SIZES), arrays)


def test_binary_file_failing_md5_is_refused(tmp_path):
    folder = write_binary_folder(tmp_path / "cifar-10-batches-bin", fake_arrays())
    sums = {p.name: md5(p) for p in folder.glob("*.bin")}
    raw = bytearray((folder / "data_batch_3.bin").read_bytes())
    raw[100] ^= 1
    (folder / "data_batch_3.bin").write_bytes(bytes(raw))
    with pytest.raises(speedrun.DataError, match="data_batch_3.bin fails its MD5"):
        speedrun.load_cifar10(tmp_path, bin_md5=sums, expect_sizes=SIZES)
    assert not (tmp_path / speedrun.CACHE_NAME).exists()


def test_real_binary_files_match_the_official_md5(real_data_dir):
    folder = real_data_dir / "cifar-10-batches-bin"
    if not folder.is_dir():
        pytest.skip("only the cache of the real data is present")
    for name, expected in speedrun.BIN_MD5.items():
        assert md5(folder / name) == expected


@pytest.mark.parametrize("kind", ["py", "bin"])
def test_official_archives_are_verified_extracted_and_cached(tmp_path, kind):
    arrays = fake_arrays(1)
    archive = make_archive(tmp_path / "build", kind, arrays)
    data = tmp_path / "data"
    data.mkdir()
    archive.rename(data / archive.name)
    sums = {archive.name: md5(data / archive.name)}
    file_sums = md5_sums(tmp_path / "build" / f"src-{kind}" / f"cifar-10-batches-{kind}")
    assert_same(speedrun.load_cifar10(data, archive_md5=sums, bin_md5=file_sums, py_md5=file_sums, expect_sizes=SIZES),
                arrays)
    assert (data / f"cifar-10-batches-{kind}").is_dir()
    assert (data / speedrun.CACHE_NAME).is_file()
    assert not [p for p in data.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # The second load comes from the cache alone: remove everything else.
    for p in data.iterdir():
        if p.name != speedrun.CACHE_NAME:
            (p.unlink() if p.is_file() else __import__("shutil").rmtree(p))
    assert_same(speedrun.load_cifar10(data, expect_sizes=SIZES), arrays)


def test_archive_with_wrong_md5_is_never_used(tmp_path):
    archive = make_archive(tmp_path, "py", fake_arrays())
    with pytest.raises(speedrun.DataError, match="MD5 .* expected .*Delete it"):
        speedrun.load_cifar10(tmp_path, archive_md5={archive.name: "0" * 32}, expect_sizes=SIZES)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_truncated_archive_gives_a_clear_error(tmp_path):
    archive = make_archive(tmp_path, "py", fake_arrays())
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(speedrun.DataError, match="truncated or corrupt"):
        speedrun.load_cifar10(tmp_path, archive_md5={archive.name: md5(archive)}, expect_sizes=SIZES)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".extract")]


def test_missing_batch_file_is_named(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    (folder / "data_batch_4").unlink()
    with pytest.raises(speedrun.DataError, match="missing batch file .*data_batch_4"):
        speedrun.load_cifar10(tmp_path, py_md5=md5_sums(folder), expect_sizes=SIZES)


def test_corrupt_pickle_is_named(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(speedrun.DataError, match="test_batch is not a readable CIFAR-10 python batch"):
        speedrun.load_cifar10(tmp_path, py_md5=md5_sums(folder), expect_sizes=SIZES)


def test_pickle_with_foreign_objects_is_refused(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    import pickle
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}))
    with pytest.raises(speedrun.DataError, match="refusing to load"):
        speedrun.load_cifar10(tmp_path, py_md5=md5_sums(folder), expect_sizes=SIZES)


def test_wrong_number_of_images_is_reported(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    with pytest.raises(speedrun.DataError, match="holds 20 images, expected 50000"):
        speedrun.load_cifar10(tmp_path, py_md5=md5_sums(folder))


def test_binary_file_of_wrong_length_is_reported(tmp_path):
    folder = write_binary_folder(tmp_path / "cifar-10-batches-bin", fake_arrays())
    (folder / "data_batch_2.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(speedrun.DataError, match="not a whole number of 3073-byte records"):
        speedrun.load_cifar10(tmp_path, bin_md5={}, expect_sizes=SIZES)


def test_unreadable_cache_is_rebuilt(tmp_path, capsys):
    arrays = fake_arrays(2)
    sums = md5_sums(write_python_folder(tmp_path / "cifar-10-batches-py", arrays))
    (tmp_path / speedrun.CACHE_NAME).write_bytes(b"half a file")
    assert_same(speedrun.load_cifar10(tmp_path, py_md5=sums, expect_sizes=SIZES), arrays)
    assert "ignoring the cache" in capsys.readouterr().err
    assert_same(speedrun.load_cifar10(tmp_path, expect_sizes=SIZES), arrays)  # now a good cache


def test_atomic_write_gives_an_ordinary_file(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        speedrun.write_atomic(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(umask)
    assert (tmp_path / "x.json").read_text() == "{}" and (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        speedrun.write_atomic(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


# -- downloads, from servers on 127.0.0.1 (never the real hosts: DOWNLOAD_SOURCES is emptied) --

@pytest.fixture(autouse=True)
def no_real_hosts(monkeypatch):
    monkeypatch.setattr(speedrun, "DOWNLOAD_SOURCES", (), raising=False)


class _Server:
    """Serves `body` at its url, announcing claimed_length bytes; with chunk_delay_s, in 1 kB
    pieces that far apart (a slow host). `hits` counts the requests."""

    def __init__(self, body: bytes, claimed_length=None, chunk_delay_s=0.0):
        body_, length, server = body, claimed_length or len(body), self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    for i in range(0, len(body_), 1024 if chunk_delay_s else len(body_) or 1):
                        self.wfile.write(body_[i:i + (1024 if chunk_delay_s else len(body_))])
                        self.wfile.flush()
                        time.sleep(chunk_delay_s)
                except OSError:  # the client dropped this source
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"


def test_download_is_checksummed_then_extracted_and_read(tmp_path, capsys):
    arrays = fake_arrays(3)
    archive = make_archive(tmp_path / "build", "py", arrays)
    data = tmp_path / "data"
    data.mkdir()
    with _Server(archive.read_bytes()) as server:
        got = speedrun.load_cifar10(data, url=server.url, archive_md5={archive.name: md5(archive)}, expect_sizes=SIZES,
                                    py_md5=md5_sums(tmp_path / "build" / "src-py" / "cifar-10-batches-py"))
    assert_same(got, arrays)
    assert md5(data / "cifar-10-python.tar.gz") == md5(archive)
    assert "downloading" in capsys.readouterr().err


def test_download_with_wrong_checksum_is_discarded(tmp_path, capsys):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    data = tmp_path / "data"
    data.mkdir()
    with _Server(archive.read_bytes()) as server, pytest.raises(speedrun.DataError, match="could not download"):
        speedrun.load_cifar10(data, url=server.url, archive_md5={archive.name: "f" * 32}, expect_sizes=SIZES, quiet=True)
    assert "served other bytes" in capsys.readouterr().err
    assert list(data.iterdir()) == []


def test_truncated_download_is_discarded(tmp_path, capsys):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    body = archive.read_bytes()
    data = tmp_path / "data"
    data.mkdir()
    with _Server(body[: len(body) // 2], claimed_length=len(body)) as server, \
            pytest.raises(speedrun.DataError, match="could not download"):
        speedrun.load_cifar10(data, url=server.url, archive_md5={archive.name: md5(archive)}, expect_sizes=SIZES, quiet=True)
    assert "dropped" in capsys.readouterr().err
    assert list(data.iterdir()) == []


def test_no_network_says_where_to_put_the_archive(tmp_path):
    with pytest.raises(speedrun.DataError, match=r"Download it by hand and put it at .*cifar-10-python.tar.gz"):
        speedrun.load_cifar10(tmp_path, url=dead_url(), expect_sizes=SIZES, quiet=True)


def test_sources_are_tried_in_order_untrusted_bytes_are_dropped_and_the_first_good_source_wins(tmp_path, capsys):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    body, good_md5 = archive.read_bytes(), md5(archive)
    data = tmp_path / "data"
    data.mkdir()
    other = bytearray(body)
    other[-10] ^= 1
    with _Server(body, chunk_delay_s=0.05) as slow, _Server(bytes(other)) as wrong, \
            _Server(body[:len(body) // 2], claimed_length=len(body)) as truncated, _Server(body) as good, \
            _Server(body) as spare:
        urls = [dead_url(), slow.url, wrong.url, truncated.url, good.url, spare.url]
        t0 = time.monotonic()
        speedrun.download(urls, data / archive.name, good_md5, quiet=True, min_speed=100e3, grace_s=0.3, deadline_s=5)
        assert time.monotonic() - t0 < 5, "the slow source was dropped after its grace, not waited for"
    assert md5(data / archive.name) == good_md5
    assert [p.name for p in data.iterdir()] == [archive.name], "nothing untrusted is kept"
    assert (slow.hits, wrong.hits, truncated.hits, good.hits, spare.hits) == (1, 1, 1, 1, 0)
    err = capsys.readouterr().err
    assert err.count("note: dropped") == 4 and "below 100 kB/s" in err and "served other bytes" in err
    assert "truncated" in err or "IncompleteRead" in err


def test_the_last_source_is_not_dropped_for_speed_but_has_a_deadline(tmp_path, capsys):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    data = tmp_path / "data"
    data.mkdir()
    with _Server(archive.read_bytes(), chunk_delay_s=0.05) as slow:
        speedrun.download(slow.url, data / archive.name, md5(archive), quiet=True, min_speed=1e9, grace_s=0.1)
        assert md5(data / archive.name) == md5(archive), "slow but alone: kept going"
        (data / archive.name).unlink()
        with pytest.raises(speedrun.DataError, match="could not download"):
            speedrun.download(slow.url, data / archive.name, md5(archive), quiet=True, deadline_s=0.3)
    assert "past its deadline" in capsys.readouterr().err and list(data.iterdir()) == []


def test_each_source_shows_its_speed_and_time_left(tmp_path, capsys):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    with _Server(archive.read_bytes(), chunk_delay_s=0.01) as server:
        speedrun.download(server.url, tmp_path / archive.name, md5(archive))
    assert re.search(r"downloading .*: [\d.]+/[\d.]+ MB, [\d.]+ MB/s, ETA \d+ s", capsys.readouterr().err)


def test_the_real_hosts_come_after_the_users_urls_with_the_official_one_last(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real DOWNLOAD_SOURCES; nothing is fetched: urlopen is replaced
    tried = []

    def urlopen(url, timeout):
        tried.append((url, timeout))
        raise OSError("no network here")

    monkeypatch.setattr(speedrun.urllib.request, "urlopen", urlopen)
    with pytest.raises(speedrun.DataError):
        speedrun.download(["http://a/x", speedrun.CIFAR10_URL, "http://b/x"], tmp_path / "x.tar.gz", None, quiet=True)
    assert [u for u, _ in tried] == ["http://a/x", "http://b/x", *speedrun.DOWNLOAD_SOURCES]
    assert tried[-1][0] == speedrun.CIFAR10_URL and "air-example-data" in tried[2][0]
    assert all(t <= 10 for _, t in tried), "a short connect timeout: no network fails within seconds"


# -- issue 13: pickle checksums, the cache's digest, unwritable and mistyped folders, leftovers --

def test_python_batch_failing_md5_is_refused_and_not_cached(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    sums = md5_sums(folder)
    raw = bytearray((folder / "data_batch_2").read_bytes())
    raw[-500] ^= 1  # one damaged pixel: the pickle still loads
    (folder / "data_batch_2").write_bytes(bytes(raw))
    with pytest.raises(speedrun.DataError, match="data_batch_2 fails its MD5 check .*delete"):
        speedrun.load_cifar10(tmp_path, py_md5=sums, expect_sizes=SIZES)
    assert not (tmp_path / speedrun.CACHE_NAME).exists()


def test_python_folder_is_checked_against_the_official_md5s_by_default(tmp_path):
    write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    assert set(speedrun.PY_MD5) >= {*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"}
    with pytest.raises(speedrun.DataError, match="fails its MD5 check"):
        speedrun.load_cifar10(tmp_path, expect_sizes=SIZES)


def test_cache_with_right_shapes_and_wrong_content_is_rebuilt(tmp_path, capsys):
    arrays = fake_arrays(4)
    sums = md5_sums(write_python_folder(tmp_path / "cifar-10-batches-py", arrays))
    speedrun.load_cifar10(tmp_path, py_md5=sums, expect_sizes=SIZES)
    cache = tmp_path / speedrun.CACHE_NAME
    with np.load(cache) as z:
        stored = {k: z[k] for k in z.files}
    stored["train_y"] = (stored["train_y"] + 1) % 10  # every label wrong, shapes and values still valid
    with open(cache, "wb") as f:
        np.savez(f, **stored)
    assert_same(speedrun.load_cifar10(tmp_path, py_md5=sums, expect_sizes=SIZES), arrays)
    assert "do not match the digest" in capsys.readouterr().err


def test_cache_of_the_full_size_must_hold_the_official_arrays(tmp_path):
    rng = np.random.default_rng(0)
    fake = (rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50000),
            rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 10000))
    with open(tmp_path / speedrun.CACHE_NAME, "wb") as f:  # a self-consistent cache of the wrong images
        np.savez(f, train_x=fake[0], train_y=fake[1], test_x=fake[2], test_y=fake[3],
                 digest=np.array(speedrun.arrays_digest(fake)))
    with pytest.raises(speedrun.DataError, match="could not download"):  # refused, so it falls through to a download
        speedrun.load_cifar10(tmp_path, url="http://127.0.0.1:9/none.tar.gz", quiet=True)


def test_real_cache_matches_the_official_digest(real_data_dir):
    arrays = speedrun.load_cifar10(real_data_dir)
    assert speedrun.arrays_digest(arrays) == speedrun.OFFICIAL_ARRAYS_SHA256


def test_read_only_data_folder_works_without_a_cache(tmp_path, monkeypatch, capsys):
    arrays = fake_arrays(5)
    sums = md5_sums(write_python_folder(tmp_path / "cifar-10-batches-py", arrays))

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(speedrun, "write_atomic", refuse)  # as root, chmod cannot make a folder read-only
    assert_same(speedrun.load_cifar10(tmp_path, py_md5=sums, expect_sizes=SIZES), arrays)
    assert "could not write the cache" in capsys.readouterr().err
    assert not (tmp_path / speedrun.CACHE_NAME).exists()


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(speedrun.DataError, match="is a file, not a folder"):
        speedrun.load_cifar10(tmp_path / "data", expect_sizes=SIZES)


def test_mistyped_data_dir_is_not_created(tmp_path):
    with pytest.raises(speedrun.DataError, match=r"does not exist.*mkdir -p"):
        speedrun.load_cifar10(tmp_path / "cifar10-typo", url="http://127.0.0.1:9/x.tar.gz", expect_sizes=SIZES)
    assert not (tmp_path / "cifar10-typo").exists()


def test_default_data_folder_is_created(tmp_path, monkeypatch):
    home = tmp_path / "new" / "cifar10"
    monkeypatch.setenv("CIFAR10_HOME", str(home))
    with pytest.raises(speedrun.DataError, match="could not download"):
        speedrun.load_cifar10(None, url="http://127.0.0.1:9/x.tar.gz", expect_sizes=SIZES, quiet=True)
    assert home.is_dir()


def test_the_sweep_removes_only_our_own_stale_temporaries_never_other_programs_files(tmp_path, capsys):
    import os
    arrays = fake_arrays(6)
    sums = md5_sums(write_python_folder(tmp_path / "cifar-10-batches-py", arrays))
    stale = tmp_path / ".speedrun-4242-abc123_x.part"  # a killed run's download or cache write
    stale.write_bytes(b"\0" * 1000)
    stale_dir = tmp_path / ".speedrun-4242-k9w2yz1q.part"  # a killed run's extraction
    (stale_dir / "cifar-10-batches-py").mkdir(parents=True)
    fresh = tmp_path / ".speedrun-4343-def456gh.part"  # perhaps another run writing right now
    fresh.write_bytes(b"\0")
    theirs = [tmp_path / ".ubuntu-24.04.iso.part", tmp_path / ".extract-my-photos", tmp_path / ".speedrun-notes.part"]
    theirs[0].write_bytes(b"iso")
    theirs[1].mkdir()
    (theirs[1] / "photo.jpg").write_bytes(b"jpg")
    theirs[2].write_text("mine, not speedrun's")
    old = time.time() - 2 * speedrun.STALE_S
    for p in (stale, stale_dir, *theirs):
        os.utime(p, (old, old))
    speedrun.load_cifar10(tmp_path, py_md5=sums, expect_sizes=SIZES)
    assert not stale.exists() and not stale_dir.exists() and fresh.exists()
    assert all(p.exists() for p in theirs) and (theirs[1] / "photo.jpg").read_bytes() == b"jpg"
    assert f"removed {stale}" in capsys.readouterr().err
    assert speedrun.remove_stale_temporaries(tmp_path, print, older_than_s=0) == [fresh], "the age is a parameter"


def test_every_temporary_this_project_makes_has_the_name_the_sweep_knows(tmp_path, monkeypatch):
    import tempfile
    made = []
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: made.append(real_mkstemp(**kw)[1]) or (os.open(made[-1], 0), made[-1]))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    speedrun.load_cifar10(tmp_path / "build", archive_md5={archive.name: md5(archive)}, expect_sizes=SIZES, py_md5={})
    speedrun.save_json({"a": 1}, tmp_path / "r.json")
    assert len(made) >= 3  # the extraction folder, the cache, the result
    assert all(speedrun.TEMP_NAME.fullmatch(Path(m).name) for m in made), made


def test_a_fifo_in_a_data_folder_is_refused_by_name_without_blocking(tmp_path):
    import os
    for kind, name in (("py", "data_batch_1"), ("bin", "data_batch_1.bin")):
        root = tmp_path / kind
        folder = (write_python_folder if kind == "py" else write_binary_folder)(root / f"cifar-10-batches-{kind}", fake_arrays())
        (folder / name).unlink()
        os.mkfifo(folder / name)  # opening it for reading would block forever
        with pytest.raises(speedrun.DataError, match=f"{name} is not a regular file"):
            speedrun.load_cifar10(root, expect_sizes=SIZES)
    for name in (speedrun.CACHE_NAME, "cifar-10-python.tar.gz"):  # never skipped, then replaced by a download
        os.mkfifo(tmp_path / name)
        with pytest.raises(speedrun.DataError, match=f"{name} is not a regular file"):
            speedrun.load_cifar10(tmp_path, url=dead_url(), expect_sizes=SIZES, quiet=True)
        assert stat.S_ISFIFO(os.stat(tmp_path / name).st_mode)
        os.unlink(tmp_path / name)


def test_a_symlink_loop_as_the_data_folder_is_said_plainly(tmp_path):
    import os
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(speedrun.DataError, match="symbolic link") as err:
        speedrun.load_cifar10(tmp_path / "loop", expect_sizes=SIZES)
    assert "does not exist" not in str(err.value)


def test_bad_binary_archive_does_not_promise_a_re_download(tmp_path):
    archive = make_archive(tmp_path, "bin", fake_arrays())
    with pytest.raises(speedrun.DataError) as err:
        speedrun.load_cifar10(tmp_path, archive_md5={archive.name: "0" * 32}, expect_sizes=SIZES)
    assert "re-downloaded" not in str(err.value) and "downloads cifar-10-python.tar.gz" in str(err.value)
    python_archive = make_archive(tmp_path / "py", "py", fake_arrays())
    with pytest.raises(speedrun.DataError, match="it will be re-downloaded"):
        speedrun.load_cifar10(tmp_path / "py", archive_md5={python_archive.name: "0" * 32}, expect_sizes=SIZES)

"""Reading CIFAR-10: both official formats, archives, downloads, checksums, the cache."""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import SIZES, fake_arrays, make_archive, write_binary_folder, write_python_folder
import speedrun


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_same(loaded, arrays):
    for got, want in zip(loaded, arrays):
        np.testing.assert_array_equal(got, want)


def test_python_folder_is_parsed_exactly(tmp_path):
    arrays = fake_arrays()
    write_python_folder(tmp_path / "cifar-10-batches-py", arrays)
    assert_same(speedrun.load_cifar10(tmp_path, expect_sizes=SIZES), arrays)


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
    bin_sums = {p.name: md5(p) for p in (tmp_path / "build" / "src-bin" / "cifar-10-batches-bin").glob("*.bin")} if kind == "bin" else {}
    assert_same(speedrun.load_cifar10(data, archive_md5=sums, bin_md5=bin_sums, expect_sizes=SIZES), arrays)
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
        speedrun.load_cifar10(tmp_path, expect_sizes=SIZES)


def test_corrupt_pickle_is_named(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(speedrun.DataError, match="test_batch is not a readable CIFAR-10 python batch"):
        speedrun.load_cifar10(tmp_path, expect_sizes=SIZES)


def test_pickle_with_foreign_objects_is_refused(tmp_path):
    folder = write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    import pickle
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}))
    with pytest.raises(speedrun.DataError, match="refusing to load"):
        speedrun.load_cifar10(tmp_path, expect_sizes=SIZES)


def test_wrong_number_of_images_is_reported(tmp_path):
    write_python_folder(tmp_path / "cifar-10-batches-py", fake_arrays())
    with pytest.raises(speedrun.DataError, match="holds 20 images, expected 50000"):
        speedrun.load_cifar10(tmp_path)


def test_binary_file_of_wrong_length_is_reported(tmp_path):
    folder = write_binary_folder(tmp_path / "cifar-10-batches-bin", fake_arrays())
    (folder / "data_batch_2.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(speedrun.DataError, match="not a whole number of 3073-byte records"):
        speedrun.load_cifar10(tmp_path, bin_md5={}, expect_sizes=SIZES)


def test_unreadable_cache_is_rebuilt(tmp_path, capsys):
    arrays = fake_arrays(2)
    write_python_folder(tmp_path / "cifar-10-batches-py", arrays)
    (tmp_path / speedrun.CACHE_NAME).write_bytes(b"half a file")
    assert_same(speedrun.load_cifar10(tmp_path, expect_sizes=SIZES), arrays)
    assert "ignoring unreadable cache" in capsys.readouterr().err
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


# -- downloads, from a server on 127.0.0.1 ----------------------------------------------------

class _Server:
    def __init__(self, body: bytes, claimed_length=None):
        body_, length = body, claimed_length or len(body)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body_)
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


def test_download_verify_extract(tmp_path, capsys):
    arrays = fake_arrays(3)
    archive = make_archive(tmp_path / "build", "py", arrays)
    data = tmp_path / "data"
    with _Server(archive.read_bytes()) as server:
        got = speedrun.load_cifar10(data, url=server.url, archive_md5={archive.name: md5(archive)}, expect_sizes=SIZES)
    assert_same(got, arrays)
    assert md5(data / "cifar-10-python.tar.gz") == md5(archive)
    assert "downloading" in capsys.readouterr().err


def test_download_with_wrong_checksum_is_discarded(tmp_path):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    data = tmp_path / "data"
    with _Server(archive.read_bytes()) as server, pytest.raises(speedrun.DataError, match="fails its MD5 check; it was discarded"):
        speedrun.load_cifar10(data, url=server.url, archive_md5={archive.name: "f" * 32}, expect_sizes=SIZES, quiet=True)
    assert list(data.iterdir()) == []


def test_truncated_download_is_discarded(tmp_path):
    archive = make_archive(tmp_path / "build", "py", fake_arrays())
    body = archive.read_bytes()
    data = tmp_path / "data"
    with _Server(body[: len(body) // 2], claimed_length=len(body)) as server, \
            pytest.raises(speedrun.DataError, match="truncated|could not download"):
        speedrun.load_cifar10(data, url=server.url, archive_md5={archive.name: md5(archive)}, expect_sizes=SIZES, quiet=True)
    assert list(data.iterdir()) == []


def test_no_network_says_where_to_put_the_archive(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(speedrun.DataError, match=r"Download it by hand and put it at .*cifar-10-python.tar.gz"):
        speedrun.load_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/x.tar.gz", expect_sizes=SIZES, quiet=True)

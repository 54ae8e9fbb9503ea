"""bench/gpu_session.sh and bench/gpu_session.py: items in order under their limits and the
deadline, a clean stop at a limit, the packing into few files; one item rehearsed for real."""
import io
import json
import subprocess
import sys
import tarfile
import time

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_session  # noqa: E402

PY = sys.executable
SCRIPT = ["bash", str(ROOT / "bench" / "gpu_session.sh")]


def fake_item(name, limit, code):
    return gpu_session.Item(name, "0", limit, "1", f"fake {name}", lambda w, code=code: [[PY, "-c", code]])


def test_items_run_in_order_under_their_limits_and_the_deadline(tmp_path, monkeypatch):
    """An item that fits runs; one past its limit gets SIGTERM and keeps what it finished; one
    whose limit does not fit in the time left is 'not reached' and the next one is still tried."""
    monkeypatch.setattr(gpu_session, "GRACE_S", 3)
    order = tmp_path / "order.txt"
    note = f"open({str(order)!r}, 'a').write"
    stays = (f"import signal, sys, time; {note}('slow started\\n')\n"
             f"def kept(*_): {note}('slow kept its finished runs\\n'); sys.exit(130)\n"
             "signal.signal(signal.SIGTERM, kept); time.sleep(60)")
    items = [fake_item("first", 20, f"{note}('first\\n')"),
             fake_item("slow", 2, stays),
             fake_item("too_long", 1000, f"{note}('too_long\\n')"),
             fake_item("broken", 20, f"{note}('broken\\n'); raise SystemExit(3)"),
             fake_item("last", 20, f"{note}('last\\n')")]
    where = gpu_session.Where(data=tmp_path, work=tmp_path, shared=tmp_path, rehearse=False)
    records, said = [], []
    t0 = time.monotonic()
    gpu_session.run_items(items, where, deadline_s=120, records=records, say=said.append)
    assert time.monotonic() - t0 < 60
    assert order.read_text().splitlines() == ["first", "slow started", "slow kept its finished runs", "broken", "last"]
    status = {r["name"]: r["status"] for r in records}
    assert [r["name"] for r in records] == ["first", "slow", "too_long", "broken", "last"]
    assert status["first"] == status["last"] == "done"
    assert status["slow"] == "stopped at its limit (finished runs kept; exit 130)"
    assert 2 <= [r for r in records if r["name"] == "slow"][0]["seconds"] < 2 + 3
    assert status["too_long"].startswith("not reached (needs 1000 s")
    assert status["broken"] == "failed (exit 3; see broken.log)"
    assert (tmp_path / "first.log").read_text().startswith(f"$ {PY} -c ")


def test_a_short_deadline_reaches_nothing_after_what_fits(tmp_path):
    items = [fake_item("a", 2, "pass"), fake_item("b", 30, "pass"), fake_item("c", 1, "pass")]
    where = gpu_session.Where(data=tmp_path, work=tmp_path, shared=tmp_path, rehearse=False)
    records = gpu_session.run_items(items, where, deadline_s=2 + gpu_session.GRACE_S + 5, records=[],
                                    say=lambda m: None)
    assert [r["status"].split(" (")[0] for r in records] == ["done", "not reached", "done"]


def test_pack_cuts_large_results_into_parts_and_leaves_weights_out_beyond_the_file_limit(tmp_path):
    work = tmp_path / "call"
    (work / "tta-check").mkdir(parents=True)
    (work / "record.json").write_text(json.dumps({"runs": [1, 2]}))
    (work / "tta-check" / "w.pt").write_bytes(bytes(range(256)) * 4096 * 3)  # 3 MiB, compresses well
    import os
    (work / "tta-check" / "noise.pt").write_bytes(os.urandom(3 * 2 ** 20))  # 3 MiB that does not compress
    study = tmp_path / "studies" / "tricks-x"
    study.mkdir(parents=True)
    (study / "results.csv").write_text("variant,seed\nfull,0\n")

    out = tmp_path / "out"
    out.mkdir()
    packed = gpu_session.pack(work, out, [study], part_mib=1, max_parts=6)
    assert packed["weights_left_out"] == [] and len(packed["files"]) >= 3
    assert sorted(p.name for p in out.iterdir()) == packed["files"]
    assert all((out / f).stat().st_size <= 2 ** 20 for f in packed["files"])
    joined = b"".join((out / f).read_bytes() for f in packed["files"])
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        names = set(tar.getnames())
        assert {"call/record.json", "call/tta-check/noise.pt", "call/studies/tricks-x/results.csv"} <= names
        assert tar.extractfile("call/tta-check/noise.pt").read() == (work / "tta-check" / "noise.pt").read_bytes()

    out2 = tmp_path / "out2"
    out2.mkdir()
    packed = gpu_session.pack(work, out2, [study], part_mib=1, max_parts=2)
    assert packed["weights_left_out"] == ["tta-check/noise.pt", "tta-check/w.pt"]
    assert packed["files"] == ["results.tgz"]
    with tarfile.open(out2 / "results.tgz") as tar:
        assert not any(n.endswith(".pt") for n in tar.getnames()) and "call/record.json" in tar.getnames()


def test_rehearsal_of_one_item_runs_it_and_packs_at_most_eight_files(real_data_dir, tmp_path):
    """The script for real, rehearsed (tiny, CPU): record runs, peers is not rehearsable here,
    the rest not asked for; then the same with a deadline too short for anything."""
    out = tmp_path / "out"
    done = subprocess.run([*SCRIPT, str(real_data_dir), str(out), "--rehearse", "--items", "record,peers",
                           "--root", str(tmp_path / "root")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.tgz", "status.json", "status.txt"] and len(files) <= 8
    status = json.loads((out / "status.json").read_text())
    by_name = {r["name"]: r["status"] for r in status["items"]}
    assert [r["name"] for r in status["items"]] == gpu_session.NAMES
    assert by_name["record"] == "done"
    assert by_name["peers"].startswith("not rehearsable here")
    assert all(by_name[n] == "not asked for (--items)" for n in gpu_session.NAMES[2:])
    with tarfile.open(out / "results.tgz") as tar:
        record = [n for n in tar.getnames() if n.endswith("/record.json")]
        assert len(record) == 1
        result = json.load(tar.extractfile(record[0]))
    assert len(result["runs"]) == 2 and result["config"]["subset"] == 512 and result["config"]["device"] == "cpu"
    assert "record" in done.stdout and "done" in (out / "status.txt").read_text()

    out = tmp_path / "out-short"
    done = subprocess.run([*SCRIPT, str(real_data_dir), str(out), "--rehearse", "--items", "record",
                           "--deadline", "5", "--root", str(tmp_path / "root")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    by_name = {r["name"]: r["status"] for r in json.loads((out / "status.json").read_text())["items"]}
    assert by_name["record"].startswith("not reached (needs 240 s")
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "status.json", "status.txt"]


def test_help_and_a_missing_data_dir(tmp_path):
    shown = subprocess.run([*SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "DATA_DIR" in shown.stdout
    assert all(name in shown.stdout for name in gpu_session.NAMES)
    missing = subprocess.run(SCRIPT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "error: the following arguments are required: DATA_DIR (see --help)"]
    taken = tmp_path / "out"
    taken.mkdir()
    (taken / "status.txt").write_text("someone else's")
    refused = subprocess.run([*SCRIPT, str(tmp_path), str(taken), "--root", str(tmp_path / "root")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already holds status.txt" in refused.stderr
    assert (taken / "status.txt").read_text() == "someone else's" and not (tmp_path / "root").exists()


def test_sigterm_to_the_script_stops_the_item_keeps_its_runs_and_still_packs(tmp_path):
    """The device call's own end (SIGTERM): the item in progress is stopped the clean way, the
    rest recorded not reached, and the packed files are still written; exit status 130."""
    started = tmp_path / "started"
    driver = f"""
import sys
sys.path.insert(0, {str(ROOT / 'bench')!r})
import gpu_session as g
slow = ("import signal, sys, time\\n"
        "def kept(*_): open({str(tmp_path / 'kept')!r}, 'w').write('finished runs'); sys.exit(130)\\n"
        "signal.signal(signal.SIGTERM, kept); open({str(started)!r}, 'w').close(); time.sleep(60)")
g.ITEMS = [g.Item("slow", "1", 100, "1", "sleeps", lambda w: [[sys.executable, "-c", slow]]),
           g.Item("after", "2", 10, "1", "never reached", lambda w: [[sys.executable, "-c", "pass"]])]
g.NAMES = [i.name for i in g.ITEMS]
sys.exit(g.main([{str(tmp_path)!r}, {str(tmp_path / 'out')!r}, "--root", {str(tmp_path / 'root')!r}]))
"""
    proc = subprocess.Popen([PY, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started.exists(), proc.communicate(timeout=30)
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (tmp_path / "kept").read_text() == "finished runs"
    status = {r["name"]: r["status"] for r in json.loads((tmp_path / "out" / "status.json").read_text())["items"]}
    assert status == {"slow": "interrupted (this script was stopped; finished runs kept)",
                      "after": "not reached (this script was stopped)"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.tgz", "status.json", "status.txt"]
    assert "interrupted: the item in progress was stopped" in err

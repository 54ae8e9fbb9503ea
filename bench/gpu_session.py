#!/usr/bin/env python3
"""One device call's GPU measurements (issue 25), in the issue's order, each under its own time
limit, inside an overall deadline; then everything packed into a few files for the call to return.

    bash bench/gpu_session.sh /root/cifar10 $OUT                          # on the device: call 1
    bash bench/gpu_session.sh /root/cifar10 $OUT --items fulcrum_e1 --deadline 150    # call 2
    REHEARSE=1 bash bench/gpu_session.sh ~/.cache/cifar10               # here: every item tiny, on the CPU

Each item runs as its own processes, logged to WORK/ITEM.log. An item starts only if its limit
(plus GRACE_S for a clean stop) fits in the time left before the deadline; otherwise it is
recorded as "not reached" and the next one is tried. At its limit an item gets SIGTERM, which
speedrun.py, bench/peers.py and ablations/ studies take as Ctrl-C: they keep every finished run
(round, study job) and exit; GRACE_S later anything left is killed. SIGTERM or Ctrl-C to this
script stops the item in progress the same way, records the rest as not reached and still packs.

Where things go, under ROOT (--root, default runs/gpu-session/): WORK = ROOT/STAMP/ (a new folder
per call: result JSONs, logs, tta-check/); studies in ROOT/studies/ (shared by the calls of one
warm machine, so a study cut short resumes in the next call); airbench's installed package and
data files in ROOT/site/ and ROOT/airbench-data/ (never packed). OUT_DIR (default WORK-out; on the device
machine $OUT) gets at most 8 files: status.txt (the table below and each item's last log lines),
status.json, and results.tgz (WORK with the study this call ran; over PART_MIB it is cut into
results.tgz.00, .01, ...: `cat results.tgz.* | tar xz`; weights are left out if the parts would
not fit the device tool's 8 files / 64 MiB).

--rehearse (or REHEARSE=1): every item shrunk to TINY on the CPU with 2 runs (seeds), so the
whole script runs on a CPU in minutes; items that need CUDA are recorded "not rehearsable here".
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]

PY = sys.executable
GRACE_S = 15  # after SIGTERM: time to write the finished runs and exit before SIGKILL
DEADLINE_S = 330  # the items end by then: with the data unpacking, install and packing, the call ends within ~6 min
REHEARSE_DEADLINE_S = 900
REHEARSE_LIMIT_S = 240
PART_MIB = 15  # a returned file may hold 16 MiB
MAX_FILES, MAX_TOTAL_MIB = 8, 60  # the device tool returns 8 files, 64 MiB in all
SDIST = ROOT / ".vendor" / "airbench-0.1.8.tar.gz"
TINY = ["--subset", "512", "--test-subset", "200", "--width", "0.125", "--epochs", "1", "--batch-size", "64",
        "--whiten-samples", "128", "--eval-batch-size", "100", "--device", "cpu"]
E1_VARIANTS = "full,no_progressive,crop_resolution,no_lr_floor,no_late_lookahead"


@dataclasses.dataclass
class Where:
    """The paths and scale one call's commands use."""
    data: Path
    work: Path      # this call's folder
    shared: Path    # runs/gpu-session: studies, airbench's site and data, kept across calls on a warm machine
    rehearse: bool

    def runs(self, n: int) -> list[str]:
        return ["--runs", "2" if self.rehearse else str(n)]

    def scale(self) -> list[str]:
        return TINY if self.rehearse else []


def speedrun_cmd(w: Where, preset: str, runs: int, name: str, *extra: str) -> list[str]:
    return [PY, "speedrun.py", "--preset", preset, "--data-dir", str(w.data), *w.runs(runs), *extra, *w.scale(),
            "--out", str(w.work / f"{name}.json")]


def peers_cmds(w: Where) -> list[list[str]]:
    install = [] if (w.shared / "site" / "airbench").is_dir() else [
        [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target",
         str(w.shared / "site"), str(SDIST)]]
    return install + [[PY, "bench/peers.py", "--presets", "airbench94,record,fulcrum_e1", *w.runs(10),
                       "--data-dir", str(w.data), "--device", "cuda", "--out", str(w.work / "peers.json"),
                       "--airbench-dir", str(w.shared / "airbench-data")]]


def ablation_cmds(w: Where) -> list[list[str]]:
    return [[PY, "ablations/tricks.py", "--preset", "fulcrum_e1", "--variants", E1_VARIANTS, *w.runs(5),
             "--data-dir", str(w.data), *w.scale(), "--study", str(study_folder(w))]]


def study_folder(w: Where) -> Path:
    """E1's leave-one-out study: shared by a warm machine's calls (a cut study resumes); a
    rehearsal's is its own, inside WORK."""
    return (w.work if w.rehearse else w.shared) / "studies" / "tricks-fulcrum_e1"


def tta_check_cmds(w: Where) -> list[list[str]]:
    """airbench94 trained and saved per seed, then all of them and the CPU-trained weights in
    results/weights/ evaluated here in fp16 and fp32 (findings.md: GPU training or GPU evaluation?)."""
    folder = w.work / "tta-check"
    seeds = range(2 if w.rehearse else 5)
    train = [[PY, "speedrun.py", "--preset", "airbench94", "--data-dir", str(w.data), "--seed", str(s), *w.scale(),
              "--out", str(folder / f"airbench94-seed{s}.json"), "--save", str(folder / f"airbench94-seed{s}.pt")]
             for s in seeds]
    weights = [str(folder / f"airbench94-seed{s}.pt") for s in seeds] + sorted(
        str(p) for p in (ROOT / "results" / "weights").glob("*.pt"))
    small = ["--device", "cpu", "--test-subset", "200"] if w.rehearse else []
    evaluate = [[PY, "bench/evaluate.py", *weights, "--data-dir", str(w.data), "--precision", precision, *small,
                 "--out", str(folder / f"evaluate-{precision}.json")] for precision in ("fp16", "fp32")]
    return train + evaluate


@dataclasses.dataclass
class Item:
    """One measurement of issue 25. limit_s: H100/H200 seconds from the 2026-11-22 H100 session's
    wall times (per run: record 2.4 s, airbench94 4.0 s, davidnet 13.2 s, a study's airbench94 run
    7.3 s; per process ~25 s of start, data and warm-up) with ~30% to spare. call: the device call
    it is planned for (docs/performance.md: call 1 has DEADLINE_S, call 2 what is left of the 15
    minutes; "later" needs another session's GPU)."""
    name: str
    issue: str
    limit_s: int
    call: str
    what: str
    commands: object  # Where -> list of argv lists, run one after the other
    cuda_only: str = ""  # why it cannot be rehearsed on a CPU
    needs: Path | None = None  # a file that must travel with the call (carry)


ITEMS = [
    Item("record", "1", 120, "1", "record (hiverge's October recipe), 25 runs: ~85 s",
         lambda w: [speedrun_cmd(w, "record", 25, "record")]),
    Item("peers", "2+3", 210, "1", "airbench94, record, fulcrum_e1 against airbench 0.1.8's train94, 10 interleaved "
         "rounds after a warm-up each: ~13.5 s a round, ~185 s",
         peers_cmds, cuda_only="airbench's train94 needs CUDA and torchvision", needs=SDIST),
    Item("fulcrum_e1", "3", 120, "2", "fulcrum_e1 (Fulcrum's E1), 25 runs: ~85 s",
         lambda w: [speedrun_cmd(w, "fulcrum_e1", 25, "fulcrum_e1")]),
    Item("compile-airbench94", "4", 240, "later", "airbench94 --compile --compile-mode max-autotune, 10 runs: "
         "autotuning in the warm-up (minutes, unmeasured here) + ~35 s",
         lambda w: [speedrun_cmd(w, "airbench94", 10, "airbench94-compiled", "--compile", "--compile-mode",
                                 "max-autotune")], cuda_only="--compile's max-autotune is measured on CUDA"),
    Item("compile-record", "4", 240, "later", "record --compile --compile-mode max-autotune, 10 runs",
         lambda w: [speedrun_cmd(w, "record", 10, "record-compiled", "--compile", "--compile-mode", "max-autotune")],
         cuda_only="--compile's max-autotune is measured on CUDA"),
    Item("davidnet", "5", 390, "later", "davidnet, 25 runs: ~355 s",
         lambda w: [speedrun_cmd(w, "davidnet", 25, "davidnet")]),
    Item("ablations-e1", "6", 190, "later", f"fulcrum_e1 leave-one-out ({E1_VARIANTS}), 5 paired seeds: "
         "25 study runs, ~150 s", ablation_cmds),
    Item("tta-check", "6", 200, "later", "airbench94 seeds 0-4 saved, then evaluated here in fp16 and fp32 with "
         "results/weights/: 5 processes of ~27 s + 2 evaluations", tta_check_cmds),
]
NAMES = [i.name for i in ITEMS]
OUT_FILES = ("status.txt", "status.json", "results.tgz")


# =============================================================================================
# Running
# =============================================================================================


def run_limited(argv: list[str], log, seconds: float, env: dict) -> tuple[int, bool]:
    """(exit status, stopped at the limit): argv in its own process group, its output appended
    to the open file `log`; SIGTERM at `seconds`, SIGKILL GRACE_S later. A KeyboardInterrupt here
    (Ctrl-C, or SIGTERM under sigterm_as_interrupt) stops the process the same way, then re-raises."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=max(seconds, 0.1)), False
    except subprocess.TimeoutExpired:
        return stop(proc), True
    except KeyboardInterrupt:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> int:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def record_of(item: Item, limit: int, status: str = "") -> dict:
    return dict(name=item.name, issue=item.issue, call=item.call, what=item.what, limit_s=limit, commands=[],
                seconds=0.0, exit_status=None, status=status)


def run_items(items: list[Item], where: Where, deadline_s: float, records: list, limit_of=None, env=None,
              say=print) -> list[dict]:
    """Each item in order if its limit fits before the deadline (seconds from now), a status
    record per item appended to `records` as it goes (so an interrupt leaves those so far).
    limit_of(item) gives the limit to use (default item.limit_s)."""
    limit_of = limit_of or (lambda item: item.limit_s)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(where.shared / "site"), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    for item in items:
        left = deadline_s - (time.monotonic() - t0)
        limit = limit_of(item)
        rec = record_of(item, limit)
        records.append(rec)
        if where.rehearse and item.cuda_only:
            rec["status"] = f"not rehearsable here ({item.cuda_only})"
        elif limit + GRACE_S > left:
            rec["status"] = f"not reached (needs {limit} s + {GRACE_S} s to stop, {max(left, 0):.0f} s left)"
        elif item.needs is not None and not item.needs.exists():
            rec["status"] = f"cannot run: {item.needs.relative_to(ROOT)} is missing (carry {item.needs.parent.name})"
        if rec["status"]:
            say(f"== {item.name}: {rec['status']}")
            continue
        scale = "REHEARSED tiny on the CPU, of: " if where.rehearse else ""
        say(f"== {item.name} (issue item {item.issue}, at most {limit} s): {scale}{item.what}")
        start = time.monotonic()
        stopped = False
        rec["status"] = "interrupted (this script was stopped; finished runs kept)"  # until it ends
        with open(where.work / f"{item.name}.log", "a") as log:
            try:
                for argv in item.commands(where):
                    rec["commands"].append(" ".join(argv))
                    rc, stopped = run_limited(argv, log, limit - (time.monotonic() - start), env)
                    rec["exit_status"] = rc
                    if stopped or rc != 0:
                        break
            finally:
                rec["seconds"] = time.monotonic() - start
        if stopped:
            rec["status"] = f"stopped at its limit (finished runs kept; exit {rec['exit_status']})"
        elif rec["exit_status"] != 0:
            rec["status"] = f"failed (exit {rec['exit_status']}; see {item.name}.log)"
        else:
            rec["status"] = "done"
        say(f"   {item.name}: {rec['status']}, {rec['seconds']:.0f} s")
    return records


# =============================================================================================
# Packing and status
# =============================================================================================


def pack(work: Path, out: Path, extra_folders: list[Path], part_mib: float = PART_MIB,
         max_parts: int = MAX_FILES - 2, max_total_mib: float = MAX_TOTAL_MIB) -> dict:
    """work (and each of extra_folders, under studies/) as out/results.tgz, cut into
    results.tgz.00, .01, ... where over part_mib; weight files (*.pt) are left out if the parts
    would exceed max_parts or max_total_mib. Returns {files, weights_left_out}."""
    def tgz(skip_weights: bool) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            keep = (lambda t: None if skip_weights and t.name.endswith(".pt") else t)
            tar.add(work, arcname=work.name, filter=keep)
            for folder in extra_folders:
                if folder.is_dir():
                    tar.add(folder, arcname=f"{work.name}/studies/{folder.name}", filter=keep)
        return buffer.getvalue()

    part = int(part_mib * 2 ** 20)
    blob, left_out = tgz(False), []
    if -(-len(blob) // part) > max_parts or len(blob) > max_total_mib * 2 ** 20:
        left_out = sorted(str(p.relative_to(work)) for p in work.rglob("*.pt"))
        blob = tgz(True)
    if len(blob) <= part:
        pieces = {"results.tgz": blob}
    else:
        pieces = {f"results.tgz.{k:02d}": blob[i:i + part] for k, i in enumerate(range(0, len(blob), part))}
    for name, data in pieces.items():
        speedrun.write_atomic(out / name, lambda tmp, data=data: tmp.write_bytes(data))
    return dict(files=sorted(pieces), bytes=len(blob), weights_left_out=left_out)


def log_tail(path: Path, lines: int = 4) -> list[str]:
    """The last lines of a log, without per-step progress lines and the commands (listed already)."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace").splitlines()
    return [line for line in text if line.strip() and not line.startswith(("  step ", "$ "))][-lines:]


def status_lines(session: dict) -> list[str]:
    lines = [f"GPU session ({'REHEARSAL on the CPU, tiny configuration' if session['rehearse'] else 'full scale'}), "
             f"started {session['started']}, {session['machine']}; deadline {session['deadline_s']:.0f} s, "
             f"items took {session['items_s']:.0f} s",
             f"{'item':<20} {'issue':>5} {'call':>5} {'limit':>6} {'took':>6}  status"]
    for r in session["items"]:
        took = f"{r['seconds']:.0f} s" if r["commands"] else "-"
        lines.append(f"{r['name']:<20} {r['issue']:>5} {r['call']:>5} {r['limit_s']:>4} s {took:>6}  {r['status']}")
    for r in session["items"]:
        if r["commands"]:
            lines += ["", f"--- {r['name']}: {r['what']}", *(f"$ {c}" for c in r["commands"]),
                      *log_tail(Path(session["work"]) / f"{r['name']}.log")]
    packed = session.get("packed")
    if packed:
        lines += ["", f"packed: {', '.join(packed['files'])} ({packed['bytes'] / 2 ** 20:.1f} MiB)"
                  + (f"; weights left out (on the machine in {session['work']}): {', '.join(packed['weights_left_out'])}"
                     if packed["weights_left_out"] else "")]
    return lines


def machine() -> str:
    """torch and the GPU, without initialising CUDA in this process (the items use the GPU)."""
    gpu = "no nvidia-smi"
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip() or "no GPU listed"
        except (OSError, subprocess.SubprocessError):
            gpu = "nvidia-smi failed"
    import torch
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}"


# =============================================================================================
# Command line
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bash bench/gpu_session.sh", description=__doc__.split("\n\n")[0],
                                epilog="items, in order (limit in s on an H100/H200; the device call planned):\n" +
                                "\n".join(f"  {i.name:<19} {i.limit_s:>4} s  call {i.call:<6} {i.what}" for i in ITEMS) +
                                "\n\nexamples:\n" + __doc__.split("\n\n", 2)[1] + "\n\n" + __doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="folder holding CIFAR-10 (on the GPU machine "
                   "/root/cifar10, where the staging calls put it)")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, nargs="?", default=None,
                   help="where the packed files go (on the device machine: $OUT; default: WORK-out)")
    p.add_argument("--items", default=",".join(NAMES), metavar="A,B,...",
                   help=f"run only these items, still in the issue's order (default: {','.join(NAMES)})")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help=f"seconds from the start by which every item has ended (default {DEADLINE_S}; "
                        f"--rehearse: {REHEARSE_DEADLINE_S})")
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "gpu-session",
                   help=f"folder of every call's WORK, the studies and airbench's files (default: {ROOT / 'runs' / 'gpu-session'})")
    p.add_argument("--rehearse", action="store_true", default=os.environ.get("REHEARSE", "") not in ("", "0"),
                   help=f"every item tiny, on the CPU, at most {REHEARSE_LIMIT_S} s each (also REHEARSE=1)")
    p.error = lambda message: p.exit(2, f"error: {message} (see --help)\n")  # one line, not the usage too
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.items.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in NAMES]
    if unknown or not wanted:
        parser.exit(2, f"error: --items: unknown {', '.join(unknown) or 'none given'}; the items are {','.join(NAMES)}\n")
    if not args.data_dir.is_dir():
        parser.exit(2, f"error: DATA_DIR {args.data_dir} is not a folder; give the one holding cifar-10-batches-bin "
                       f"(the staging calls unpack it to /root/cifar10)\n")
    deadline = args.deadline if args.deadline is not None else (REHEARSE_DEADLINE_S if args.rehearse else DEADLINE_S)
    shared = args.root.resolve()
    out = args.out_dir
    taken = [n for n in OUT_FILES if (out / n).exists()] + [p.name for p in out.glob("results.tgz.*")] \
        if out is not None and out.is_dir() else []
    if taken:
        parser.exit(2, f"error: OUT_DIR {out} already holds {', '.join(taken)}; give an empty or new folder\n")
    work = speedrun.reserve(shared / (("rehearsal-" if args.rehearse else "") + speedrun.timestamp()), "--root",
                            folder=True, numbered=True)
    out = out or shared / f"{work.name}-out"
    (work / "tta-check").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    where = Where(data=args.data_dir.resolve(), work=work, shared=shared, rehearse=args.rehearse)
    items = [i for i in ITEMS if i.name in wanted]
    session = dict(started=speedrun.timestamp(), machine=machine(), rehearse=args.rehearse, deadline_s=deadline,
                   work=str(work), items=[])
    print(f"{session['machine']}; results in {work}, packed into {out}")
    limit_of = (lambda item: REHEARSE_LIMIT_S) if args.rehearse else None
    t0, status, records = time.monotonic(), 0, []
    with speedrun.sigterm_as_interrupt():
        try:
            run_items(items, where, deadline, records, limit_of=limit_of)
        except KeyboardInterrupt:
            status = 130
            print("interrupted: the item in progress was stopped (its finished runs kept); packing", file=sys.stderr)
        session["items_s"] = time.monotonic() - t0
        done = {r["name"] for r in records}
        session["items"] = records + [
            record_of(i, i.limit_s, "not reached (this script was stopped)" if i in items else "not asked for (--items)")
            for i in ITEMS if i.name not in done]
        session["items"].sort(key=lambda r: NAMES.index(r["name"]))
        ran = {r["name"] for r in session["items"] if r["commands"]}
        studies = [study_folder(where)] if "ablations-e1" in ran and not where.rehearse else []
        speedrun.save_json(session, work / "status.json")
        (work / "status.txt").write_text("\n".join(status_lines(session)) + "\n")
        session["packed"] = pack(work, out, studies)
        speedrun.save_json(session, out / "status.json")
        text = "\n".join(status_lines(session)) + "\n"
        (out / "status.txt").write_text(text)
    print(text, end="")
    return status


if __name__ == "__main__":
    sys.exit(main())

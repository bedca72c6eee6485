#!/usr/bin/env python3
"""Short-lived Python processes: how much of a one-second process stoker walks, against
py-spy and no profiler, in one run.

  sudo python3 bench/short_lived_bench.py [--rounds 5] [--out bench/SHORT_LIVED_RESULTS.md]

Needs target/release/stoker (`cargo build --release`), py-spy on PATH (`pip install
py-spy`), pyenv's CPython 3.12.1 and Debian unstable's 3.15 (`cargo xtask setup`).

Each process runs tests/fixtures/python/workload.py `shares 1 REPORT --cpu`: one second of
CPU in a Python loop, measuring its own CPU time in the loop and before its script's first
line (interpreter start-up). Per round, in turn:
- stoker: `stoker record --all-python` runs; processes start one after the other: of a binary
  new to it (a fresh copy of Debian unstable's static 3.15: another inode), of pyenv's 3.12.1
  (shared libpython; new to the session), and of 3.12.1 again (a binary it knows).
- py-spy: `py-spy record -- python ...` launches each (py-spy cannot find a process that
  starts on its own).
- no profiler: the same processes alone.
Figures:
- Python share: of a process's samples, the share whose stack has a Python frame (target
  >= 95% for a known binary). Samples during the interpreter's start-up, before any Python
  frame exists, cannot have one: the start-up CPU time bounds what any profiler can reach.
- Loop seen: samples inside the `shares` loop over the loop's measured CPU time x rate.
- Exec to walked: stoker's own log, from the kernel's exec event to the process's Python
  layout being in the kernel (the first sample after it has Python frames).
- Wall time of the process with each profiler over its wall time alone (median ratio).
Everything is measured twice: on an idle machine, and with a CPU hog pinned on CPU 1.
"""
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
WORKLOAD = ROOT / "tests/fixtures/python/workload.py"
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
KNOWN = PYENV / "versions/3.12.1/bin/python3.12"
SID_DIR = Path("/opt/stoker-pythons/3.15/usr/bin")
RATE = 99
PY_FRAME = re.compile(r"\(.+:\d+\)$")
# The processes of a round, in order, by the binary they run (None: a fresh copy of the
# static 3.15, new to stoker). The shared 3.12 is new to a session the first time.
KINDS = {"new, static 3.15": None, "new, shared 3.12": KNOWN, "known, shared 3.12": KNOWN}


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def fresh_binary():
    """A copy of the static 3.15 beside the original (so it finds its standard library):
    a file stoker has never seen."""
    path = SID_DIR / f"python3.15-bench-{os.getpid()}-{time.monotonic_ns()}"
    shutil.copy2(SID_DIR / "python3.15", path)
    return path


def run_workload(exe, tmp, name, prefix=()):
    """Runs one process (under `prefix`, a launching profiler); (pid, report, wall s)."""
    report = Path(tmp) / f"{name}.json"
    start = time.perf_counter()
    proc = subprocess.Popen([*prefix, str(exe), str(WORKLOAD), "shares", "1", str(report), "--cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait()
    wall = time.perf_counter() - start
    return proc.pid, json.loads(report.read_text()), wall


def folded_by_pid(path):
    """pid -> (all samples, samples with a Python frame, samples in the loop)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        m = re.search(r"\[pid (\d+)\]$", frames[0])
        if not m:
            continue
        t = out.setdefault(int(m.group(1)), [0, 0, 0])
        t[0] += int(n)
        t[1] += int(n) * any(PY_FRAME.search(f) for f in frames[1:])
        t[2] += int(n) * any(f.startswith("shares (workload.py:") for f in frames)
    return out


def stoker_round(tmp, i):
    folded = Path(tmp) / f"stoker{i}.folded"
    log = open(Path(tmp) / f"stoker{i}.log", "w+")
    s = subprocess.Popen([str(STOKER), "record", "--all-python", "--log-level", "info", "-r", str(RATE),
                          "-f", "folded", "-o", str(folded)], stderr=log)
    while "sampling at" not in Path(log.name).read_text():
        time.sleep(0.05)
    runs = {kind: run_kind(kind, tmp, f"s{i}") for kind in KINDS}
    s.send_signal(signal.SIGINT)
    s.wait()
    text = Path(log.name).read_text()
    samples = folded_by_pid(folded)
    out = {}
    for kind, (pid, report, wall) in runs.items():
        total, python, loop = samples.get(pid, [0, 0, 0])
        m = re.search(rf"pid {pid}: CPython \S+, walked ([\d.]+) ms after its exec", text)
        out[kind] = {"share": python / max(total, 1), "loop": loop / (report["cpu_seconds"] * RATE),
                     "walked_ms": float(m.group(1)) if m else float("nan"), "wall": wall,
                     "startup": report["startup_cpu_seconds"], "samples": total}
    return out


def run_kind(kind, tmp, name, prefix=()):
    """One process of `kind` (see KINDS)."""
    fresh = fresh_binary() if KINDS[kind] is None else None
    try:
        return run_workload(fresh or KINDS[kind], tmp, f"{name}-{list(KINDS).index(kind)}", prefix)
    finally:
        if fresh:
            fresh.unlink()


def pyspy_round(tmp, i):
    out = {}
    for kind in KINDS:
        raw = Path(tmp) / f"pyspy{i}-{list(KINDS).index(kind)}.txt"
        pid, report, wall = run_kind(kind, tmp, f"p{i}",
                                     ["py-spy", "record", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--"])
        total = loop = 0
        for line in raw.read_text().splitlines() if raw.exists() else []:
            stack, n = line.rsplit(" ", 1)
            total += int(n)
            loop += int(n) * ("shares (workload.py:" in stack)
        out[kind] = {"loop": loop / (report["cpu_seconds"] * RATE), "wall": wall, "samples": total}
    return out


def alone_round(tmp, i):
    return {kind: {"wall": run_kind(kind, tmp, f"n{i}")[2]} for kind in KINDS}


def phase(rounds, tmp):
    res = {"stoker": [], "py-spy": [], "none": []}
    for i in range(rounds):
        res["none"].append(alone_round(tmp, i))
        res["stoker"].append(stoker_round(tmp, i))
        res["py-spy"].append(pyspy_round(tmp, i))
    return res


def median(rows, who, kind, key):
    values = [r[kind][key] for r in rows[who] if r[kind][key] == r[kind][key]]
    return statistics.median(values) if values else float("nan")


def report(lines, title, res):
    lines.append(f"\n## {title}\n")
    lines.append("| binary | stoker Python share (min / median) | stoker loop seen | py-spy loop seen "
                 "| exec to walked, ms (median / max) | start-up CPU, ms | wall vs alone: stoker | py-spy |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        shares = [r[kind]["share"] for r in res["stoker"]]
        walked = [r[kind]["walked_ms"] for r in res["stoker"]]
        ratio = lambda who: statistics.median(  # noqa: E731
            [p[kind]["wall"] / n[kind]["wall"] for p, n in zip(res[who], res["none"])])
        lines.append(
            f"| {kind} | {min(shares):.1%} / {statistics.median(shares):.1%} "
            f"| {median(res, 'stoker', kind, 'loop'):.1%} | {median(res, 'py-spy', kind, 'loop'):.1%} "
            f"| {statistics.median(walked):.1f} / {max(walked):.1f} "
            f"| {1000 * median(res, 'stoker', kind, 'startup'):.0f} "
            f"| {ratio('stoker'):.3f} | {ratio('py-spy'):.3f} |")


def main():
    if os.geteuid() != 0:
        raise SystemExit("run as root: stoker loads eBPF programs and py-spy reads other processes")
    rounds = arg("--rounds", 5)
    out = Path(arg("--out", str(ROOT / "bench/SHORT_LIVED_RESULTS.md")))
    lines = ["# Short-lived processes: stoker against py-spy", "",
             f"Machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs. "
             f"Date: {time.strftime('%Y-%m-%d')}. Command: `python3 bench/short_lived_bench.py`.",
             f"py-spy: {subprocess.run(['py-spy', '--version'], capture_output=True, text=True).stdout.strip()}. "
             f"Both at {RATE} Hz; {rounds} rounds of stoker, py-spy and no profiler alternating; "
             "each process is one second of CPU in a Python loop (workload.py `shares 1 --cpu`).",
             "",
             "\"new\": a binary the stoker session has not seen (for the static 3.15, a fresh copy: "
             "another inode); \"known\": one it has (pyenv's 3.12.1, shared libpython, run just before). "
             "py-spy launches each process itself: it cannot find one that starts on its own, "
             "so its figures are for a process it started, stoker's for one it found."]
    with tempfile.TemporaryDirectory() as tmp:
        report(lines, "Idle machine", phase(rounds, tmp))
        hog = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", "while 1: pass"])
        try:
            report(lines, "A CPU hog pinned on CPU 1", phase(rounds, tmp))
        finally:
            hog.kill()
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measures stoker against py-spy (and no profiler) on Python workloads, in one run.

  sudo python3 bench/python_bench.py [--quick] [--out bench/RESULTS.md]

Needs target/release/stoker (`cargo build --release`), py-spy on PATH (`pip install
py-spy`) and the CPython builds the tests use. Prints a Markdown report and writes it.

1. Accuracy, per CPython build: tests/fixtures/python/workload.py `shares` runs func_a,
   func_b and func_c in a loop and measures its own CPU time in each (time.thread_time).
   Each profiler records that run at 499 Hz; a function's share is the fraction of the
   samples inside the three functions whose stack holds that function at its line. The
   error is |profiler share - measured share| in percentage points; "whole stack" is the
   fraction of the workload's samples whose stack reaches <module>.
2. Slowdown: `fixed` does a fixed amount of CPU work and reports its wall time. Runs with
   no profiler, stoker and py-spy (attached by PID while the workload sleeps before its
   work) alternate; each round gives paired ratios, the report shows their medians.
3. Kernel cost: stoker --kernel-stats at 30 Python frames (recursion of 27 under three
   frames), nanoseconds per target sample timed inside the program.
4. Profiler CPU and memory: each profiler attached to a running `shares` workload by PID,
   its own CPU time (rusage of the profiler process) and peak RSS.
"""
import json
import os
import platform
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
BUILDS = [
    ("3.8.18", PYENV / "versions/3.8.18/bin/python3.8"),
    ("3.9.18", PYENV / "versions/3.9.18/bin/python3.9"),
    ("3.10.13", PYENV / "versions/3.10.13/bin/python3.10"),
    ("3.11.7", PYENV / "versions/3.11.7/bin/python3.11"),
    ("3.12.1", PYENV / "versions/3.12.1/bin/python3.12"),
    ("3.13.0", PYENV / "versions/3.13.0/bin/python3.13"),
    ("3.11 (Debian, static)", Path("/usr/bin/python3.11")),
]
# Debian unstable's builds, as `cargo xtask setup` unpacks them: static and shared.
SID = Path("/opt/stoker-pythons")
for minor in ("3.13", "3.14", "3.15"):
    exe = SID / minor / f"usr/bin/python{minor}"
    release = subprocess.run([str(exe), "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True).stdout.strip() if exe.exists() else minor
    BUILDS.append((f"{release} (Debian unstable, static)", exe))
    BUILDS.append((f"{release} (Debian unstable, shared)", SID / minor / f"usr/bin/python{minor}-shared"))
FUNCS = ["func_a", "func_b", "func_c"]
RATE = "99"
# Accuracy runs sample faster, for enough samples that sampling noise (binomial: about
# 0.9 pp per share at 3000 samples, 0.5 pp at 10000) does not swamp profiler error.
ACCURACY_RATE = "499"


def marker_line(name):
    for i, line in enumerate(WORKLOAD.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# line: {name}"):
            return i
    raise SystemExit(f"no marker {name} in {WORKLOAD}")


FRAMES = {f: f"{f} (workload.py:{marker_line(f)})" for f in FUNCS}


def read_folded(path):
    stacks = []
    for line in Path(path).read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        stacks.append((stack.split(";"), int(count)))
    return stacks


def profiler_cmd(name, out, extra=(), rate=RATE):
    if name == "stoker":
        return [str(STOKER), "record", "-r", rate, "-f", "folded", "-o", out, *extra]
    return ["py-spy", "record", "-r", rate, "-f", "raw", "-o", out, *extra]


def run_quiet(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r


def accuracy(name, python, seconds, tmp):
    out, report = f"{tmp}/{name}.folded", f"{tmp}/{name}.json"
    cmd = profiler_cmd(name, out, rate=ACCURACY_RATE)
    run_quiet(cmd + ["--", str(python), str(WORKLOAD), "shares", str(seconds), report])
    truth = json.loads(Path(report).read_text())
    stacks = read_folded(out)
    counts = {f: sum(n for s, n in stacks if FRAMES[f] in s) for f in FUNCS}
    inside = sum(counts.values())
    total = sum(n for _, n in stacks)
    whole = sum(n for s, n in stacks if any(f.startswith("<module> (workload.py") for f in s[:2]))
    errors = {f: abs(100 * counts[f] / max(inside, 1) - 100 * truth[f]) for f in FUNCS}
    # The sampling noise of a perfect sampler with this many samples (largest share's sd).
    noise = max(100 * (truth[f] * (1 - truth[f]) / max(inside, 1)) ** 0.5 for f in FUNCS)
    return {
        "samples": total,
        "inside": inside,
        "worst": max(errors.values()),
        "noise": noise,
        "whole": 100 * whole / max(total, 1),
    }


def fixed_run(profiler, python, rounds, tmp):
    """Wall time of a fixed amount of work. Every run starts the same way; a profiler
    attaches by PID during the workload's initial sleep and stays until it exits."""
    report = f"{tmp}/fixed.json"
    target = subprocess.Popen([str(python), str(WORKLOAD), "fixed", str(rounds), report, "0.8"])
    prof = None
    if profiler:
        cmd = profiler_cmd(profiler, f"{tmp}/fixed.out", ["--pid", str(target.pid)])
        prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if target.wait() != 0:
        raise SystemExit("the fixed workload failed")
    if prof and prof.wait() != 0:
        raise SystemExit(f"{profiler} failed: {prof.stderr.read()}")
    return json.loads(Path(report).read_text())["wall"]


def kernel_cost(python, tmp):
    r = run_quiet([str(STOKER), "record", "--kernel-stats", "-d", "5", "-f", "folded", "-o", f"{tmp}/k.folded",
                   "--", str(python), str(WORKLOAD), "deep", "6", "27"])
    line = next(l for l in r.stderr.splitlines() if "ns per target sample" in l)
    depth = max(len(s) for s, _ in read_folded(f"{tmp}/k.folded"))
    return float(line.split("kernel:")[1].split("ns")[0]), depth


def resources(name, python, seconds, tmp):
    target = subprocess.Popen([str(python), str(WORKLOAD), "shares", str(seconds + 3), f"{tmp}/r.json"])
    time.sleep(1)
    cmd = profiler_cmd(name, f"{tmp}/res.out", ["--pid", str(target.pid), "-d", str(seconds)])
    start = time.monotonic()
    prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait4 gives this one child's own CPU time and peak RSS.
    _, status, usage = os.wait4(prof.pid, 0)
    wall = time.monotonic() - start
    target.wait()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status})")
    return {"cpu_pct": 100 * (usage.ru_utime + usage.ru_stime) / wall, "rss_mb": usage.ru_maxrss / 1024}


def main():
    quick = "--quick" in sys.argv
    out_path = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else ROOT / "bench/RESULTS.md"
    if os.geteuid() != 0:
        raise SystemExit("run as root: stoker loads eBPF programs and py-spy reads other processes")
    for tool in (STOKER,):
        if not tool.exists():
            raise SystemExit(f"{tool} is missing: run `cargo build --release` first")
    seconds = 4 if quick else 20  # 20 s at 499 Hz is about 10000 samples
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    say("# stoker benchmark results")
    say()
    say(f"Machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu_model}).")
    say(f"Date: {time.strftime('%Y-%m-%d')}. Command: `python3 bench/python_bench.py{' --quick' if quick else ''}`.")
    say(f"py-spy: {run_quiet(['py-spy', '--version']).stdout.strip()}. Both profilers at {RATE} Hz, {ACCURACY_RATE} Hz for accuracy.")
    say()
    with tempfile.TemporaryDirectory() as tmp:
        say("## Accuracy: worst per-function share error against the workload's own measurement")
        say()
        say(f"Both profilers at {ACCURACY_RATE} Hz for {seconds} s per run; \"noise\" is the standard deviation of a "
            "share for a perfect random sampler with stoker's sample count.")
        say()
        say("| CPython | stoker samples | stoker worst error (pp) | noise (pp) | stoker whole stack "
            "| py-spy samples | py-spy worst error (pp) | py-spy whole stack |")
        say("|---|---|---|---|---|---|---|---|")
        worst = {"stoker": 0.0, "py-spy": 0.0}
        for version, python in BUILDS:
            r = {"stoker": accuracy("stoker", python, seconds, tmp)}
            # py-spy does not read every release stoker does: its failure is a row, not the end.
            try:
                r["py-spy"] = accuracy("py-spy", python, seconds, tmp)
            except SystemExit as e:
                r["py-spy"] = str(e).strip().splitlines()[-1][:80]
            for p, v in r.items():
                if isinstance(v, dict):
                    worst[p] = max(worst[p], v["worst"])
            py = r["py-spy"]
            spy = (f"| {py['inside']} | {py['worst']:.2f} | {py['whole']:.1f}% |" if isinstance(py, dict)
                   else f"| fails: {py} | | |")
            say(f"| {version} | {r['stoker']['inside']} | {r['stoker']['worst']:.2f} | {r['stoker']['noise']:.2f} "
                f"| {r['stoker']['whole']:.1f}% {spy}")
        say()
        say(f"Worst over all builds: stoker {worst['stoker']:.2f} pp, py-spy {worst['py-spy']:.2f} pp (target: <= 1.5 pp).")
        say()

        python = BUILDS[4][1]
        rounds_n = 3 if quick else 7
        say(f"## Slowdown of a CPU-bound process (CPython 3.12, {rounds_n} alternating rounds)")
        say()
        fixed_run(None, python, 2000, tmp)  # warm caches
        ratios = {"stoker": [], "py-spy": []}
        walls = {"none": [], "stoker": [], "py-spy": []}
        for _ in range(rounds_n):
            base = fixed_run(None, python, 12000, tmp)
            walls["none"].append(base)
            for p in ("stoker", "py-spy"):
                w = fixed_run(p, python, 12000, tmp)
                walls[p].append(w)
                ratios[p].append(w / base)
        say("| profiler | median wall (s) | median paired ratio |")
        say("|---|---|---|")
        say(f"| none | {statistics.median(walls['none']):.3f} | 1.000 |")
        for p in ("stoker", "py-spy"):
            say(f"| {p} | {statistics.median(walls[p]):.3f} | x{statistics.median(ratios[p]):.4f} |")
        say()
        say("Target: stoker <= x1.005.")
        say()

        say("## Kernel cost per sample (stoker --kernel-stats, CPython 3.12)")
        say()
        costs = [kernel_cost(python, tmp) for _ in range(3)]
        say(f"Python frames per stack: {costs[0][1]}. ns per target sample over 3 runs: "
            f"{', '.join(f'{c:.0f}' for c, _ in costs)}; median {statistics.median(c for c, _ in costs):.0f} ns "
            "(target: <= 5000 ns).")
        say()

        dur = 8 if quick else 20
        say(f"## Profiler CPU and memory ({dur} s attached to a busy CPython 3.12 process at {RATE} Hz)")
        say()
        say("| profiler | CPU (% of one core) | peak RSS (MB) |")
        say("|---|---|---|")
        for p in ("stoker", "py-spy"):
            r = resources(p, python, dur, tmp)
            say(f"| {p} | {r['cpu_pct']:.2f} | {r['rss_mb']:.1f} |")
        say()
        say("stoker's peak RSS includes the kernel BTF (about 9 MB) that aya's loader parses at start-up and frees.")
        say()
    out_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

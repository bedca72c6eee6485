#!/usr/bin/env python3
"""What a context switch of a watched thread costs under each way of measuring waits.

  sudo python3 bench/switch_bench.py [--rounds N] [--out bench/SWITCH_RESULTS.md]

Needs target/release/stoker (`cargo xtask setup`). Two threads of one CPython 3.12 process,
pinned to the last CPU, hand a byte back and forth over two pipes: each round trip is two
switches off the CPU of a target thread (it blocks in a read) and two on, and next to no
other work, so what a switch costs shows in the round trip's time. The process reports its
own round trips a second (over half a second at a time). Each round measures 3 s of them
with no profiler, under `stoker record` (CPU sampling, 99 Hz), `stoker record --mode wall`
(the default `--waits sampled`: no program on context switches) and `--mode wall --waits
followed` (the switch program on every switch of the host); the order rotates from round
to round. Reports the round trip's time in each, and the time each adds per switch of the
target (half the round trip's difference from the run with no profiler of the same round).
"""
import os
import platform
import signal
import statistics
import subprocess
import time
from pathlib import Path

from benchlib import arg, interval, links, rounds_table

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
PYTHON = VERSIONS / "3.12.1/bin/python3.12"
CONFIGS = ["alone", "stoker cpu", "stoker wall", "stoker wall --waits followed"]

PING_PONG = """
import os, sys, threading, time
a_r, a_w = os.pipe(); b_r, b_w = os.pipe()
def echo():
    while True:
        os.read(a_r, 1); os.write(b_w, b"x")
threading.Thread(target=echo, daemon=True).start()
n, t0 = 0, time.perf_counter()
while True:
    os.write(a_w, b"x"); os.read(b_r, 1); n += 1
    if n % 2000 == 0:
        t = time.perf_counter()
        if t - t0 >= 0.5:
            print(f"{n / (t - t0):.1f}", flush=True)
            n, t0 = 0, t
"""


def rates(process, count):
    """The next `count` figures (round trips a second) the process reports, averaged."""
    return statistics.mean(float(process.stdout.readline()) for _ in range(count))


def measure(config, process):
    """Round trips a second of `process` while `config` watches it (3 s)."""
    stoker = None
    if config != "alone":
        words = config.split()
        stoker = subprocess.Popen(
            [str(STOKER), "record", "-m", words[1], *words[2:], "--pid", str(process.pid), "-f", "folded",
             "-o", "/dev/null"], stderr=subprocess.DEVNULL)
        # A cpu-clock event per CPU; in wall mode one more link (the switch program, or the
        # sampler's iterator over the target's threads).
        want = os.cpu_count() + (1 if words[1] == "wall" else 0)
        deadline = time.monotonic() + 30
        while links(stoker.pid) < want:
            if time.monotonic() > deadline or stoker.poll() is not None:
                raise SystemExit(f"stoker did not attach ({config})")
            time.sleep(0.05)
    rates(process, 1)  # an interval that began before the profiler was ready
    rate = rates(process, 6)
    if stoker:
        stoker.send_signal(signal.SIGINT)
        stoker.wait(timeout=60)
    return rate


def main():
    rounds = arg("--rounds", 8)
    out = Path(arg("--out", str(ROOT / "bench/SWITCH_RESULTS.md")))
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    cpu = str(os.cpu_count() - 1)
    process = subprocess.Popen(["taskset", "-c", cpu, str(PYTHON), "-c", PING_PONG], stdout=subprocess.PIPE,
                               text=True)
    rows = []
    try:
        rates(process, 4)  # warm-up
        for r in range(rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            row = {c: measure(c, process) for c in order}
            rows.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{c} {1e6 / row[c]:.3f} us" for c in CONFIGS), flush=True)
    finally:
        process.kill()
    lines = [
        "# What a switch of a watched thread costs",
        "",
        f"`python3 bench/switch_bench.py --rounds {rounds}` on {platform.node()}, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs. Two CPython 3.12 threads on CPU {cpu} hand a byte back and forth over two pipes "
        "(two switches of a target thread off the CPU a round trip); each round runs them with no profiler, "
        "under `stoker record` (99 Hz), `stoker record --mode wall` (`--waits sampled`, the default) and "
        "`--mode wall --waits followed`, 3 s each, in an order that rotates from round to round.",
        "",
        *rounds_table(CONFIGS, rows, lambda row, c: f"{1e6 / row[c]:.3f}", ": µs a round trip"),
    ]
    lines += ["", "| watched by | µs a round trip (mean) | added per switch off the CPU of the target, ns "
              "(rounds' mean, 95% interval) | throughput / alone (rounds' mean, 95% interval) |",
              "| --- | --- | --- | --- |"]
    for c in CONFIGS:
        trip = statistics.mean(1e6 / row[c] for row in rows)
        added, half = interval([(1e9 / row[c] - 1e9 / row["alone"]) / 2 for row in rows])
        ratio, ratio_half = interval([row[c] / row["alone"] for row in rows])
        lines.append(f"| {c} | {trip:.3f} | {added:.0f} ± {half:.0f} | {ratio:.3f} ± {ratio_half:.3f} |")
    lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

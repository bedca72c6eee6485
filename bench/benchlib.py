"""What the wrk benchmarks share: command-line numbers, wrk runs, confidence intervals,
waiting for stoker's programs to attach, and the report of a build against a baseline."""
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]


def interval(values):
    """Mean and half-width of its 95% confidence interval."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def arg(name, default):
    """The value after `name` on the command line, of `default`'s type."""
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


# `--pin`: wrk runs on the first CPU and the server on the last; the profilers run where the
# scheduler puts them. Unpinned, on a machine with few CPUs, a thread-per-connection server's
# GIL hands off between threads on different CPUs, and its throughput moves by several percent
# from one run to the next whatever watches it: pinned, its threads take turns on one CPU and
# the rounds' ratios come out several times tighter.
PIN = "--pin" in sys.argv and (os.cpu_count() or 1) >= 2


def pinned(role, command):
    """`command` (a list) run on its own CPU with `--pin`: the load generator's (`role`
    "load") or the server's ("server"); unchanged without it."""
    if not PIN:
        return command
    return ["taskset", "-c", str(0 if role == "load" else os.cpu_count() - 1), *command]


def pinning_note():
    """What the reports say of where the processes ran."""
    if not PIN:
        return ""
    return (f" Pinned (`--pin`): wrk on CPU 0 and the server on CPU {os.cpu_count() - 1}, the profilers "
            "unpinned.")


def wrk(port, seconds):
    """wrk (1 thread, 8 keep-alive connections) on GET /sleep/0: (requests, req/s)."""
    out = subprocess.run(
        pinned("load", ["wrk", "-t1", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{port}/sleep/0"]),
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return requests, float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def cpu_seconds(pid):
    """CPU time process `pid` used so far, all its threads, user and system (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu_seconds(pid):
    """CPU time the live threads of process `pid` used so far, to the nanosecond
    (/proc/PID/task/*/schedstat): for a process whose threads outlive the measurement."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def links(pid):
    """BPF links process `pid` holds: how many programs it has attached."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd) == "anon_inode:bpf_link"
        except OSError:
            pass
    return n


def against_baseline(baseline, watching, what, base, this):
    """Report lines of `what` (in ns), measured alternately with the baseline build
    (`base`) and this one (`this`) while `watching`: each build's median and rounds, and the
    rounds' ratios of this build over the baseline."""
    ratios = [t / b for t, b in zip(this, base)]
    m, half = interval(ratios)
    return [
        f"Against the baseline build `{baseline}`, {watching}, alternately in {len(base)} rounds:",
        "",
        f"| build | {what}: median | rounds |",
        "| --- | --- | --- |",
        f"| baseline | {statistics.median(base):.0f} ns | {', '.join(f'{x:.0f}' for x in base)} |",
        f"| this build | {statistics.median(this):.0f} ns | {', '.join(f'{x:.0f}' for x in this)} |",
        "",
        f"This build / baseline, rounds' ratios: **{statistics.median(ratios):.3f}** (median), "
        f"{m:.3f} ± {half:.3f} (mean, 95% interval).",
        "",
    ]


def rounds_table(configs, rows, cell, unit):
    """Markdown lines of a table with a row per round and a column per configuration:
    `cell(row, config)` gives each cell's text, `unit` follows each column's name."""
    lines = ["| round | " + " | ".join(f"{c}{unit}" for c in configs) + " |", "| --- |" + " --- |" * len(configs)]
    for i, row in enumerate(rows):
        lines.append(f"| {i + 1} | " + " | ".join(cell(row, c) for c in configs) + " |")
    return lines

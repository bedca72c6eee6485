#!/usr/bin/env python3
"""Cost of `stoker record --net` on a Python HTTP server under wrk load.

  sudo python3 bench/net_bench.py [--rounds N] [--seconds S] [--out bench/NET_RESULTS.md]

Needs target/release/stoker and wrk. Starts tests/fixtures/net/http_server.py (CPython
3.12, ThreadingHTTPServer) and drives GET /sleep/0 with wrk (1 thread, 8 keep-alive
connections) for S seconds per round, alternating rounds without and with stoker watching
the server (`record --net`, which also samples at 99 Hz). Reports the throughput of each
and their ratio. Two more rounds run with the kernel's BPF run-time statistics on (they
slow every program run a little, so the throughput rounds run without them): one watching
the server gives the network programs' kernel time per request (all runs, target or not,
over the requests served), one watching an idle process instead gives what filtering
everyone else's calls (wrk's, the server's) costs. stoker also measures what the
statistics add to each run on their own (an empty program timed the same way), which is
reported and subtracted.
"""
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
SERVER = ROOT / "tests/fixtures/net/http_server.py"
PYTHON = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions/3.12.1/bin/python3.12"
# Attached once: 12 system call tracepoints, 2 TCP ones and a cpu-clock event per CPU.
LINKS = 14 + os.cpu_count()


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def wrk(port, seconds):
    out = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{port}/sleep/0"],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return requests, float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def links(pid):
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd) == "anon_inode:bpf_link"
        except OSError:
            pass
    return n


def watched_round(target_pid, port, seconds, tmp, kernel_stats=False):
    stoker = subprocess.Popen(
        [str(STOKER), "record", "--net", *(["--kernel-stats"] if kernel_stats else []), "--pid", str(target_pid),
         "-f", "folded", "-o", f"{tmp}/bench.folded"],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while links(stoker.pid) < LINKS:
        if time.monotonic() > deadline or stoker.poll() is not None:
            raise SystemExit(f"stoker did not attach: {stoker.communicate()[1]}")
        time.sleep(0.05)
    requests, rps = wrk(port, seconds)
    stoker.send_signal(2)
    err = stoker.communicate(timeout=60)[1]
    m = re.search(r"network programs ran (\d+) times for (\d+) ns", err)
    runs, ns = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if kernel_stats and not m:
        raise SystemExit(f"no kernel statistics in stoker's summary:\n{err}")
    floor = re.search(r"statistics add (\d+) ns to every run", err)
    served = re.search(r"server GET /sleep/\{id\}\s+(\d+)", err)
    return requests, rps, runs, ns, int(served.group(1)) if served else 0, int(floor.group(1)) if floor else 0


def main():
    rounds, seconds = arg("--rounds", 3), arg("--seconds", 10)
    out = Path(arg("--out", str(ROOT / "bench/NET_RESULTS.md")))
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    # wrk resets its connections at the end; the server's tracebacks about it are noise.
    server = subprocess.Popen([str(PYTHON), str(SERVER)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline())
    rows = []
    try:
        wrk(port, 5)  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                # Which run goes first alternates, so a drift over the run favours neither.
                if r % 2 == 0:
                    base = wrk(port, seconds)
                    watched = watched_round(server.pid, port, seconds, tmp)
                else:
                    watched = watched_round(server.pid, port, seconds, tmp)
                    base = wrk(port, seconds)
                rows.append((base, watched))
                print(f"round {r + 1}: {base[1]:.0f} req/s alone, {watched[1]:.0f} req/s watched", flush=True)
            cost = watched_round(server.pid, port, seconds, tmp, kernel_stats=True)
            idle = subprocess.Popen(["sleep", "3600"])
            try:
                filtering = watched_round(idle.pid, port, seconds, tmp, kernel_stats=True)
            finally:
                idle.kill()
    finally:
        server.kill()
    base_rps = sum(b[1] for b, _ in rows) / rounds
    watched_rps = sum(w[1] for _, w in rows) / rounds
    ratios = sorted(w[1] / b[1] for b, w in rows)
    median = ratios[len(ratios) // 2] if rounds % 2 else (ratios[rounds // 2 - 1] + ratios[rounds // 2]) / 2
    per_req = lambda r: r[3] / max(r[0], 1)  # noqa: E731
    runs_per_req = lambda r: r[2] / max(r[0], 1)  # noqa: E731
    floor = cost[5]
    net_cost = per_req(cost) - floor * runs_per_req(cost)
    net_filter = per_req(filtering) - floor * runs_per_req(filtering)
    lines = [
        "# Network tracing cost (`stoker record --net`)",
        "",
        f"`python3 bench/net_bench.py --rounds {rounds} --seconds {seconds}` on {platform.node()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs: CPython 3.12 ThreadingHTTPServer, "
        "`wrk -t1 -c8` on GET /sleep/0 (keep-alive), runs alternated without and with stoker "
        "(`record --net`, also sampling at 99 Hz), the first of each round's pair alternating too.",
        "",
        "| round | alone req/s | watched req/s | ratio | requests seen by stoker / wrk's |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, (b, w) in enumerate(rows):
        lines.append(f"| {i + 1} | {b[1]:.0f} | {w[1]:.0f} | {w[1] / b[1]:.3f} | {w[4]} / {w[0]} |")
    lines += [
        "",
        f"Throughput watched/alone: mean of the rounds' means **{watched_rps / base_rps:.3f}**, "
        f"median of the paired ratios {median:.3f}.",
        "",
        "Requests seen: stoker's count of GET /sleep/{id} against wrk's; stoker also counts the "
        "requests (at most one per connection) answered after wrk stopped counting.",
        "",
        "Kernel cost, from the kernel's BPF run-time statistics (`record --net --kernel-stats`, "
        "separate rounds: the statistics slow every run):",
        "",
        "| round | req/s | program runs per request | BPF time per request | of which the statistics' own | program time per request |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| watching the server | {cost[1]:.0f} | {runs_per_req(cost):.2f} | {per_req(cost):.0f} ns | "
        f"{floor * runs_per_req(cost):.0f} ns | **{net_cost:.0f} ns** |",
        f"| watching an idle process | {filtering[1]:.0f} | {runs_per_req(filtering):.2f} | {per_req(filtering):.0f} ns | "
        f"{floor * runs_per_req(filtering):.0f} ns | {net_filter:.0f} ns |",
        "",
        "Every run on the host counts, a target's or not, divided by the requests wrk completed. "
        f"The statistics read a clock on each side of every run: stoker times an empty program "
        f"the same way ({floor} ns per run) and that much per run is subtracted. Watching an idle "
        "process, every run is a call of a process that is not a target (wrk's and the server's) "
        "dismissed by the target check: that is what filtering costs everyone else; watching the "
        f"server adds {net_cost - net_filter:.0f} ns per request.",
        "",
    ]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


main()

#!/usr/bin/env python3
"""Cost of `stoker record --net` on a Python HTTP server under wrk load.

  sudo python3 bench/net_bench.py [--rounds N] [--seconds S] [--out bench/NET_RESULTS.md]

Needs target/release/stoker and wrk. Starts tests/fixtures/net/http_server.py (CPython
3.12, ThreadingHTTPServer) and drives GET /sleep/0 with wrk (1 thread, 8 keep-alive
connections) for S seconds per round, alternating rounds without and with stoker watching
the server (`record --net --kernel-stats`, which also samples at 99 Hz). Reports the
throughput of each, their ratio, and the network programs' kernel time per request from
the kernel's BPF run-time statistics (all runs, target or not, over the requests served).
A last round watches an idle process instead of the server: its program time is what
filtering everyone else's calls (wrk's, the server's) costs, the rest is the server's own.
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
# Attached once: 16 system call tracepoints, 2 TCP ones and a cpu-clock event per CPU.
LINKS = 18 + os.cpu_count()


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


def watched_round(target_pid, port, seconds, tmp):
    stoker = subprocess.Popen(
        [str(STOKER), "record", "--net", "--kernel-stats", "--pid", str(target_pid), "-f", "folded",
         "-o", f"{tmp}/bench.folded"],
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
    served = re.search(r"server GET /sleep/\{id\}\s+(\d+)", err)
    return requests, rps, runs, ns, int(served.group(1)) if served else 0


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
        wrk(port, 2)  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                base = wrk(port, seconds)
                watched = watched_round(server.pid, port, seconds, tmp)
                rows.append((base, watched))
                print(f"round {r + 1}: {base[1]:.0f} req/s alone, {watched[1]:.0f} req/s watched", flush=True)
            idle = subprocess.Popen(["sleep", "3600"])
            try:
                filtering = watched_round(idle.pid, port, seconds, tmp)
            finally:
                idle.kill()
    finally:
        server.kill()
    base_rps = sum(b[1] for b, _ in rows) / rounds
    watched_rps = sum(w[1] for _, w in rows) / rounds
    total_req = sum(w[0] for _, w in rows)
    total_ns = sum(w[3] for _, w in rows)
    total_runs = sum(w[2] for _, w in rows)
    lines = [
        "# Network tracing cost (`stoker record --net`)",
        "",
        f"`python3 bench/net_bench.py --rounds {rounds} --seconds {seconds}` on {platform.node()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs: CPython 3.12 ThreadingHTTPServer, "
        "`wrk -t1 -c8` on GET /sleep/0 (keep-alive), rounds alternated without and with stoker "
        "(`record --net --kernel-stats`, also sampling at 99 Hz).",
        "",
        "| round | alone req/s | watched req/s | ratio | requests seen by stoker / wrk's |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, (b, w) in enumerate(rows):
        lines.append(f"| {i + 1} | {b[1]:.0f} | {w[1]:.0f} | {w[1] / b[1]:.3f} | {w[4]} / {w[0]} |")
    lines += [
        "",
        f"Mean throughput ratio watched/alone: **{watched_rps / base_rps:.3f}**.",
        "",
        "Requests seen: stoker's count of GET /sleep/{id} against wrk's; stoker also counts the "
        "requests (at most one per connection) answered after wrk stopped counting.",
        "",
        f"Network programs in the kernel (BPF run-time statistics): {total_runs} runs, "
        f"{total_runs / max(total_req, 1):.1f} runs and {total_ns / max(total_runs, 1):.0f} ns per run, "
        f"**{total_ns / max(total_req, 1):.0f} ns per request** "
        "(every run on the host during the rounds, divided by the requests wrk completed; the "
        "run-time statistics themselves add a clock read on each side of every run).",
        "",
        f"Filtering alone: a round with stoker watching an idle process instead of the server "
        f"({filtering[1]:.0f} req/s) ran the programs {filtering[2] / max(filtering[0], 1):.1f} times and "
        f"**{filtering[3] / max(filtering[0], 1):.0f} ns per request**, every run a call of a process "
        "that is not a target (wrk's and the server's) dismissed by the target check; watching the "
        f"server adds **{total_ns / max(total_req, 1) - filtering[3] / max(filtering[0], 1):.0f} ns per "
        "request**.",
        "",
    ]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


main()

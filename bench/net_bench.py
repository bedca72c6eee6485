#!/usr/bin/env python3
"""Cost of `stoker record --net` on Python HTTP servers under wrk load.

  sudo python3 bench/net_bench.py [--rounds N] [--seconds S] [--out bench/NET_RESULTS.md]
                                  [--baseline PATH-TO-AN-OLDER-STOKER] [--pin]

Needs target/release/stoker, wrk, and aiohttp for CPython 3.11 (`cargo xtask setup`).
Two servers, each driven on GET /sleep/0 by wrk (1 thread, 8 keep-alive connections):
tests/fixtures/net/http_server.py (CPython 3.12 ThreadingHTTPServer: a thread per
connection) and tests/fixtures/net/aiohttp_server.py (CPython 3.11, aiohttp: one asyncio
thread). Each round runs wrk for S seconds five times: the server alone, watched by
`stoker record` (CPU sampling at 99 Hz only), by `stoker record --net` (sampling and
network tracing), by `stoker record --net --net-detail requests` (requests, connections
and accept queues only: none of the programs that run for every TCP segment and write of
the host) and by `stoker record --net` with `STOKER_NET_PROGRAMS=empty` (the network
programs attached, each returning as it starts: what the attach points cost alone, the
floor of any program there); the order rotates from round to round so a drift over the run
favours none. Reports each round's throughput, and each watched configuration's throughput over
the unwatched one's (mean of the rounds' means, and median of the per-round ratios); and,
in the same runs, the CPU time per request the server used while wrk ran (against its own
alone) and stoker's own.

Kernel cost, in separate rounds with the kernel's BPF run-time statistics on (they slow
every program run, so the throughput rounds run without them): watching each server gives
the network programs' kernel time per request (all runs, target or not, over the requests
served), with `--net-detail requests` too; watching an idle process instead gives what
filtering everyone else's calls (wrk's, the server's) costs. stoker also times an empty program the same way, the
statistics' own cost per run, which is reported and subtracted.

With --baseline, the kernel cost rounds alternate between that stoker build and this one
(N rounds each, watching the server): what this build's programs cost per request against
the baseline's, in one run on one machine, where absolute figures move from day to day.

With --pin, wrk runs on the first CPU and the server on the last (see `benchlib.PIN`), and
the report goes to bench/NET_PINNED.md unless --out says otherwise.
"""
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import (PIN, against_baseline, arg, cpu_seconds, interval, links, pinned, pinning_note,
                      threads_cpu_seconds, wrk)

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
SERVERS = [
    ("ThreadingHTTPServer (CPython 3.12)", VERSIONS / "3.12.1/bin/python3.12", "http_server.py"),
    ("aiohttp (CPython 3.11)", VERSIONS / "3.11.7/bin/python3.11", "aiohttp_server.py"),
]
# Attached by `record`: a cpu-clock event per CPU; with --net at least 11 more (the exits of
# accept, accept4, connect and close, 2 socket tracepoints, 5 TCP ones; kernels without the
# socket tracepoints follow 8 more system call exits instead).
SAMPLING_LINKS = os.cpu_count()
NET_LINKS = 11 + os.cpu_count()
# `--net-detail requests` attaches neither `sk_data_ready`, `tcp_probe` nor `tcp_sendmsg_locked`.
REQUESTS_ONLY = ["--net-detail", "requests"]
REQUESTS_LINKS = NET_LINKS - 3
CONFIGS = ["alone", "sampling", "sampling + network", "sampling + network, requests only",
           "sampling + empty network programs"]
# How each watched configuration is named in the report.
LABELS = {
    "sampling": "`record`",
    "sampling + network": "`record --net`",
    "sampling + network, requests only": "`record --net --net-detail requests`",
    "sampling + empty network programs": "`record --net`, programs empty",
}
# `STOKER_NET_PROGRAMS=empty`: the network programs attached as always, each returning as it
# starts: what the attach points cost alone.
EMPTY = {"STOKER_NET_PROGRAMS": "empty"}


def measured_wrk(port, seconds, server_pid, stoker_pid=None):
    """wrk against the server: (requests, req/s, CPU seconds the server used meanwhile, and
    stoker's, if it runs)."""
    server, stoker = cpu_seconds(server_pid), threads_cpu_seconds(stoker_pid) if stoker_pid else 0
    requests, rps = wrk(port, seconds)
    server = cpu_seconds(server_pid) - server
    stoker = threads_cpu_seconds(stoker_pid) - stoker if stoker_pid else 0.0
    return requests, rps, server, stoker


def watched(target_pid, port, seconds, tmp, net=True, kernel_stats=False, stoker=STOKER, server_pid=None,
            env=None, requests_only=False):
    """wrk against the server (`server_pid`, by default the target) while stoker watches
    `target_pid`, with `env` added to its environment (`requests_only`: `--net-detail
    requests`): (requests, req/s, program runs, program ns, requests stoker saw, statistics'
    own ns per run, CPU seconds the server used, CPU seconds stoker used)."""
    stoker = subprocess.Popen(
        [str(stoker), "record", *(["--net"] if net else []), *(REQUESTS_ONLY if requests_only else []),
         *(["--kernel-stats"] if kernel_stats else []),
         "--pid", str(target_pid), "-f", "folded", "-o", f"{tmp}/bench.folded"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while links(stoker.pid) < (SAMPLING_LINKS if not net else REQUESTS_LINKS if requests_only else NET_LINKS):
        if time.monotonic() > deadline or stoker.poll() is not None:
            raise SystemExit(f"stoker did not attach: {stoker.communicate()[1]}")
        time.sleep(0.05)
    requests, rps, server_cpu, stoker_cpu = measured_wrk(port, seconds, server_pid or target_pid, stoker.pid)
    stoker.send_signal(2)
    err = stoker.communicate(timeout=60)[1]
    m = re.search(r"network programs ran (\d+) times for (\d+) ns", err)
    if kernel_stats and not m:
        raise SystemExit(f"no kernel statistics in stoker's summary:\n{err}")
    runs, ns = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    floor = re.search(r"statistics add (\d+) ns to every run", err)
    served = re.search(r"server GET /sleep/\{id\}\s+(\d+)", err)
    return (requests, rps, runs, ns, int(served.group(1)) if served else 0, int(floor.group(1)) if floor else 0,
            server_cpu, stoker_cpu)


def run_config(config, server, port, seconds, tmp):
    """(requests, req/s, requests stoker saw, server CPU seconds, stoker CPU seconds)."""
    if config == "alone":
        requests, rps, server_cpu, _ = measured_wrk(port, seconds, server.pid)
        return requests, rps, 0, server_cpu, 0.0
    r = watched(server.pid, port, seconds, tmp, net="network" in config, env=EMPTY if "empty" in config else None,
                requests_only="requests only" in config)
    return r[0], r[1], r[4], r[6], r[7]


def program_ns(r):
    """Program time per request of a kernel cost round, the statistics' own cost taken out."""
    return (r[3] - r[5] * r[2]) / max(r[0], 1)


def bench_server(name, python, script, rounds, seconds, tmp, baseline=None):
    # wrk resets its connections at the end; the servers' tracebacks about it are noise.
    server = subprocess.Popen(pinned("server", [str(python), str(ROOT / "tests/fixtures/net" / script)]),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline())
    rows = []
    try:
        wrk(port, 5)  # warm-up
        for r in range(rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            row = {c: run_config(c, server, port, seconds, tmp) for c in order}
            rows.append(row)
            print(f"{name} round {r + 1}: " + ", ".join(f"{c} {row[c][1]:.0f} req/s" for c in CONFIGS), flush=True)
        cost = watched(server.pid, port, seconds, tmp, kernel_stats=True)
        cost_requests = watched(server.pid, port, seconds, tmp, kernel_stats=True, requests_only=True)
        idle = subprocess.Popen(["sleep", "3600"])
        try:
            filtering = watched(idle.pid, port, seconds, tmp, kernel_stats=True, server_pid=server.pid)
        finally:
            idle.kill()
        against = {"baseline": [], "this build": []}
        for r in range(rounds if baseline else 0):
            builds = [("baseline", baseline), ("this build", STOKER)]
            for label, build in builds[r % 2:] + builds[:r % 2]:
                ns = program_ns(watched(server.pid, port, seconds, tmp, kernel_stats=True, stoker=build))
                against[label].append(ns)
            print(f"{name} kernel cost round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} ns" for k, v in against.items()),
                  flush=True)
    finally:
        server.kill()
    return rows, (cost, cost_requests), filtering, against


def report(name, rows, costs, filtering, against, baseline):
    per_req = lambda r: r[3] / max(r[0], 1)  # noqa: E731
    runs_per_req = lambda r: r[2] / max(r[0], 1)  # noqa: E731
    cost, cost_requests = costs
    floor = cost[5]
    net_cost = per_req(cost) - floor * runs_per_req(cost)
    requests_cost = per_req(cost_requests) - cost_requests[5] * runs_per_req(cost_requests)
    net_filter = per_req(filtering) - floor * runs_per_req(filtering)
    mean = {c: statistics.mean(row[c][1] for row in rows) for c in CONFIGS}
    lines = [
        f"## {name}",
        "",
        "| round | alone req/s | sampling req/s | sampling + network req/s | network: requests seen by stoker / wrk's "
        "| sampling + network, requests only req/s | requests only: seen by stoker / wrk's "
        "| sampling + empty network programs req/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, row in enumerate(rows):
        net, only = row["sampling + network"], row["sampling + network, requests only"]
        empty = row["sampling + empty network programs"]
        lines.append(f"| {i + 1} | {row['alone'][1]:.0f} | {row['sampling'][1]:.0f} | {net[1]:.0f} | {net[2]} / {net[0]} "
                     f"| {only[1]:.0f} | {only[2]} / {only[0]} | {empty[1]:.0f} |")
    lines += ["", "| watched by | throughput / alone (mean of means) | rounds' ratios: mean, 95% interval | median | range |",
              "| --- | --- | --- | --- | --- |"]
    for c in CONFIGS[1:]:
        ratios = [row[c][1] / row["alone"][1] for row in rows]
        m, half = interval(ratios)
        lines.append(f"| {LABELS[c]} ({c}) | **{mean[c] / mean['alone']:.3f}** | "
                     f"{m:.3f} ± {half:.3f} | {statistics.median(ratios):.3f} | {min(ratios):.3f} to {max(ratios):.3f} |")
    us = lambda r, i: r[i] * 1e6 / max(r[0], 1)  # noqa: E731 (CPU seconds at index i, per request, in µs)
    lines += ["", "CPU time per request in the same runs, while wrk ran: the server's (all its threads, the "
              "programs that run in its context included) and stoker's own (its threads, in userspace and "
              "in the kernel).", "",
              "| watched by | server CPU per request (mean of rounds) | server CPU / alone: rounds' ratios, mean, "
              "95% interval | stoker's CPU per request |", "| --- | --- | --- | --- |",
              f"| nothing (alone) | {statistics.mean(us(row['alone'], 3) for row in rows):.1f} µs | 1 | - |"]
    for c in CONFIGS[1:]:
        m, half = interval([us(row[c], 3) / us(row["alone"], 3) for row in rows])
        lines.append(f"| {LABELS[c]} ({c}) | "
                     f"{statistics.mean(us(row[c], 3) for row in rows):.1f} µs | **{m:.3f}** ± {half:.3f} | "
                     f"{statistics.mean(us(row[c], 4) for row in rows):.2f} µs |")
    lines += [
        "",
        "| kernel cost round | req/s | program runs per request | BPF time per request | of which the statistics' own | program time per request |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| watching the server | {cost[1]:.0f} | {runs_per_req(cost):.2f} | {per_req(cost):.0f} ns | "
        f"{floor * runs_per_req(cost):.0f} ns | **{net_cost:.0f} ns** |",
        f"| watching the server, `--net-detail requests` | {cost_requests[1]:.0f} | {runs_per_req(cost_requests):.2f} | "
        f"{per_req(cost_requests):.0f} ns | {cost_requests[5] * runs_per_req(cost_requests):.0f} ns | "
        f"**{requests_cost:.0f} ns** |",
        f"| watching an idle process | {filtering[1]:.0f} | {runs_per_req(filtering):.2f} | {per_req(filtering):.0f} ns | "
        f"{floor * runs_per_req(filtering):.0f} ns | {net_filter:.0f} ns |",
        "",
        f"The statistics' own cost: {floor} ns per run (an empty program timed the same way). Watching the "
        f"server adds {net_cost - net_filter:.0f} ns per request to what filtering costs.",
        "",
    ]
    if against["baseline"]:
        lines += against_baseline(baseline, "watching the server", "program time per request", against["baseline"],
                                  against["this build"])
    return lines


def main():
    rounds, seconds = arg("--rounds", 3), arg("--seconds", 10)
    out = Path(arg("--out", str(ROOT / ("bench/NET_PINNED.md" if PIN else "bench/NET_RESULTS.md"))))
    baseline = arg("--baseline", "") or None
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    lines = [
        "# Network tracing cost (`stoker record --net`)",
        "",
        f"`python3 bench/net_bench.py --rounds {rounds} --seconds {seconds}{' --pin' if PIN else ''}"
        f"{f' --baseline {baseline}' if baseline else ''}` on {platform.node()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs. `wrk -t1 -c8` on GET /sleep/0 (keep-alive) "
        f"for {seconds} s per run; each round runs the server alone, watched by `stoker record` (CPU "
        "sampling at 99 Hz), by `stoker record --net` (sampling and network tracing), by `stoker record --net "
        "--net-detail requests` (requests, connections and accept queues only: no socket-queue times and no "
        "stalls, so neither `sk_data_ready`, `tcp_probe` nor `tcp_sendmsg_locked` is attached) and by `stoker "
        "record --net` with `STOKER_NET_PROGRAMS=empty` (the same programs as `--net` attached, each returning "
        "as it starts: what the attach points cost on their own), in an order that rotates from round to round."
        f"{pinning_note()}",
        "",
        "Requests seen: stoker's count of GET /sleep/{id} against wrk's; stoker also counts the requests "
        "(at most one per connection) answered after wrk stopped counting.",
        "",
        "Kernel cost, from the kernel's BPF run-time statistics (`record --net --kernel-stats`) in separate "
        "rounds, since the statistics slow every run: every network program run on the host counts, a "
        "target's or not, divided by the requests wrk completed. The statistics read a clock on each side "
        "of every run; stoker times an empty program the same way and that much per run is subtracted. "
        "Watching an idle process, every run is a call of a process that is not a target (wrk's and the "
        "server's) dismissed by the target check: what filtering costs everyone else.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, python, script in SERVERS:
            rows, cost, filtering, against = bench_server(name, python, script, rounds, seconds, tmp, baseline)
            lines += report(name, rows, cost, filtering, against, baseline)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


main()

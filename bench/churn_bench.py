#!/usr/bin/env python3
"""The node agent beside process, pid and request churn.

  sudo python3 bench/churn_bench.py [--processes N] [--rate R] [--paths K] [--pid-max P]
                                    [--out bench/CHURN_RESULTS.md]

Needs target/release/stoker (`cargo build --release`) and the OTLP receiver's packages
(`cargo xtask setup` installs them). Runs tests/fixtures/hostile/churn.py beside
`stoker agent` (OTLP metrics and profiles over HTTP every 2 s to
tests/fixtures/otlp_receiver.py): N short-lived CPython processes (default 1,200, R a second,
each spinning 2 s in a function of its own name, over CPython 3.8, 3.11 (Debian's), 3.12 and
3.13), as many that exit at once, a pre-fork server whose workers exit after 200 requests, K
requests to distinct paths (default 100,000), and pid_max lowered to P (default 2,048) for
the run so that pids wrap around again and again and new processes take the pids of
exited ones (restored after).

Every 5 s it reads the agent's RSS and whether /healthz answers 200. At the end it compares
the samples of each short process's own function with the CPU time the process measured
there, and the samples in the workers' handle_request with theirs. Targets: RSS plateaus
(the second half's peak within 10% of the first half's), /healthz always 200, every short
process sampled and named, the workers' samples their CPU time.
"""
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
CHURN = ROOT / "tests/fixtures/hostile/churn.py"
RECEIVER = ROOT / "tests/fixtures/otlp_receiver.py"
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
PYTHONS = [
    PYENV / "3.12.1/bin/python3.12",
    PYENV / "3.8.18/bin/python3.8",
    Path("/usr/bin/python3.11"),
    PYENV / "3.13.0/bin/python3.13",
]
HZ = 99


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def wait_port(port, proc, what):
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"churn_bench: {what} did not start")
            time.sleep(0.1)


def main():
    processes, rate = arg("--processes", 1200), arg("--rate", 4.0)
    paths, pid_max = arg("--paths", 100_000), arg("--pid-max", 2048)
    out = Path(arg("--out", str(ROOT / "bench/CHURN_RESULTS.md")))
    if os.geteuid() != 0:
        raise SystemExit("churn_bench: run as root (the agent loads BPF programs; pid_max is lowered)")
    if not STOKER.exists():
        raise SystemExit("churn_bench: build the agent first: cargo build --release")
    work = Path(tempfile.mkdtemp(prefix="stoker-churn-"))
    otlp, http = free_port(), free_port()
    receiver = subprocess.Popen(["python3", str(RECEIVER), "http", str(otlp), str(work)], stderr=subprocess.DEVNULL)
    wait_port(otlp, receiver, "the OTLP receiver (grpcio, opentelemetry-proto?)")
    config = work / "agent.yaml"
    config.write_text(
        f"sample_rate_hz: {HZ}\nexport_interval: 2s\nprometheus:\n  listen: 127.0.0.1:{http}\n"
        "otlp:\n  profiles: true\n"
    )
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp}")
    env.pop("OTEL_EXPORTER_OTLP_PROTOCOL", None)
    agent = subprocess.Popen([str(STOKER), "agent", "--config", str(config)], env=env,
                             stderr=open(work / "agent.log", "w"))
    wait_port(http, agent, "the agent")
    old_pid_max = Path("/proc/sys/kernel/pid_max").read_text().strip()
    Path("/proc/sys/kernel/pid_max").write_text(str(pid_max))
    report = work / "churn.json"
    rss, unhealthy = [], 0
    started = time.monotonic()
    try:
        churn = subprocess.Popen(
            ["python3", str(CHURN), "run", str(report), "--pythons", ",".join(map(str, PYTHONS)),
             "--processes", str(processes), "--rate", str(rate), "--life", "2", "--flash", str(processes),
             "--paths", str(paths), "--max-requests", "200"]
        )
        next_look = started
        while churn.poll() is None:
            if time.monotonic() >= next_look:
                next_look += 5
                rss.append((time.monotonic() - started, rss_mb(agent.pid)))
                unhealthy += not healthy(http)
            time.sleep(0.2)
    finally:
        Path("/proc/sys/kernel/pid_max").write_text(old_pid_max)
    if churn.returncode != 0:
        raise SystemExit(f"churn_bench: churn.py failed ({churn.returncode})")
    text = metrics(http)
    agent.terminate()
    agent.wait(timeout=30)
    receiver.terminate()
    receiver.wait()
    result = json.loads(report.read_text())
    write(out, result, rss, unhealthy, text, work, processes, rate, paths, pid_max)
    print(out.read_text())


def samples_by_function(work):
    by_function = collections.Counter()
    for line in open(work / "profiles.ndjson"):
        for p in json.loads(line)["profiles"]:
            for s in p["samples"]:
                for name in {f["function"] for f in s["stack"]}:
                    by_function[name] += s["values"][0]
    return by_function


def write(out, result, rss, unhealthy, text, work, processes, rate, paths, pid_max):
    by_function = samples_by_function(work)
    shorts = result["short"]
    ratios = []
    unsampled = []
    for s in shorts:
        expected = s["cpu"] * HZ
        got = by_function.get(s["function"], 0)
        if got == 0:
            unsampled.append(s)
        if expected >= 20:
            ratios.append(got / expected)
    ratios.sort()
    worker_cpu = sum(w["cpu"] for w in result["workers"])
    worker_samples = by_function.get("handle_request", 0)
    short_cpu = sum(s["cpu"] for s in shorts)
    short_samples = sum(by_function.get(s["function"], 0) for s in shorts)
    half = len(rss) // 2
    first, second = max(r for _, r in rss[:half]), max(r for _, r in rss[half:])
    routes = collections.defaultdict(set)
    for line in text.splitlines():
        if line.startswith("http_server_request_duration_seconds_count") and "http_route=" in line:
            pid = line.split('process_pid="')[1].split('"')[0]
            routes[pid].add(line.split('http_route="')[1].split('"')[0])
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    pct = lambda q: ratios[min(len(ratios) - 1, int(q * len(ratios)))]
    uname = os.uname()
    lines = [
        "# Churn: the node agent beside process, pid and request churn",
        "",
        f"`sudo python3 bench/churn_bench.py --processes {processes} --rate {rate} --paths {paths} "
        f"--pid-max {pid_max}` on {uname.release}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}. The agent (release build) exports OTLP metrics and "
        f"profiles every 2 s at {HZ} Hz.",
        "",
        "## What ran",
        "",
        f"- {len(shorts)} short-lived CPython processes ({rate}/s, each spinning 2 s in a function "
        f"of its own name; 3.12, 3.8, Debian's 3.11, 3.13 in turn) and {result['flash']} that "
        "exit at once",
        f"- a pre-fork server: {len(result['workers'])} workers, each exiting after 200 requests",
        f"- {result['requests']} requests to {paths} distinct paths (`/shop/<word>/<word>`), "
        f"{result['failed_requests']} failed",
        f"- pid_max {pid_max}: pids wrapped around {result['wraps']} times; "
        f"{len(result['reused_pids'])} pids served more than one process",
        f"- {result['seconds']:.0f} s in all",
        "",
        "## Results",
        "",
        "| | measured | target |",
        "|---|---|---|",
        f"| short processes sampled and named | {len(shorts) - len(unsampled)} of {len(shorts)} | all |",
        f"| their samples / their CPU time x {HZ} Hz, all together | {short_samples / (short_cpu * HZ):.3f} | ~1 |",
        f"| the same per process (min / p10 / median; {len(ratios)} with 20+ expected) | "
        f"{ratios[0]:.2f} / {pct(0.1):.2f} / {statistics.median(ratios):.2f} | |",
        f"| workers' `handle_request` samples / their CPU time x {HZ} Hz | "
        f"{worker_samples / (worker_cpu * HZ):.3f} | ~1 |",
        f"| agent RSS peak, first half / second half | {first:.1f} MB / {second:.1f} MB | second within 10% |",
        f"| /healthz not 200 (one look every 5 s) | {unhealthy} of {len(rss)} | 0 |",
        f"| routes per process in /metrics at the end (most) | {max((len(r) for r in routes.values()), default=0)} | <= 101 |",
        f"| lines in /metrics at the end | {series} | bounded |",
        "",
        "## Agent RSS (MB) over the run",
        "",
        "| s | " + " | ".join(f"{t:.0f}" for t, _ in rss[:: max(1, len(rss) // 12)]) + " |",
        "|---|" + "---|" * len(rss[:: max(1, len(rss) // 12)]),
        "| RSS | " + " | ".join(f"{r:.1f}" for _, r in rss[:: max(1, len(rss) // 12)]) + " |",
        "",
    ]
    if unsampled:
        lines += ["Short processes without a sample of their function:", ""]
        lines += [f"- pid {s['pid']} {s['function']} ({s['python']}, {s['cpu']:.3f} s)" for s in unsampled]
        lines.append("")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

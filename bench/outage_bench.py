#!/usr/bin/env python3
"""Export under a receiver outage and a receiver size limit.

  sudo python3 bench/outage_bench.py [--down-minutes M] [--out bench/OUTAGE_RESULTS.md]

Needs target/release/stoker and the OTLP receiver's packages (grpcio, opentelemetry-proto;
`cargo xtask setup` installs them). 8 busy CPython 3.12 processes (niced), `stoker agent` exporting
metrics and OTLP profiles over gRPC every 5 s to tests/fixtures/otlp_receiver.py, whose
receive limit is 64 KiB (a stand-in for the Collector's 4 MiB that an 8-process profile
request exceeds; the agent's `otlp.max_request_bytes` is set to match, so requests are
split by process). Phases: receiver up for 1 minute, down for M minutes (default 10), up
again for 2 minutes. Every 5 s it reads the agent's RSS and its export counters from
/metrics. Targets: RSS stays under the queues' byte bound plus the agent's own memory,
lost batches are counted, and delivery resumes within two intervals of the receiver's return.
"""
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
WORKLOAD = ROOT / "tests/fixtures/python/workload.py"
RECEIVER = ROOT / "tests/fixtures/otlp_receiver.py"
PYTHON = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions/3.12.1/bin/python3.12"
PROCESSES = 8
LIMIT = 64 << 10
QUEUE_BYTES = 8 << 20
INTERVAL = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counter(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lines(path):
    try:
        return sum(1 for _ in open(path))
    except FileNotFoundError:
        return 0


def receiver(port, out):
    proc = subprocess.Popen(["python3", str(RECEIVER), "grpc", str(port), str(out), str(LIMIT)],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the OTLP receiver did not start (grpcio, opentelemetry-proto?)")
            time.sleep(0.1)


def main():
    down = float(sys.argv[sys.argv.index("--down-minutes") + 1]) if "--down-minutes" in sys.argv else 10.0
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else ROOT / "bench/OUTAGE_RESULTS.md"
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    phases = [("up", 60.0), ("down", down * 60), ("back", 120.0)]
    total = sum(s for _, s in phases)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        busy = [
            # Niced: the bench measures the agent's memory and delivery, not CPU shares.
            subprocess.Popen([str(PYTHON), str(WORKLOAD), "shares", str(total + 60), f"{tmp}/{i}.json"],
                             preexec_fn=lambda: os.nice(19))
            for i in range(PROCESSES)
        ]
        otlp, http = free_port(), free_port()
        config = tmp / "agent.yaml"
        config.write_text(
            f"export_interval: {INTERVAL}s\nprometheus:\n  listen: 127.0.0.1:{http}\n"
            f"otlp:\n  profiles: true\n  max_request_bytes: {LIMIT}\n"
            f"queue:\n  max_bytes: {QUEUE_BYTES}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{otlp}"
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
        received = tmp / "received"
        received.mkdir()
        rx = receiver(otlp, received)
        agent = subprocess.Popen([str(STOKER), "agent", "--config", str(config)], env=env,
                                 stderr=open(tmp / "agent.log", "w"))
        start = time.monotonic()
        back_at = None
        first_after_back = None
        try:
            for name, seconds in phases:
                if name == "down":
                    rx.kill()
                    rx.wait()
                elif name == "back":
                    before = lines(received / "metrics.ndjson")
                    rx = receiver(otlp, received)
                    back_at = time.monotonic()
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    time.sleep(INTERVAL)
                    try:
                        text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
                    except OSError:
                        text = ""
                    now = time.monotonic() - start
                    got = lines(received / "metrics.ndjson") + lines(received / "profiles.ndjson")
                    if name == "back" and first_after_back is None and lines(received / "metrics.ndjson") > before:
                        first_after_back = time.monotonic() - back_at
                    rows.append((now, name, rss_mb(agent.pid), counter(text, "stoker_export_failures_total"),
                                 counter(text, "stoker_export_dropped_batches_total"), got))
        finally:
            agent.send_signal(15)
            _, status, usage = os.wait4(agent.pid, 0)
            rx.kill()
            rx.wait()
            for p in busy:
                p.kill()
                p.wait()
            # The agent's warnings, each distinct message once (numbers blanked), with its count.
            warnings = {}
            for line in open(tmp / "agent.log", errors="replace"):
                if "WARN" in line or "ERROR" in line:
                    key = " ".join("N" if w.strip(",:()").replace(".", "").isdigit() else w
                                   for w in line.split()[1:])[:200]
                    warnings[key] = warnings.get(key, 0) + 1
    by_phase = {}
    for now, name, rss, failures, dropped, got in rows:
        p = by_phase.setdefault(name, {"rss": [], "failures": [], "dropped": [], "got": []})
        p["rss"].append(rss)
        p["failures"].append(failures)
        p["dropped"].append(dropped)
        p["got"].append(got)
    out_lines = [
        "# Export under a receiver outage and a size limit",
        "",
        f"Machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs. "
        f"Date: {time.strftime('%Y-%m-%d')}. Command: `python3 bench/outage_bench.py --down-minutes {down:g}`.",
        "",
        f"{PROCESSES} busy CPython 3.12 processes (niced); `stoker agent` exporting metrics and OTLP profiles over gRPC "
        f"every {INTERVAL} s; receiver limit and `otlp.max_request_bytes` {LIMIT >> 10} KiB; "
        f"`queue.max_bytes` {QUEUE_BYTES >> 20} MiB per exporter (two exporters). Agent exit status {status}, "
        f"peak RSS {usage.ru_maxrss / 1024:.1f} MB.",
        "",
        "| phase | seconds | RSS MB (min-max) | export failures at end | dropped batches at end | records received at end |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds in phases:
        p = by_phase.get(name)
        if not p:
            continue
        out_lines.append(
            f"| {name} | {seconds:.0f} | {min(p['rss']):.1f}-{max(p['rss']):.1f} | {p['failures'][-1]:.0f} "
            f"| {p['dropped'][-1]:.0f} | {p['got'][-1]} |"
        )
    delay = f"{first_after_back:.1f} s" if first_after_back is not None else "never"
    bound = 2 * QUEUE_BYTES / (1 << 20) + max(by_phase["up"]["rss"])
    out_lines += [
        "",
        f"First metrics delivered after the receiver came back: {delay} (export interval {INTERVAL} s).",
        f"RSS bound (two queues of {QUEUE_BYTES >> 20} MiB over the RSS before the outage): {bound:.1f} MB; "
        f"highest RSS during the outage: {max(by_phase['down']['rss']):.1f} MB.",
        "",
        "RSS over time (every 30 s):",
        "",
        "| s | phase | RSS MB | failures | dropped | received |",
        "|---|---|---|---|---|---|",
    ]
    for i, (now, name, rss, failures, dropped, got) in enumerate(rows):
        if i % 6 == 0 or i == len(rows) - 1:
            out_lines.append(f"| {now:.0f} | {name} | {rss:.1f} | {failures:.0f} | {dropped:.0f} | {got} |")
    out_lines += ["", "Agent warnings (distinct, numbers as N):", ""]
    out_lines += [f"- {n} x `{w}`" for w, n in sorted(warnings.items(), key=lambda kv: -kv[1])] or ["- none"]
    out_lines.append("")
    print("\n".join(out_lines))
    out.write_text("\n".join(out_lines))


if __name__ == "__main__":
    main()

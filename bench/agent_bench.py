#!/usr/bin/env python3
"""Node agent overhead: stoker agent at 19 Hz with 20 busy CPython processes.

  sudo python3 bench/agent_bench.py [--minutes M] [--out bench/AGENT_RESULTS.md]

Needs target/release/stoker. Starts 20 CPU-bound workload processes (CPython 3.12), runs
`stoker agent` for M minutes (default 5) with its default configuration exporting to no
endpoint (metrics on /metrics only), then reports the agent's own CPU time (as % of one
core) and peak RSS from wait4, and the samples it took. Targets: <= 1 % of one core and
<= 100 MB RSS.
"""
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
WORKLOAD = ROOT / "tests/fixtures/python/workload.py"
PYTHON = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions/3.12.1/bin/python3.12"
PROCESSES = 20


def main():
    minutes = float(sys.argv[sys.argv.index("--minutes") + 1]) if "--minutes" in sys.argv else 5.0
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else ROOT / "bench/AGENT_RESULTS.md"
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    seconds = minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        busy = [
            subprocess.Popen([str(PYTHON), str(WORKLOAD), "shares", str(seconds + 30), f"{tmp}/{i}.json"])
            for i in range(PROCESSES)
        ]
        time.sleep(2)
        config = Path(tmp) / "agent.yaml"
        config.write_text("prometheus:\n  listen: 127.0.0.1:19465\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        start = time.monotonic()
        agent = subprocess.Popen([str(STOKER), "agent", "--config", str(config)], env=env,
                                 stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        metrics = urllib.request.urlopen("http://127.0.0.1:19465/metrics", timeout=5).read().decode()
        agent.send_signal(15)
        _, status, usage = os.wait4(agent.pid, 0)
        wall = time.monotonic() - start
        for p in busy:
            p.kill()
            p.wait()
    samples = next(l.split()[-1] for l in metrics.splitlines() if l.startswith("stoker_samples_total"))
    tracked = next(l.split()[-1] for l in metrics.splitlines() if l.startswith("stoker_processes_tracked"))
    cpu = 100 * (usage.ru_utime + usage.ru_stime) / wall
    lines = [
        "# stoker agent overhead",
        "",
        f"Machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs. "
        f"Date: {time.strftime('%Y-%m-%d')}. Command: `python3 bench/agent_bench.py --minutes {minutes:g}`.",
        "",
        f"{PROCESSES} busy CPython 3.12 processes, `stoker agent` with its defaults (19 Hz, 15 s interval, network timing on), "
        f"{wall:.0f} s; exit status {status}.",
        "",
        "| agent CPU (% of one core) | peak RSS (MB) | samples | processes tracked |",
        "|---|---|---|---|",
        f"| {cpu:.2f} | {usage.ru_maxrss / 1024:.1f} | {samples} | {tracked} |",
        "",
        "Targets: <= 1 % of one core, <= 100 MB RSS.",
        "",
    ]
    print("\n".join(lines))
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

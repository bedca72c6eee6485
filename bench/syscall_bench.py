#!/usr/bin/env python3
"""What a stoker session costs the system calls of processes it does not watch.

  sudo python3 bench/syscall_bench.py [--rounds N] [--out bench/SYSCALL_RESULTS.md]
                                      [--baseline PATH-TO-AN-OLDER-STOKER]

Needs target/release/stoker (`cargo build --release`) and a C compiler (cc). While any
system-call tracepoint has a program attached, the kernel sends every system call of every
thread on the host through its tracing path, a target's or not; a call whose exit has a
program runs that program too. A C program that is no target times three calls (each the
best of 15 runs of 200,000 calls): `getppid`, which no program follows; a 1-byte `read` of
/dev/zero, a data call that the network programs follow at its exit where the kernel lacks
the socket tracepoints; and a 1-byte `send` and `recv` on a Unix socket pair, which run the
programs at the socket tracepoints (`sock_send_length`, `sock_recv_length`, and
`sk_data_ready` as the byte arrives) where the kernel has them. In each round: with no session, and beside a `stoker record
--pid` session watching a CPython 3.12 process that sleeps (no event loop), one watching a
process that runs an asyncio loop (the blocked-loop programs on `epoll_wait` and kin are
attached for it), and one with `--net` watching the sleeping process, and the same with
`STOKER_NET_PROGRAMS=empty` (the network programs attached, each returning as it starts:
what the attach points cost alone). The order rotates from round to round. With --baseline, also `--net` under that build.
"""
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchlib import arg

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
PYTHON = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions/3.12.1/bin/python3.12"
TIMER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
/* ns per getppid (fd < 0), per 1-byte read of fd, or (pair) per 1-byte send on fd and recv on pair */
static double best_of(int fd, int pair) {
    double best = 1e9;
    char c;
    for (int r = 0; r < 15; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < 200000; i++) {
            if (fd < 0) {
                syscall(SYS_getppid);
            } else if (pair >= 0) {
                if (send(fd, &c, 1, 0) != 1 || recv(pair, &c, 1, 0) != 1) return -1;
            } else if (read(fd, &c, 1) != 1) {
                return -1;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 200000;
        if (ns < best) best = ns;
    }
    return best;
}
int main(void) {
    int zero = open("/dev/zero", O_RDONLY), sv[2];
    if (zero < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 1;
    printf("%.1f %.1f %.1f\n", best_of(-1, -1), best_of(zero, -1), best_of(sv[0], sv[1]));
    return 0;
}
"""
SLEEPER = "import time\nwhile True: time.sleep(1)"
LOOP = "import asyncio\nasyncio.run(asyncio.sleep(10**6))"
# label: (the target's program, stoker's extra options, stoker build: None for this one,
# stoker's extra environment)
CONFIGS = {
    "no session": None,
    "`record`, a target with no event loop": (SLEEPER, [], None, {}),
    "`record`, a target running an asyncio loop": (LOOP, [], None, {}),
    "`record --net`, a target with no event loop": (SLEEPER, ["--net"], None, {}),
    "`record --net`, programs empty (`STOKER_NET_PROGRAMS=empty`), a target with no event loop":
        (SLEEPER, ["--net"], None, {"STOKER_NET_PROGRAMS": "empty"}),
}
CALLS = ["`getppid`", "`read`", "`send` + `recv`"]


def timed(timer):
    """(ns per `getppid`, per 1-byte `read` of /dev/zero, per 1-byte `send` and `recv` on a
    Unix socket pair)."""
    out = subprocess.run([timer], capture_output=True, text=True, check=True).stdout.split()
    return tuple(float(v) for v in out)


def beside(timer, config, tmp):
    """`timed` beside a session watching a fresh target, once it samples."""
    program, extra, build, env = config
    target = subprocess.Popen([str(PYTHON), "-c", program])
    stoker = subprocess.Popen([str(build or STOKER), "record", *extra, "--pid", str(target.pid), "-f", "folded",
                               "-o", f"{tmp}/bench.folded"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env})
    try:
        for line in stoker.stderr:
            if "sampling at" in line:
                break
        else:
            raise SystemExit(f"stoker did not start: {stoker.wait()}")
        return timed(timer)
    finally:
        stoker.send_signal(2)
        stoker.communicate(timeout=60)
        target.kill()
        target.wait()


def main():
    rounds = arg("--rounds", 10)
    out = Path(arg("--out", str(ROOT / "bench/SYSCALL_RESULTS.md")))
    baseline = arg("--baseline", "")
    configs = dict(CONFIGS)
    if baseline:
        configs["baseline `record --net`, a target with no event loop"] = (SLEEPER, ["--net"], baseline, {})
    results = {label: [] for label in configs}
    with tempfile.TemporaryDirectory() as tmp:
        source, timer = Path(tmp, "timer.c"), Path(tmp, "timer")
        source.write_text(TIMER)
        subprocess.run(["cc", "-O2", "-o", str(timer), str(source)], check=True)
        labels = list(configs)
        for r in range(rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                config = configs[label]
                results[label].append(timed(timer) if config is None else beside(timer, config, tmp))
            print(f"round {r + 1}: " + ", ".join("/".join(f"{x:.1f}" for x in v[-1]) for v in results.values()),
                  flush=True)
    alone = results["no session"]
    lines = [
        "# What a session costs the system calls of processes it does not watch",
        "",
        f"`python3 bench/syscall_bench.py --rounds {rounds}{' --baseline ' + baseline if baseline else ''}` "
        f"on {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs. A C program that is no "
        "target times `getppid`, a 1-byte `read` of /dev/zero, and a 1-byte `send` and `recv` on a Unix "
        "socket pair (each the best of 15 runs of 200,000) with no session and beside a `stoker record` "
        "session watching a CPython 3.12 process, in an order that rotates from round to round. More: the "
        "median of the rounds' differences from no session.",
        "",
        "| beside | " + " | ".join(f"{c} ns: median | more | rounds" for c in CALLS) + " |",
        "| --- |" + " --- | --- | --- |" * len(CALLS),
    ]
    for label, values in results.items():
        cells = []
        for k in range(len(CALLS)):
            v = [x[k] for x in values]
            more = statistics.median(x[k] - a[k] for x, a in zip(values, alone))
            cells += [f"{statistics.median(v):.1f}", "" if values is alone else f"{more:+.1f} ns",
                      ", ".join(f"{x:.0f}" for x in v)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Cost of wall-clock profiling (`stoker record --mode wall`) on a thread-per-connection
Python server under wrk load.

  sudo python3 bench/offcpu_bench.py [--rounds N] [--seconds S] [--out bench/OFFCPU_RESULTS.md]
                                     [--baseline PATH-TO-AN-OLDER-STOKER] [--pin]

Needs target/release/stoker and wrk (`cargo xtask setup`), and py-spy on PATH (`pip install py-spy`). The server is
tests/fixtures/net/http_server.py on CPython 3.12 (ThreadingHTTPServer: a thread per
connection, each request a wake-up and a switch off the CPU of its thread), driven on
GET /sleep/0 by wrk (1 thread, 8 keep-alive connections). Each round runs wrk for S
seconds six times: the server alone, watched by `stoker record` (CPU sampling at 99 Hz),
by `stoker record --mode wall` (the default `--waits sampled`: every server thread's time
off the CPU sampled by the clock at 99 Hz, no program on context switches), by
`--mode wall --waits followed` (the switches of the server's threads, each followed while
its thread switches at most 100 times a second, the default budget; the time off the CPU of
faster threads sampled by the clock at 99 Hz), by the same with `--switch-budget 0` (every
switch followed) and by `py-spy record --idle` (py-spy's wall-clock view, 99 Hz); the order
rotates from round to round. Reports each round's throughput, each watched configuration's over the
server's alone, and the CPU time the profiler's own process used during the runs.

Kernel cost, in separate rounds with the kernel's BPF run-time statistics on: watching
the server with `--waits sampled`, the wall-clock sampler's program and thread time per
sample; with `--waits followed`, the context-switch program's time per request (all its runs on the host,
target or not), the time it spends on a target thread's switch that it follows (timed
inside it), and with the default budget the wall-clock sampler's program time (it runs in
stoker's own thread, one run per server thread per sample); watching an idle process, the
cost per switch of a thread that is not a target (the test of one bit per switch). stoker times an empty program the same
way; the statistics' own cost per run is reported and subtracted.

With --baseline, each round also runs the server watched by that build's `--mode wall`, and
N more kernel cost rounds alternate between that stoker build and this one
with `--switch-budget 100` and report the switch program's time per request of each and the
sampler thread's CPU time per sample, and this build's over the baseline's: one run on one
machine, where absolute figures move from day to day.

With --pin, wrk runs on the first CPU and the server on the last (see `benchlib.PIN`), and
the report goes to bench/OFFCPU_PINNED.md unless --out says otherwise.
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
                      rounds_table, wrk)

ROOT = Path(__file__).resolve().parent.parent
STOKER = ROOT / "target/release/stoker"
VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
PYTHON = VERSIONS / "3.12.1/bin/python3.12"
SERVER = ROOT / "tests/fixtures/net/http_server.py"
BUDGET = "100"
# `stoker wall` samples the waits by the clock (the default); `--waits followed` follows the
# switches within the default budget (BUDGET), and with `--switch-budget 0` every switch.
FOLLOWED = ["--waits", "followed"]
CONFIGS = ["alone", "stoker cpu", "stoker wall", "stoker wall --waits followed",
           "stoker wall --waits followed --switch-budget 0", "py-spy --idle"]

def watched_by_stoker(pid, port, seconds, tmp, mode, kernel_stats=False, extra=(), stoker=STOKER):
    """wrk while `stoker` watches `pid` in `mode` with `extra` options: (requests, req/s,
    stoker's summary, stoker's CPU seconds during the run, its wall-clock sampler thread's
    CPU nanoseconds during the run)."""
    stoker = subprocess.Popen(
        [str(stoker), "record", "-m", mode, *(["--kernel-stats"] if kernel_stats else []), *extra,
         "--pid", str(pid), "-f", "folded", "-o", f"{tmp}/bench.folded"],
        stderr=subprocess.PIPE, text=True,
    )
    # A cpu-clock event per CPU; in wall mode also the scheduler's switch tracepoint, or
    # with sampled waits the sampler's iterator over the target's threads.
    want = os.cpu_count() + (1 if mode == "wall" else 0)
    deadline = time.monotonic() + 30
    while links(stoker.pid) < want:
        if time.monotonic() > deadline or stoker.poll() is not None:
            raise SystemExit(f"stoker did not attach: {stoker.communicate()[1]}")
        time.sleep(0.05)
    before, sampler_before = cpu_seconds(stoker.pid), sampler_ns(stoker.pid)
    requests, rps = wrk(port, seconds)
    used, sampler = cpu_seconds(stoker.pid) - before, sampler_ns(stoker.pid) - sampler_before
    stoker.send_signal(2)
    return requests, rps, stoker.communicate(timeout=60)[1], used, sampler


def sampler_ns(pid):
    """CPU time so far of stoker `pid`'s wall-clock sampler thread (`stoker-wall`), in ns
    (its schedstat; 0 when it has none)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == "stoker-wall":
                return int((task / "schedstat").read_text().split()[0])
        except OSError:
            pass
    return 0


def watched_by_py_spy(pid, port, seconds, tmp):
    spy = subprocess.Popen(["py-spy", "record", "--idle", "-r", "99", "-f", "raw", "-o", f"{tmp}/spy.txt",
                            "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # py-spy attaches by reading the process: no link to wait for
    if spy.poll() is not None:
        raise SystemExit(f"py-spy failed: {spy.communicate()[1]}")
    before = cpu_seconds(spy.pid)
    requests, rps = wrk(port, seconds)
    used = cpu_seconds(spy.pid) - before
    spy.send_signal(2)
    spy.communicate(timeout=60)
    return requests, rps, used


def run_config(config, server, port, seconds, tmp, baseline):
    """(requests, req/s, the profiler's CPU seconds during the run: None alone). "baseline
    wall" is `--mode wall` of the baseline build."""
    if config == "alone":
        return (*wrk(port, seconds), None)
    if config == "py-spy --idle":
        return watched_by_py_spy(server.pid, port, seconds, tmp)
    words = config.split()
    build = baseline if words[0] == "baseline" else STOKER
    requests, rps, _, used, _ = watched_by_stoker(server.pid, port, seconds, tmp, words[1], extra=words[2:],
                                                  stoker=build)
    return requests, rps, used


def kernel_cost(err):
    """(switch runs, switch ns, target switches followed, of which with the stack found
    unchanged, of which with a recent stack, ns per target switch followed, statistics' own
    ns per run) from a `--kernel-stats` summary."""
    m = re.search(r"sched_switch ran (\d+) times for (\d+) ns", err)
    t = re.search(r"off-CPU: (\d+) switches of target threads followed \((\d+) with [^,]*, (\d+) GIL.*?\), (\d+) ns each", err)
    floor = re.search(r"statistics add (\d+) ns to every run", err)
    if not (m and floor):
        raise SystemExit(f"no kernel statistics in stoker's summary:\n{err}")
    targets = tuple(map(int, t.groups())) if t else (0, 0, 0, 0)  # none when watching an idle process
    return (*map(int, m.groups()), *targets, int(floor.group(1)))


def stats_floor(err):
    """The run-time statistics' own ns per run, from a `--kernel-stats` summary."""
    floor = re.search(r"statistics add (\d+) ns to every run", err)
    if not floor:
        raise SystemExit(f"no kernel statistics in stoker's summary:\n{err}")
    return int(floor.group(1))


def sampler_cost(err):
    """(runs, ns) of the wall-clock sampler's program, and its samples, from a `--kernel-stats`
    summary; zeros when no thread was over the budget."""
    m = re.search(r"off_cpu_sample ran (\d+) times for (\d+) ns", err)
    s = re.search(r"\((\d+) samples, (\d+) with the Python stack walked[;)]", err)
    return (*(map(int, m.groups()) if m else (0, 0)), *(map(int, s.groups()) if s else (0, 0)))


def main():
    rounds, seconds = arg("--rounds", 3), arg("--seconds", 10)
    baseline = arg("--baseline", "") or None
    out = Path(arg("--out", str(ROOT / ("bench/OFFCPU_PINNED.md" if PIN else "bench/OFFCPU_RESULTS.md"))))
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    server = subprocess.Popen(pinned("server", [str(PYTHON), str(SERVER)]), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline())
    rows = []
    configs = CONFIGS + (["baseline wall"] if baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wrk(port, 5)  # warm-up
            for r in range(rounds):
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                row = {c: run_config(c, server, port, seconds, tmp, baseline) for c in order}
                rows.append(row)
                print(f"round {r + 1}: " + ", ".join(f"{c} {row[c][1]:.0f} req/s" for c in configs), flush=True)
            requests, rps, err, _, thread_ns = watched_by_stoker(server.pid, port, seconds, tmp, "wall",
                                                                 kernel_stats=True)
            if "no switch followed (--waits sampled)" not in err or "sched_switch ran" in err:
                raise SystemExit(f"--mode wall did not sample the waits by the clock alone:\n{err}")
            clock = (requests, rps, (*sampler_cost(err), thread_ns), stats_floor(err))
            requests, rps, err, _, _ = watched_by_stoker(server.pid, port, seconds, tmp, "wall", kernel_stats=True,
                                                         extra=[*FOLLOWED, "--switch-budget", "0"])
            busy = (requests, rps, kernel_cost(err))
            requests, rps, err, _, thread_ns = watched_by_stoker(server.pid, port, seconds, tmp, "wall",
                                                                 kernel_stats=True,
                                                                 extra=[*FOLLOWED, "--switch-budget", BUDGET])
            if thread_ns == 0:
                raise SystemExit("no wall-clock sampler thread (stoker-wall) in stoker's process")
            sampled = (requests, rps, kernel_cost(err), (*sampler_cost(err), thread_ns))
            idle = subprocess.Popen(["sleep", "3600"])
            try:
                requests, rps, err, _, _ = watched_by_stoker(idle.pid, port, seconds, tmp, "wall",
                                                             kernel_stats=True,
                                                             extra=[*FOLLOWED, "--switch-budget", "0"])
                quiet = (requests, rps, kernel_cost(err))
            finally:
                idle.kill()
            against = {"baseline": [], "this build": []}
            # The sampler thread's CPU time per sample, in the same runs.
            against_sampler = {"baseline": [], "this build": []}
            for r in range(rounds if baseline else 0):
                builds = [("baseline", baseline), ("this build", STOKER)]
                for label, build in builds[r % 2:] + builds[:r % 2]:
                    requests, _, err, _, thread_ns = watched_by_stoker(
                        server.pid, port, seconds, tmp, "wall", kernel_stats=True,
                        extra=([] if label == "baseline" else FOLLOWED) + ["--switch-budget", BUDGET], stoker=build)
                    runs, ns, *_, floor = kernel_cost(err)
                    against[label].append((ns - floor * runs) / max(requests, 1))
                    against_sampler[label].append(thread_ns / max(sampler_cost(err)[2], 1))
                print(f"kernel cost round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} ns" for k, v in against.items())
                      + "; sampler per sample: " + ", ".join(f"{k} {v[-1]:.0f} ns" for k, v in against_sampler.items()),
                      flush=True)
        finally:
            server.kill()

    lines = [
        "# Wall-clock profiling cost (`stoker record --mode wall`)",
        "",
        f"`python3 bench/offcpu_bench.py --rounds {rounds} --seconds {seconds}{' --pin' if PIN else ''}"
        f"{f' --baseline {baseline}' if baseline else ''}` on {platform.node()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs. ThreadingHTTPServer (CPython 3.12, a thread per "
        f"connection) under `wrk -t1 -c8` on GET /sleep/0 (keep-alive) for {seconds} s per run; each round "
        "runs the server alone, watched by `stoker record` (CPU sampling, 99 Hz), by `stoker record --mode "
        "wall` (the default `--waits sampled`: every server thread's time off the CPU sampled by the clock at "
        "99 Hz, no program on context switches), by `--mode wall --waits followed` (its default switch budget "
        f"of {BUDGET}: each switch of a thread off the CPU followed while the "
        f"thread switches at most {BUDGET} times a second; a faster thread's time off the CPU sampled by the "
        "clock at 99 Hz), by the same with `--switch-budget 0` (every switch of the server's "
        "threads off the CPU followed: every wait counted, GIL and lock waits with the thread's stack read at a "
        "switch under 10 ms before) "
        "and by `py-spy record --idle` (99 Hz)"
        f"{f', and by the baseline build `{baseline}` with its default `--mode wall` (baseline wall)' if baseline else ''}, "
        f"in an order that rotates from round to round.{pinning_note()}",
        "",
        *rounds_table(configs, rows, lambda row, c: f"{row[c][1]:.0f}", " req/s"),
    ]
    lines += ["", "| watched by | throughput / alone (mean of means) | rounds' ratios: mean, 95% interval | median | range "
              "| the profiler's own CPU (share of one CPU) |",
              "| --- | --- | --- | --- | --- | --- |"]
    mean = {c: statistics.mean(row[c][1] for row in rows) for c in configs}
    for c in configs[1:]:
        ratios = [row[c][1] / row["alone"][1] for row in rows]
        m, half = interval(ratios)
        own = statistics.mean(row[c][2] for row in rows) / seconds
        lines.append(f"| {c} | **{mean[c] / mean['alone']:.3f}** | {m:.3f} ± {half:.3f} | "
                     f"{statistics.median(ratios):.3f} | {min(ratios):.3f} to {max(ratios):.3f} | {own:.1%} |")
    pairs = [("stoker wall", "stoker cpu"), ("stoker wall --waits followed", "stoker cpu"),
             ("stoker wall", "stoker wall --waits followed")]
    pairs += [("stoker wall", "baseline wall")] if baseline else []
    lines += ["", "| rounds' ratios | mean, 95% interval | median |", "| --- | --- | --- |"]
    for a, b in pairs:
        ratios = [row[a][1] / row[b][1] for row in rows]
        m, half = interval(ratios)
        lines.append(f"| {a} / {b} | **{m:.3f}** ± {half:.3f} | {statistics.median(ratios):.3f} |")
    (req, _, (sw_runs, sw_ns, targets, reused, recent, per_target, floor)) = busy
    (_, _, (q_runs, q_ns, _, _, _, _, _)) = quiet
    per_req = (sw_ns - floor * sw_runs) / max(req, 1)
    (s_req, s_rps, (s_sw_runs, s_sw_ns, s_targets, _, _, _, _), (w_runs, w_ns, w_samples, w_walks, w_thread)) = sampled
    s_per_req = (s_sw_ns - floor * s_sw_runs) / max(s_req, 1)
    s_per_run = s_sw_ns / max(s_sw_runs, 1) - floor
    w_per_sample = (w_ns - floor * w_runs) / max(w_samples, 1)
    s_seconds = s_req / max(s_rps, 1)
    w_share = (w_ns - floor * w_runs) / 1e9 / s_seconds
    (c_req, c_rps, (c_runs, c_ns, c_samples, c_walks, c_thread), c_floor) = clock
    c_seconds = c_req / max(c_rps, 1)
    lines += [
        "",
        "| kernel cost | figure |",
        "| --- | --- |",
        f"| `--waits sampled` (default): the sampler's samples (server threads off the CPU at a sample), of them with the Python stack walked | {c_samples}, {c_walks / max(c_samples, 1):.0%} |",
        f"| `--waits sampled`: the sampler's program time per sample (its runs over threads on the CPU included) | {(c_ns - c_floor * c_runs) / max(c_samples, 1):.0f} ns |",
        f"| `--waits sampled`: the sampler thread's CPU time per sample | **{c_thread / max(c_samples, 1):.0f} ns** |",
        f"| `--waits sampled`: the sampler's share of one CPU: its programs' time, its thread's CPU time | {(c_ns - c_floor * c_runs) / 1e9 / c_seconds:.2%}, {c_thread / 1e9 / c_seconds:.2%} |",
        "| `--waits sampled`: programs on context switches | none |",
        f"| `--waits followed --switch-budget 0`: switches on the host per request | {sw_runs / max(req, 1):.2f} |",
        f"| `--waits followed --switch-budget 0`: switches of the server's threads followed per request | {targets / max(req, 1):.2f} |",
        f"| `--waits followed --switch-budget 0`: the switch program's time per request | **{per_req:.0f} ns** |",
        f"| of those, with the Python stack found unchanged since one of the thread's two switches before (not walked again) | {reused / max(targets, 1):.1%} |",
        f"| of those, GIL and lock waits taking the stack read at a switch under 10 ms before | {recent / max(targets, 1):.1%} |",
        f"| a target thread's switch off the CPU that is followed (timed in the program: stacks, reason) | **{per_target} ns** |",
        f"| `--waits followed`, default budget ({BUDGET}): switches of the server's threads followed per request | {s_targets / max(s_req, 1):.2f} |",
        f"| `--waits followed`, default budget ({BUDGET}): the switch program's time per request | **{s_per_req:.0f} ns** |",
        f"| `--waits followed`, default budget ({BUDGET}): the switch program's mean time per run (all switches on the host) | {s_per_run:.0f} ns |",
        f"| `--waits followed`, default budget ({BUDGET}): the wall-clock sampler's samples (server threads off the CPU at a sample), of them with the Python stack walked | {w_samples}, {w_walks / max(w_samples, 1):.0%} |",
        f"| `--waits followed`, default budget ({BUDGET}): the sampler's program time per sample (in stoker's thread at real-time priority, from its runs' start to end; its runs over threads on the CPU included) | {w_per_sample:.0f} ns |",
        f"| `--waits followed`, default budget ({BUDGET}): the sampler thread's CPU time per sample (its schedstat: the programs, iterator reads and its loop) | **{w_thread / max(w_samples, 1):.0f} ns** |",
        f"| `--waits followed`, default budget ({BUDGET}): the sampler's share of one CPU: its programs' time from start to end, its thread's CPU time | {w_share:.2%}, {w_thread / 1e9 / s_seconds:.2%} |",
        f"| a switch of a thread that is no target (watching an idle process) | **{q_ns / max(q_runs, 1) - floor:.0f} ns** |",
        "",
        f"The statistics' own cost, {floor} ns per run (an empty program timed the same way), is subtracted "
        "from the run-time statistics' figures.",
        "",
    ]
    if against["baseline"]:
        lines += against_baseline(baseline, f"watching the server with `--switch-budget {BUDGET}`",
                                  "the switch program's time per request", against["baseline"], against["this build"])
        lines += against_baseline(baseline, f"watching the server with `--switch-budget {BUDGET}`, in the same runs",
                                  "the sampler thread's CPU time per sample", against_sampler["baseline"],
                                  against_sampler["this build"])
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

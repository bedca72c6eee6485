"""Drives the demo service: a few client threads request /cpu, /io and /mixed on
127.0.0.1 for a fixed time, then print how many requests each endpoint served.

Run: python3 load.py PORT SECONDS
"""
import sys
import threading
import time
import urllib.request


def client(port, paths, end, counts, lock):
    while time.monotonic() < end:
        for path in paths:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
                with lock:
                    counts[path] = counts.get(path, 0) + 1
            except OSError:
                time.sleep(0.05)


def main():
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    end = time.monotonic() + seconds
    counts, lock = {}, threading.Lock()
    mixes = [["/cpu"], ["/io", "/io", "/mixed"], ["/cpu", "/io"]]
    threads = [threading.Thread(target=client, args=(port, m, end, counts, lock)) for m in mixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("requests served:", ", ".join(f"{p} {n}" for p, n in sorted(counts.items())))


if __name__ == "__main__":
    main()

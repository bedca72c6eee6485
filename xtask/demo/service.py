"""stoker's demo service: a small HTTP app with a CPU-heavy and an I/O-heavy endpoint.

  GET /cpu    renders a report: parses, aggregates and serializes records (CPU-bound)
  GET /io     waits on a slow "upstream" (a sleep standing in for a database call)
  GET /mixed  a bit of both

Run: python3 service.py PORT
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECORDS = [{"id": i, "user": f"user{i % 97}", "amount": (i * 7919) % 1000 / 10.0} for i in range(4000)]


def parse_records():
    return json.loads(json.dumps(RECORDS))


def aggregate(records):
    totals = {}
    for r in records:
        totals[r["user"]] = totals.get(r["user"], 0.0) + r["amount"]
    return sorted(totals.items(), key=lambda kv: -kv[1])


def checksum(rows):
    h = 0
    for user, total in rows:
        for ch in user:
            h = (h * 31 + ord(ch)) % 1_000_000_007
        h = (h + int(total * 100)) % 1_000_000_007
    return h


def render_report():
    rows = aggregate(parse_records())
    return {"top": rows[:5], "checksum": checksum(rows * 20)}


def query_upstream():
    time.sleep(0.02)
    return {"rows": 3}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/cpu":
            body = render_report()
        elif self.path == "/io":
            body = query_upstream()
        elif self.path == "/mixed":
            body = {"upstream": query_upstream(), "top": aggregate(parse_records())[:3]}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()

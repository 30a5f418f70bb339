#!/usr/bin/env python3
"""Load-benchmark driver for scripts/bench.sh: bounded, loopback only, standard library only.

  load_driver.py wrk FILE                 parse `wrk --latency` output: rps, p50, p99, errors (JSON)
  load_driver.py cold  [options]          cold path: installations x concurrent callers (the
                                          emulator must run with --no-install-tokens)
  load_driver.py memory [options]         resident memory of the gateway with N tokens cached

The caller secret comes from the environment (BENCH_CALLER_SECRET), never from the command line.
Every request has a timeout, every loop a count, and the memory phase a deadline.
"""

import argparse
import http.client
import json
import os
import re
import select
import selectors
import socket
import statistics
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

REQUEST_TIMEOUT = 30.0


# MARK: - HTTP


def split_url(url):
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing a non-loopback address: {parsed.hostname}")
    return parsed.hostname, parsed.port


class Client:
    """One persistent HTTP/1.1 connection (reopened after an error)."""

    def __init__(self, base):
        self.host, self.port = split_url(base)
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                return response.status, payload
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise

    def close(self):
        if self.conn is not None:
            self.conn.close()


def caller_headers():
    secret = os.environ.get("BENCH_CALLER_SECRET")
    if not secret:
        sys.exit("BENCH_CALLER_SECRET is not set")
    return {"Authorization": "Bearer " + secret}


def short_id(ari):
    return ari.rsplit("/", 1)[-1]


def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


def create_installations(emulator, count, workers, deadline=None):
    """Creates `count` installations through the emulator's admin API; returns their ARIs."""
    local = threading.local()

    def one(_):
        if deadline is not None and time.monotonic() > deadline:
            return None
        if not hasattr(local, "client"):
            local.client = Client(emulator)
        status, body = local.client.request("POST", "/admin/installations")
        if status != 201:
            raise RuntimeError(f"emulator could not create an installation: HTTP {status} {body[:200]!r}")
        return json.loads(body)["id"]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [i for i in pool.map(one, range(count)) if i is not None]


def emulator_stats(emulator):
    client = Client(emulator)
    try:
        status, body = client.request("GET", "/admin/stats")
        if status != 200:
            raise RuntimeError(f"emulator stats: HTTP {status}")
        return json.loads(body)
    finally:
        client.close()


# MARK: - wrk


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(path):
    text = open(path).read()
    out = {"rps": None, "p50_ms": None, "p99_ms": None, "requests": None, "non2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(r"^\s+" + pct + r"%\s+([\d.]+)(us|ms|s|m)\b", text, re.M)
        if m:
            out[key] = to_ms(m.group(1), m.group(2))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = sum(int(g) for g in m.groups())
    print(json.dumps(out))


# MARK: - Cold path


def get_token(gateway, ari, headers):
    host, port = split_url(gateway)
    conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.connect()
        start = time.perf_counter()
        conn.request("GET", f"/v1/installations/{short_id(ari)}/token", headers=headers)
        response = conn.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - start) * 1000.0
        source = None
        if response.status == 200:
            source = json.loads(body).get("source")
        return elapsed, response.status, source
    finally:
        conn.close()


def run_round(gateway, ids, callers, headers, warm=False):
    """All callers of all `ids` at once, from one thread: the connections are opened first, then
    every request is written and the answers are read as they come (non-blocking sockets and a
    selector), each timed from its own write to the end of its own answer. One thread keeps the
    client's own cost small and steady: with a thread per caller, waking ten threads to read ten
    answers took this client about a millisecond (the hand-offs of Python's threads), which the
    figures would have counted as the gateway's. With `warm`, each connection first carries one
    `GET /health/live` to its answer, untimed: the measured request then finds a connection the
    gateway has already accepted and set up, as a caller's kept-alive connection would."""
    host, port = split_url(gateway)
    request_head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    results = {}
    calls = []
    selector = selectors.DefaultSelector()
    try:
        for ari in ids:
            for _ in range(callers):
                sock = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request = (
                    f"GET /v1/installations/{short_id(ari)}/token HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    + request_head
                    + "\r\n"
                ).encode()
                calls.append(_Call(ari, sock, request))
                if warm:
                    _warm_up(sock, host, port)
        for call in calls:
            call.sock.setblocking(False)
            selector.register(call.sock, selectors.EVENT_READ, call)
        for call in calls:
            call.start = time.perf_counter()
            _send_all(call.sock, call.request)
        deadline = time.monotonic() + REQUEST_TIMEOUT * 2
        pending = len(calls)
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                call = key.data
                if call.read():
                    call.elapsed = (time.perf_counter() - call.start) * 1000.0
                    selector.unregister(call.sock)
                    pending -= 1
        for call in calls:
            results.setdefault(call.ari, []).append(call.outcome())
    finally:
        selector.close()
        for call in calls:
            call.sock.close()
    return results


def _warm_up(sock, host, port):
    """One `GET /health/live` on a new (blocking) connection, read to the end of its answer."""
    warm = _Call(None, sock, f"GET /health/live HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    _send_all(sock, warm.request)
    while not warm.read():
        pass
    if warm.error is not None or warm.status != 200:
        sys.exit(f"the warm-up request failed: {warm.error or warm.status}")


def _send_all(sock, data):
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [], REQUEST_TIMEOUT)
            continue
        view = view[sent:]


class _Call:
    """One caller's request on its own connection, and its answer as it is read."""

    def __init__(self, ari, sock, request):
        self.ari, self.sock, self.request = ari, sock, request
        self.buffer = b""
        self.start = None
        self.elapsed = None
        self.status = 0
        self.body = None
        self.error = None

    def read(self):
        """Reads what is there; true once the whole answer (or an error) is in."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as error:
            self.error = type(error).__name__
            return True
        if not chunk:
            self.error = "connection closed"
            return True
        self.buffer += chunk
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        head = self.buffer[:head_end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < head_end + 4 + length:
            return False
        self.status = int(head[0].split()[1])
        self.body = self.buffer[head_end + 4 : head_end + 4 + length]
        return True

    def outcome(self):
        if self.elapsed is None or self.error is not None:
            return float("nan"), 0, f"error: {self.error or 'timeout'}"
        source = json.loads(self.body).get("source") if self.status == 200 else None
        return self.elapsed, self.status, source


def cpu_seconds(pid):
    """User plus system CPU time of process `pid`, in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold(args):
    headers = caller_headers()
    before = emulator_stats(args.emulator)
    ids = create_installations(args.emulator, args.installations, workers=4)
    results = {}
    cpu_before = cpu_seconds(args.pid) if args.pid else None
    if args.burst:
        results = run_round(args.gateway, ids, args.callers, headers, warm=args.kept_alive)
    else:
        for ari in ids:
            results.update(run_round(args.gateway, [ari], args.callers, headers, warm=args.kept_alive))
    cpu_after = cpu_seconds(args.pid) if args.pid else None
    after = emulator_stats(args.emulator)

    triggers = sum(after["installations"].get(ari, 0) - before["installations"].get(ari, 0) for ari in ids)
    if triggers < len(ids):
        # Installations that came with a token (an emulator started without --no-install-tokens)
        # are served from the cache: what this measured is no cold path.
        sys.exit(
            f"cold: {triggers} trigger calls for {len(ids)} installations: the installations had a token"
            " already; start the emulator with --no-install-tokens"
        )
    own_ms = {ari: after.get("triggerProcessingMillis", {}).get(ari) for ari in ids}
    latencies, added, statuses, sources = [], [], {}, {}
    for ari, outcomes in results.items():
        for elapsed, status, source in outcomes:
            statuses[status] = statuses.get(status, 0) + 1
            sources[source] = sources.get(source, 0) + 1
            if status == 200:
                latencies.append(elapsed)
                if own_ms.get(ari) is not None:
                    added.append(elapsed - own_ms[ari])

    # The measuring client's own cost: sequential cached GETs of one (now warm) installation.
    baseline = []
    if ids:
        for _ in range(200):
            elapsed, status, _ = get_token(args.gateway, ids[0], headers)
            if status == 200:
                baseline.append(elapsed)

    # The same shape against the cache: `callers` concurrent GETs of one warm installation,
    # released together, 50 times. What the cold figures hold of this client's own thread
    # hand-offs (the answers themselves take the gateway a few microseconds).
    concurrent = []
    if ids:
        for _ in range(50):
            for outcomes in run_round(args.gateway, [ids[0]], args.callers, headers, warm=args.kept_alive).values():
                concurrent += [elapsed for elapsed, status, _ in outcomes if status == 200]

    own = [v for v in own_ms.values() if v is not None]
    summary = {
        "mode": "burst" if args.burst else "sequential",
        "connections": "kept alive" if args.kept_alive else "new",
        "installations": len(ids),
        "callers_per_installation": args.callers,
        "answers": statuses,
        "sources": sources,
        "trigger_calls": triggers,
        "e2e_p50_ms": percentile(latencies, 0.50),
        "e2e_p99_ms": percentile(latencies, 0.99),
        "emulator_own_p50_ms": percentile(own, 0.50),
        "gateway_added_p50_ms": percentile(added, 0.50),
        "gateway_added_p99_ms": percentile(added, 0.99),
        "client_cached_get_p50_ms": percentile(baseline, 0.50),
        "client_concurrent_cached_p50_ms": percentile(concurrent, 0.50),
        # The gateway's CPU time (user + system) per installation served cold, all its callers
        # included: what the cold latency is made of where the processes share one CPU.
        "gateway_cpu_ms_per_installation": (
            (cpu_after - cpu_before) * 1000.0 / len(ids) if cpu_before is not None and ids else None
        ),
    }
    print(json.dumps(summary))


# MARK: - Memory


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def memory(args):
    headers = caller_headers()
    deadline = time.monotonic() + args.max_seconds
    rss_start = vm_rss_kib(args.pid)
    started = time.monotonic()
    ids = create_installations(args.emulator, args.installations, workers=args.workers, deadline=deadline)
    created_seconds = time.monotonic() - started
    local = threading.local()

    def push(ari):
        if not hasattr(local, "emulator"):
            local.emulator = Client(args.emulator)
        status, body = local.emulator.request(
            "POST", f"/admin/installations/{short_id(ari)}/push", body={"tokenBytes": args.token_bytes}
        )
        answer = json.loads(body) if status == 200 else {}
        return status == 200 and answer.get("status") == 200

    def fetch(ari):
        if not hasattr(local, "gateway"):
            local.gateway = Client(args.gateway)
        status, body = local.gateway.request("GET", f"/v1/installations/{short_id(ari)}/token", headers=headers)
        if status != 200:
            return None
        answer = json.loads(body)
        return len(answer["accessToken"].encode()), answer.get("source")

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        pushed = sum(1 for ok in pool.map(push, ids) if ok)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        fetched = [r for r in pool.map(fetch, ids) if r is not None]
    time.sleep(1.0)
    rss_end = vm_rss_kib(args.pid)
    token_bytes = sum(size for size, _ in fetched)
    from_cache = sum(1 for _, source in fetched if source == "cache")
    delta_bytes = (rss_end - rss_start) * 1024
    summary = {
        "installations": len(ids),
        "pushed": pushed,
        "fetched": len(fetched),
        "fetched_from_cache": from_cache,
        "mean_token_bytes": token_bytes / len(fetched) if fetched else 0,
        "token_bytes_held": token_bytes,
        "rss_start_kib": rss_start,
        "rss_end_kib": rss_end,
        "rss_delta_bytes": delta_bytes,
        "delta_per_token_byte": delta_bytes / token_bytes if token_bytes else float("nan"),
        "rss_per_token_byte": rss_end * 1024 / token_bytes if token_bytes else float("nan"),
        "seconds": time.monotonic() - started,
        "create_seconds": created_seconds,
    }
    print(json.dumps(summary))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wrk")
    p.add_argument("file")
    for name in ("cold", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--gateway", required=True)
        p.add_argument("--emulator", required=True)
        p.add_argument("--installations", type=int, default=100)
        if name == "cold":
            p.add_argument("--callers", type=int, default=10)
            p.add_argument("--burst", action="store_true")
            p.add_argument(
                "--kept-alive",
                action="store_true",
                help="each caller's connection carries one untimed GET /health/live first",
            )
            p.add_argument("--pid", type=int, help="the gateway's pid: also report its CPU time per installation")
        else:
            p.add_argument("--pid", type=int, required=True)
            p.add_argument("--token-bytes", type=int, default=1500)
            p.add_argument("--workers", type=int, default=8)
            p.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    if args.command == "wrk":
        parse_wrk(args.file)
    elif args.command == "cold":
        cold(args)
    else:
        memory(args)


if __name__ == "__main__":
    main()

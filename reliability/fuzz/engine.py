"""Running a target under an engine: hypothesis in this process (in chunks of
seeded runs, so a run is bounded in examples and in time and reproducible
from its seed), atheris in a child process. Both report examples run,
crashes, time, memory and line coverage of the target modules."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]

# The modules whose lines each target exercises (coverage is measured on them).
MODULES: dict[str, list[str]] = {
    "frames": ["server/wsframe.py"],
    "squall": ["server/protocol.py", "server/codec.py"],
    "centrifuge-json": ["server/codecs/centrifuge.py"],
    "centrifuge-protobuf": ["server/codecs/centrifuge.py"],
    "pusher": ["server/codecs/pusher.py", "server/pusher.py"],
    "http": [
        "handlers/api.py",
        "handlers/api_keepalive.py",
        "handlers/pusher_api.py",
        "server/pusher.py",
    ],
}

# How long one input may take (the "no hang" property), seconds.
HANG_SECONDS = 1.0
# RSS growth allowed over the second half of a hypothesis run, and the RSS
# libFuzzer may reach in an atheris run (README.md of this package says why).
MEMORY_BOUND_MB = 64.0
ATHERIS_RSS_LIMIT_MB = 512

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Hang(Exception):
    """An input took longer than ``HANG_SECONDS``."""


@dataclass(slots=True)
class Crash:
    target: str
    engine: str
    kind: str
    message: str
    where: str
    example: str
    trace: str

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.where


@dataclass(slots=True)
class Run:
    target: str
    engine: str
    seed: int
    examples: int = 0
    seconds: float = 0.0
    stopped_by: str = "examples"
    crashes: list[Crash] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0
    memory_bound_mb: float = MEMORY_BOUND_MB
    slowest_input_s: float = 0.0
    # (examples run, RSS in MB) after each chunk (hypothesis).
    rss_samples: list[tuple[int, float]] = field(default_factory=list)
    # Line coverage of MODULES[target]: file -> lines run.
    lines: dict[str, list[int]] = field(default_factory=dict)
    statements: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.crashes and self.rss_growth_mb <= self.memory_bound_mb

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rate_per_s"] = round(self.rate, 1)
        out["ok"] = self.ok
        out["coverage"] = coverage_summary(self.lines, self.statements)
        return out


def rss_mb() -> float:
    """This process's resident set now (Linux), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_growth(samples: list[tuple[int, float]]) -> float:
    """RSS growth over the second half of a run's examples. RSS is a high
    -water mark: the first large inputs raise it in steps (the allocator
    keeps what it got), then it stays flat; a leak keeps it climbing in
    proportion to the examples, which the second half shows."""
    if len(samples) < 2:
        return 0.0
    half = samples[-1][0] / 2
    start = next(rss for done, rss in samples if done >= half)
    return round(max(rss for _, rss in samples) - start, 1)


def coverage_summary(lines: dict[str, list[int]], statements: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, total in statements.items():
        run = len(lines.get(path, []))
        out[path] = {"lines": run, "statements": total, "percent": round(100 * run / total, 1)}
    return out


class LineRecorder:
    """Lines of the target's modules run while it is installed, in the
    threads it is installed in: a trace function that returns at once for
    every other file, so the engine's own work (hypothesis generating an
    example) costs nothing extra, unlike a process-wide coverage run."""

    def __init__(self, files: list[str]) -> None:
        self.lines: dict[str, set[int]] = {f: set() for f in files}
        self._previous: Any = None

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        lines = self.lines.get(frame.f_code.co_filename)
        if lines is None:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                lines.add(frame.f_lineno)
            return local

        return local

    def install(self) -> None:
        self._previous = sys.gettrace()  # coverage.py's, under pytest-cov
        sys.settrace(self._global)

    def remove(self) -> None:
        sys.settrace(self._previous)

    def clear(self) -> None:
        for lines in self.lines.values():
            lines.clear()


# The recorder of the run in progress: threads a target starts (the HTTP
# server's) install it too.
ACTIVE: LineRecorder | None = None


def new_recorder(target: str) -> LineRecorder:
    return LineRecorder([str(ROOT / m) for m in MODULES[target]])


def record_coverage(run: Run, recorder: LineRecorder) -> None:
    """Merge what ``recorder`` saw into ``run`` as statements run (the first
    line of each; coverage.py's parser says what a statement is)."""
    from coverage.parser import PythonParser

    for path, seen in recorder.lines.items():
        parser = PythonParser(filename=path)
        parser.parse_source()
        statements = set(parser.statements)
        run_lines = {parser.first_line(n) for n in seen} & statements
        rel = str(Path(path).relative_to(ROOT))
        run.lines[rel] = sorted(run_lines | set(run.lines.get(rel, [])))
        run.statements[rel] = len(statements)


def _signature(exc: BaseException) -> str:
    """Where a failure comes from: the target's own signature (the HTTP
    target's names the server's fault), else the innermost frame of
    Squall's code. A flaky failure is named by the error inside it."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return _signature(inner[0])
    signature = getattr(exc, "signature", None)
    return signature if isinstance(signature, str) else _where(exc)


def _where(exc: BaseException) -> str:
    """The innermost frame of the project's code that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if "/server/" in fr.filename or "/handlers/" in fr.filename:
            return f"{Path(fr.filename).relative_to(ROOT)}:{fr.lineno}"
    if not frames:
        return "?"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"


def run_hypothesis(
    target: str,
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], None] | None = None,
    *,
    fixture: Callable[[], contextlib.AbstractContextManager[Callable[[Any], None]]] | None = None,
    examples: int,
    seconds: float,
    base_seed: int,
    chunk: int = 1000,
    coverage: bool = True,
    progress: Progress = _stderr,
    hang: float = HANG_SECONDS,
) -> Run:
    """Run ``check`` on examples of ``strategy`` until ``examples`` ran or
    ``seconds`` passed. Each chunk is a hypothesis run seeded with
    ``base_seed + index`` (reproducible; no example database). A failure is
    shrunk by hypothesis, recorded once per (exception, place) and the run
    goes on with the next chunk. ``fixture``, when given, makes the check
    (a server, say) under coverage, so threads it starts are measured too."""
    run = Run(target, "hypothesis", base_seed)
    start = time.monotonic()
    end = start + seconds
    last = start
    counter = 0
    slowest = 0.0
    seen: set[tuple[str, str]] = set()
    use_alarm = hang > 0 and _main_thread()

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"an input took longer than {hang} s")

    checks: list[Callable[[Any], None]] = [check] if check is not None else []
    global ACTIVE
    recorder = new_recorder(target) if coverage else None
    ACTIVE = recorder

    def body(value: Any) -> None:
        nonlocal counter, last, slowest
        counter += 1
        t0 = time.monotonic()
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, hang)
        try:
            if recorder is not None:
                recorder.install()
            checks[0](value)
        finally:
            if recorder is not None:
                recorder.remove()
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            took = time.monotonic() - t0
            slowest = max(slowest, took)
            if t0 - last >= 30:
                last = t0
                progress(_line(target, "hypothesis", counter, examples, t0 - start, run))

    old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    index = 0
    try:
        with contextlib.ExitStack() as stack:
            if fixture is not None:
                checks.append(stack.enter_context(fixture()))
                if recorder is not None:
                    recorder.clear()  # what the fixture ran to start is no input's
            while counter < examples and time.monotonic() < end:
                n = min(chunk, examples - counter)
                test = settings(
                    max_examples=n,
                    database=None,
                    deadline=None,
                    derandomize=False,
                    phases=[Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck),
                    report_multiple_bugs=False,
                )(seed(base_seed + index)(given(strategy)(body)))
                index += 1
                try:
                    test()
                except Exception as exc:
                    crash = Crash(
                        target,
                        "hypothesis",
                        type(exc).__name__,
                        str(exc)[:2000],
                        _signature(exc),
                        "\n".join(getattr(exc, "__notes__", []))[:4000],
                        "".join(traceback.format_exception(exc))[-6000:],
                    )
                    if crash.key not in seen:
                        seen.add(crash.key)
                        run.crashes.append(crash)
                        progress(f"[{target}/hypothesis] CRASH {crash.kind} at {crash.where}")
                gc.collect()
                run.rss_samples.append((counter, round(rss_mb(), 1)))
    finally:
        ACTIVE = None
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    if recorder is not None:
        record_coverage(run, recorder)
    run.rss_growth_mb = steady_growth(run.rss_samples)
    run.examples = counter
    run.seconds = time.monotonic() - start
    run.stopped_by = "examples" if counter >= examples else "time"
    run.peak_rss_mb = peak_rss_mb()
    run.slowest_input_s = round(slowest, 3)
    progress(_line(target, "hypothesis", counter, examples, run.seconds, run) + " done")
    return run


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _line(target: str, engine: str, done: int, total: int, seconds: float, run: Run) -> str:
    rate = done / seconds if seconds else 0.0
    rss = run.peak_rss_mb if engine == "atheris" else rss_mb()
    return (
        f"[{target}/{engine}] {done:,}/{total:,} examples in {seconds:.0f} s "
        f"({rate:,.0f}/s), {len(run.crashes)} crash(es), rss {rss:.0f} MB"
    )


_STAT = re.compile(r"#(\d+)\s+(?:pulse|NEW|REDUCE|DONE|INITED)\b.*?exec/s: (\d+)(?: rss: (\d+)Mb)?")


def run_atheris(
    target: str,
    *,
    examples: int,
    seconds: float,
    base_seed: int,
    coverage: bool = True,
    progress: Progress = _stderr,
    workdir: Path | None = None,
    rss_limit_mb: int = ATHERIS_RSS_LIMIT_MB,
) -> Run:
    """libFuzzer through atheris in a child process, then the corpus it built
    replayed here under coverage (what the engine reached)."""
    run = Run(target, "atheris", base_seed)
    run.memory_bound_mb = float(rss_limit_mb)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
        corpus = workdir / f"corpus-{target}"
        artifacts = workdir / f"artifacts-{target}"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "reliability.fuzz.atheris_main",
            target,
            str(corpus),
            f"-runs={examples}",
            f"-max_total_time={max(1, int(seconds))}",
            f"-timeout={max(1, int(HANG_SECONDS))}",
            f"-rss_limit_mb={rss_limit_mb + int(peak_rss_mb())}",
            f"-seed={base_seed}",
            "-max_len=8192",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
        ]
        start = time.monotonic()
        last = start
        log: list[str] = []
        state = {"done": 0, "rss": 0.0}

        def read(stream: Any) -> None:
            for line in stream:
                log.append(line.rstrip())
                del log[:-200]
                m = _STAT.search(line)
                if m:
                    state["done"] = int(m.group(1))
                    if m.group(3):
                        state["rss"] = max(state["rss"], float(m.group(3)))
                if line.startswith("stat::number_of_executed_units:"):
                    state["done"] = int(line.split(":")[-1])
                if line.startswith("stat::peak_rss_mb:"):
                    state["rss"] = float(line.split(":")[-1])

        # The child's peak RSS is read from /proc (VmHWM, its own address
        # space's): Linux keeps the high-water mark of the process that
        # spawned it across execve in getrusage, so libFuzzer's own RSS
        # figures and -rss_limit_mb start at this process's RSS; its limit is
        # raised by that much and the bound is checked here.
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with subprocess.Popen(  # noqa: S603 - our own module, our own arguments
            cmd,
            env=env,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        ) as proc:
            reader = threading.Thread(target=read, args=(proc.stderr,), daemon=True)
            reader.start()
            hwm = 0.0
            while True:
                hwm = max(hwm, _vm_hwm_mb(proc.pid))
                try:
                    rc = proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if now - last >= 30:
                    last = now
                    run.examples = int(state["done"])
                    run.peak_rss_mb = hwm
                    progress(_line(target, "atheris", run.examples, examples, now - start, run))
            reader.join(timeout=10)
        done = int(state["done"])
        run.peak_rss_mb = hwm
        run.seconds = time.monotonic() - start
        run.examples = done
        run.stopped_by = "examples" if done >= examples else "time"
        # Replays (crashes, then the corpus under coverage) share one checker:
        # for ``http`` one server, started on first use with the recorder
        # ACTIVE so that its thread records too, and stopped at the end.
        global ACTIVE
        recorder = new_recorder(target) if coverage else None
        ACTIVE = recorder
        check = _checker(target)
        stack.callback(_close_checker, check)
        start_server = getattr(check, "start", None)
        if start_server is not None and recorder is not None:
            start_server()  # now, so that what its start runs is cleared below
        for path in sorted(artifacts.iterdir()):
            run.crashes.append(_replay_crash(target, path, rc, log, check))
        if hwm > rss_limit_mb:
            run.crashes.append(
                Crash(target, "atheris", "memory", f"peak RSS {hwm:.0f} MB > {rss_limit_mb} MB",
                      "?", "", "")
            )  # fmt: skip
        if rc != 0 and not run.crashes:
            run.crashes.append(
                Crash(target, "atheris", f"exit {rc}", "\n".join(log[-20:]), "?", "", "")
            )
        run.notes.append(f"corpus: {sum(1 for _ in corpus.iterdir())} inputs")
        if recorder is not None:
            recorder.clear()  # what ran before (a server's start, crashes) is no corpus input's
            for path in sorted(corpus.iterdir()):
                data = path.read_bytes()
                recorder.install()
                try:
                    check(data)
                except Exception:  # noqa: S110 - a crash is reported above
                    pass
                finally:
                    recorder.remove()
            record_coverage(run, recorder)
    progress(_line(target, "atheris", run.examples, examples, run.seconds, run) + " done")
    return run


def _vm_hwm_mb(pid: int) -> float:
    """A live process's own peak RSS (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _checker(target: str) -> Callable[[bytes], None]:
    """The atheris child's check of one input, in this process. For ``http``
    it holds a server, started on its first input (its thread installs the
    recorder ``ACTIVE`` at that time) and stopped by ``_close_checker``."""
    from reliability.fuzz.atheris_main import one_input

    return one_input(target)


def _close_checker(check: Callable[[bytes], None]) -> None:
    global ACTIVE
    ACTIVE = None
    close = getattr(check, "close", None)
    if close is not None:
        close()


def _replay_crash(
    target: str,
    path: Path,
    rc: int,
    log: list[str],
    check: Callable[[bytes], None] | None = None,
) -> Crash:
    data = path.read_bytes()
    kind = path.name.split("-")[0]  # crash, timeout, oom, leak
    example = data[:2000].hex()
    digest = hashlib.sha256(data).hexdigest()[:12]
    try:
        (check or _checker(target))(data)
    except Exception as exc:
        return Crash(
            target,
            "atheris",
            type(exc).__name__,
            str(exc)[:2000],
            _signature(exc),
            f"input {digest} (hex): {example}",
            "".join(traceback.format_exception(exc))[-6000:],
        )
    return Crash(
        target,
        "atheris",
        kind,
        f"libFuzzer {kind} (exit {rc}); not reproduced on replay",
        "?",
        f"input {digest} (hex): {example}",
        "\n".join(log[-30:]),
    )

"""CI smoke of the fuzzing harness (``reliability/fuzz``): every target, a
fixed seed, a bounded number of examples. ``make fuzz`` runs the same targets
at full size.

Examples per target (environment):

- ``FUZZ_SMOKE_EXAMPLES`` (default 50,000): the total for the frame parser
  and each decoder; ``FUZZ_SMOKE_HYPOTHESIS`` (default 1,500) of them by
  hypothesis, the rest by atheris (coverage-guided, far faster);
- ``FUZZ_SMOKE_HTTP`` (default 5,000): the HTTP API by hypothesis
  (75-190 requests/s here: 50,000 would take 4.5-11 minutes alone);
- ``FUZZ_SMOKE_HTTP_ATHERIS`` (default 30,000): the HTTP API by atheris
  (1,100-1,900 requests/s here);
- ``FUZZ_SEED`` (default 0) seeds both engines.

No hypothesis example database is written (``database=None``).
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from reliability.fuzz import decoders, engine, frames
from reliability.fuzz.__main__ import atheris_available, run_target
from reliability.fuzz.engine import Run
from server import wsframe
from tests.services import require


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, "").replace("_", "").replace(",", "") or default)


TOTAL = _env("FUZZ_SMOKE_EXAMPLES", 50_000)
BY_HYPOTHESIS = min(TOTAL, _env("FUZZ_SMOKE_HYPOTHESIS", 1_500))
HTTP = _env("FUZZ_SMOKE_HTTP", 5_000)
HTTP_ATHERIS = _env("FUZZ_SMOKE_HTTP_ATHERIS", 30_000)
SEED = _env("FUZZ_SEED", 0)
SECONDS = 200.0  # a bound per run, far above what the counts above take

# Bugs the harness finds in code this harness may not change (reported, to be
# fixed by its owners): (pattern of the crash's signature, what it is). A
# run whose only failures are these is an expected failure, not a pass.
KNOWN: list[tuple[str, str]] = [
    # (a regex matching a crash's place, what the bug is) for bugs found and
    # not yet fixed: the run then ends as an expected failure naming them.
]


def _coverage() -> bool:
    # Under pytest-cov its own tracer measures; ours would only slow it.
    return sys.gettrace() is None


def assert_clean(run: Run) -> None:
    assert run.examples > 0
    unknown = [c for c in run.crashes if not any(re.search(p, c.where) for p, _ in KNOWN)]
    details = "\n\n".join(
        f"{c.kind} at {c.where}: {c.message[:800]}\n{c.example[:1500]}" for c in unknown
    )
    assert not unknown, f"{run.target}/{run.engine} found:\n{details}"
    assert run.rss_growth_mb <= engine.MEMORY_BOUND_MB, (
        f"RSS grew {run.rss_growth_mb} MB over the second half: {run.rss_samples}"
    )
    if run.crashes:
        known = {d for p, d in KNOWN for c in run.crashes if re.search(p, c.where)}
        pytest.xfail("known bug(s): " + "; ".join(sorted(known)))


TARGETS = ["frames", *decoders.DECODER_TARGETS]


@pytest.mark.parametrize("target", TARGETS)
def test_hypothesis(target: str) -> None:
    run = run_target(
        target, "hypothesis", examples=BY_HYPOTHESIS, seconds=SECONDS, seed=SEED,
        coverage=_coverage(),
    )  # fmt: skip
    assert_clean(run)


@pytest.mark.parametrize("target", TARGETS)
def test_atheris(target: str) -> None:
    # A loud skip, or under SQUALL_REQUIRE_SERVICES=1 (CI) a failure.
    require("atheris", atheris_available(), "pip install -e '.[test]' (or '.[fuzz]')")
    examples = TOTAL - BY_HYPOTHESIS
    if examples <= 0:
        pytest.skip("FUZZ_SMOKE_EXAMPLES leaves nothing to atheris")
    run = run_target(
        target, "atheris", examples=examples, seconds=SECONDS, seed=SEED, coverage=_coverage()
    )
    assert run.stopped_by == "examples", f"{run.examples} of {examples} in {run.seconds:.0f} s"
    assert_clean(run)


@pytest.mark.timeout(300)
def test_http() -> None:
    run = run_target("http", "hypothesis", examples=HTTP, seconds=SECONDS, seed=SEED,
                     coverage=_coverage())  # fmt: skip
    assert_clean(run)


@pytest.mark.timeout(300)
def test_http_atheris() -> None:
    require("atheris", atheris_available(), "pip install -e '.[test]' (or '.[fuzz]')")
    if HTTP_ATHERIS <= 0:
        pytest.skip("FUZZ_SMOKE_HTTP_ATHERIS is 0")
    run = run_target("http", "atheris", examples=HTTP_ATHERIS, seconds=SECONDS, seed=SEED,
                     coverage=_coverage())  # fmt: skip
    assert run.stopped_by == "examples", f"{run.examples} of {HTTP_ATHERIS} in {run.seconds:.0f} s"
    assert_clean(run)
    if run.lines:
        # The corpus replayed under coverage reached the keep-alive path.
        assert len(run.lines["handlers/api_keepalive.py"]) > 50, run.lines


# ---- the harness can fail --------------------------------------------------------


def test_a_parser_that_loses_a_byte_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant a bug in the unmasking of longer payloads: the valid-stream
    oracle (or the differential property) must catch it."""
    real = wsframe.unmask

    def broken(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
        out = real(mask, data)
        return out[:-1] if len(out) > 5 else out

    monkeypatch.setattr(wsframe, "unmask", broken)
    run = engine.run_hypothesis(
        "frames", frames.valid_case(), frames.check, examples=300, seconds=60, base_seed=1,
        coverage=False,
    )  # fmt: skip
    assert run.crashes, "the planted bug went unnoticed"
    assert run.crashes[0].kind == "AssertionError"


def test_a_decoder_that_leaks_another_exception_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = decoders.CODECS["squall"].decode

    def leaky(frame: bytes) -> list[object]:
        if b"[" in frame:
            raise KeyError("planted")
        return list(real(frame))

    monkeypatch.setattr(decoders.CODECS["squall"], "decode", leaky)
    run = run_target("squall", "hypothesis", examples=300, seconds=60, seed=1, coverage=False)
    assert [c.kind for c in run.crashes] == ["KeyError"]


def test_a_server_fault_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler that fails (planted in ``/api/info``) is a 500 and an
    uncaught exception in the server's log: the HTTP check reports it, named
    by where the server raised it."""
    from handlers.api import ApiMethods
    from reliability.fuzz import http

    async def broken(self: ApiMethods, body: dict[str, object]) -> dict[str, object]:
        raise RuntimeError("planted")

    monkeypatch.setattr(ApiMethods, "info", broken)
    raw = http.request("POST", "/api/info", [("Authorization", f"apikey {http.API_KEY}")], b"{}")
    with http.HttpTarget() as check, pytest.raises(http.ServerFault) as fault:
        check(http.HttpCase(raw, True, "planted"))
    assert "RuntimeError at handlers/api.py" in fault.value.signature
    assert "answered 500" in str(fault.value)


@pytest.mark.timeout(300)
def test_a_server_fault_is_caught_by_atheris(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the atheris engine: the child process plants the
    bug (``tests/fuzz/planted.py``, the ``channels`` API method raises),
    libFuzzer stops at its crash, and the parent replays the input on its
    own server (planted the same way) to name where the server raised."""
    require("atheris", atheris_available(), "pip install -e '.[test]' (or '.[fuzz]')")
    from handlers.api import ApiMethods
    from tests.fuzz import planted

    monkeypatch.setenv("FUZZ_ATHERIS_SETUP", "tests.fuzz.planted:install")
    monkeypatch.setattr(ApiMethods, "channels", planted.broken)
    run = run_target("http", "atheris", examples=20_000, seconds=120, seed=1, coverage=False)
    assert run.crashes, f"the planted bug went unnoticed in {run.examples} inputs"
    crash = run.crashes[0]
    assert crash.kind == "ServerFault", crash
    assert "RuntimeError at handlers/api.py" in crash.where, crash
    assert "planted" in crash.message

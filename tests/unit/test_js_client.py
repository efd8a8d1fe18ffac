"""Runs the browser client's unit tests (tests/js/*.test.mjs) under Node's test runner."""

from __future__ import annotations

import shutil
import subprocess

from tests.services import ROOT, require


def test_squall_js_unit_tests() -> None:
    node = shutil.which("node")
    require("node", node is not None, "install Node.js 20+ from the system's packages")
    assert node is not None
    files = sorted(str(p) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))
    proc = subprocess.run(
        [node, "--test", "--test-timeout=20000", *files],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout

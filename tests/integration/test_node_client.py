"""A Node.js client built from docs/protocol.md with only the `ws` package."""

from __future__ import annotations

import asyncio
import shutil

from tests.conftest import ServerFactory
from tests.services import ROOT, require


async def test_node_ws_client_follows_the_protocol_document(make_server: ServerFactory) -> None:
    node = shutil.which("node")
    require("node", node is not None, "install Node.js 20+")
    modules = ROOT / "tests" / "js" / "node_modules" / "ws"
    require("the ws package", modules.exists(), "make test runs npm ci in tests/js")
    assert node is not None
    server = await make_server({"namespaces": {"chat": {"allow_publish": True}}})
    proc = await asyncio.create_subprocess_exec(
        node,
        str(ROOT / "tests" / "js" / "protocol_client.mjs"),
        server.ws_url,
        server.http_url,
        server.token("mobile", ttl=600),
        server.token("mobile", ttl=1200),
        server.settings.auth.api_key,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode() + err.decode()
    assert b"all steps ok" in out

"""End-to-end in a real headless Chromium (Debian's), driven by Playwright:
the demo room, recovery across a server restart, the SSE fallback, and the
dashboard. Screenshots go to build/e2e/ (and, refreshed by hand, to
docs/screenshots/)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tornado.httpclient

from server.auth import hash_password
from tests.services import ROOT, SquallProcess, require

ARTIFACTS = Path(os.environ.get("SQUALL_ARTIFACTS", ROOT / "build" / "e2e"))
PASSWORD = "dashboard-pass-123"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-sync"]  # fmt: skip


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module", autouse=True)
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SquallProcess]:
    env = {
        "SQUALL_SERVER_DEMO": "1",
        "SQUALL_DASHBOARD_PASSWORD_HASH": hash_password(PASSWORD, iterations=1000),
        "SQUALL_API_KEY": "e2e-api-key-0123456789",
        "SQUALL_TOKEN_SECRET": "e" * 40,
        "SQUALL_SERVER_DRAIN_GRACE": "2",
        "SQUALL_LOG_LEVEL": "warning",
    }
    proc = SquallProcess(tmp_path / "data", env).start()
    yield proc
    proc.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    path = chromium_path()
    require("chromium", path is not None, "make test installs it: apt-get install chromium")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        require("playwright (Python)", False, "pip install playwright (no browser download)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def open_demo(
    browser: Any, server: SquallProcess, name: str, *, no_websocket: bool = False
) -> Any:
    page = await browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    if no_websocket:
        # A network that blocks WebSockets: the constructor is gone.
        await page.add_init_script("window.WebSocket = undefined;")
    await page.goto(f"http://127.0.0.1:{server.port}/demo?name={name}")
    await page.wait_for_selector("body[data-subscribed=yes]", timeout=15000)
    return page


async def say(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def texts(page: Any) -> list[str]:
    return list(
        await page.eval_on_selector_all("#messages li .text", "els => els.map(e => e.textContent)")
    )


async def offsets(page: Any) -> list[int]:
    return [
        int(x)
        for x in await page.eval_on_selector_all(
            "#messages li", "els => els.map(e => e.dataset.offset)"
        )
    ]


async def wait_texts(page: Any, expected: list[str], timeout: float = 15000) -> None:
    await page.wait_for_function(
        "n => document.querySelectorAll('#messages li').length >= n",
        arg=len(expected),
        timeout=timeout,
    )
    assert await texts(page) == expected


async def test_two_pages_talk_and_see_each_other(browser: Any, server: SquallProcess) -> None:
    alice = await open_demo(browser, server, "alice")
    bob = await open_demo(browser, server, "bob")
    await say(alice, "hi bob")
    await wait_texts(bob, ["hi bob"])
    await say(bob, "hi alice")
    await wait_texts(alice, ["hi bob", "hi alice"])
    await alice.wait_for_function("document.querySelector('#people').textContent.includes('bob')")
    await bob.fill("#text", "typing something")
    await bob.type("#text", "…")
    await alice.wait_for_function("document.querySelector('#typing').textContent.includes('bob')")
    await alice.screenshot(path=str(ARTIFACTS / "demo.png"))
    assert alice.errors == [] and bob.errors == []


async def test_restart_mid_conversation_recovers_without_gap_or_duplicate(
    browser: Any, server: SquallProcess
) -> None:
    alice = await open_demo(browser, server, "alice")
    bob = await open_demo(browser, server, "bob")
    for i in range(3):
        await say(alice, f"before {i}")
    await wait_texts(bob, [f"before {i}" for i in range(3)])
    port = server.port
    server.stop()  # SIGTERM: clients are told to reconnect
    await alice.wait_for_selector("#state:text('connecting')", timeout=10000)
    server.start(port=port)
    await alice.wait_for_selector("#state:text('connected')", timeout=20000)
    await bob.wait_for_selector("#state:text('connected')", timeout=20000)
    # Bob goes offline; Alice keeps talking; Bob comes back and catches up.
    await bob.click("#offline")
    await bob.wait_for_selector("#state:text('disconnected')")
    for i in range(4):
        await say(alice, f"after {i}")
    await wait_texts(alice, [f"before {i}" for i in range(3)] + [f"after {i}" for i in range(4)])
    await bob.click("#offline")
    expected = [f"before {i}" for i in range(3)] + [f"after {i}" for i in range(4)]
    await wait_texts(bob, expected)
    assert await offsets(bob) == list(range(1, 8))
    assert await offsets(alice) == list(range(1, 8))
    assert await bob.text_content("#gaps") == "0"
    assert len(await bob.query_selector_all("#messages li.recovered")) == 4


async def test_falls_back_to_sse_when_websockets_are_blocked(
    browser: Any, server: SquallProcess
) -> None:
    alice = await open_demo(browser, server, "alice")
    carol = await open_demo(browser, server, "carol", no_websocket=True)
    assert await carol.get_attribute("body", "data-transport") == "sse"
    await say(alice, "can you hear me")
    await wait_texts(carol, ["can you hear me"])
    assert carol.errors == []


async def status(server: SquallProcess) -> dict[str, Any]:
    client = tornado.httpclient.AsyncHTTPClient()
    return dict(orjson.loads((await client.fetch(f"http://127.0.0.1:{server.port}/status")).body))


async def test_dashboard_login_numbers_and_logout(browser: Any, server: SquallProcess) -> None:
    await open_demo(browser, server, "alice")
    await open_demo(browser, server, "bob")
    page = await browser.new_page(viewport={"width": 1100, "height": 700})
    await page.goto(f"http://127.0.0.1:{server.port}/dashboard")
    assert page.url.endswith("/dashboard/login?next=%2Fdashboard")
    await page.fill("#password", "wrong password")
    await page.click("button[type=submit]")
    assert "Wrong password" in (await page.text_content("#error") or "")
    await page.fill("#password", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_selector("body[data-ready=yes]", timeout=10000)
    snapshot = await status(server)
    assert await page.text_content("#connections") == str(snapshot["connections"])
    assert await page.text_content("#subscriptions") == str(snapshot["subscriptions"])
    await page.wait_for_function("document.querySelectorAll('#node-rows tr').length === 1")
    await page.wait_for_function(
        "document.querySelector('#channels').textContent.includes('demo:room')"
    )
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    await page.click("#logout")
    await page.wait_for_url("**/dashboard/login")
    await page.goto(f"http://127.0.0.1:{server.port}/dashboard")
    assert "/dashboard/login" in page.url

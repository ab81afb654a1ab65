"""`/`: the live dashboard in a real browser (Debian's Chromium driven by Playwright), on each loop.

`make test` installs Chromium (`SYSTEM_PACKAGES` in the Makefile); Playwright's own browser download
cannot work here and is never used. Set LOOPLAB_SCREENSHOTS=docs/img to refresh the committed
screenshots from this test.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from app.launch import ServerThread, running_server
from app.loops import LoopName
from app.monitor.lag import LagSampler

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
# Without the background-networking flags Chromium's connections are refused many at a time here.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
WAIT_MS = 20_000  # generous: the box is shared, and nothing here waits this long when healthy

pytestmark = [pytest.mark.slow, pytest.mark.host]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """One headless Chromium for the module, with a fresh profile directory."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make test` installs it "
            "(or: apt-get update && apt-get install -y --no-install-recommends chromium)"
        )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=LAUNCH_ARGS,
            viewport=LAPTOP,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: LOOPLAB_SCREENSHOTS (relative to the repo) or the test's tmp dir."""
    wanted = os.environ.get("LOOPLAB_SCREENSHOTS")
    if not wanted:
        return tmp_path
    path = REPO / wanted
    path.mkdir(parents=True, exist_ok=True)
    return path


class PageLog:
    """Console errors, uncaught exceptions and requests to anywhere but the server under test."""

    def __init__(self, page: Page, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("request", lambda req: self._request(req.url, origin))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _request(self, url: str, origin: str) -> None:
        if not url.startswith(origin + "/"):
            self.foreign.append(url)


def lag_now_ms(page: Page) -> float:
    return float(page.locator("#lag-now").get_attribute("data-value") or "nan")


def wait_until(page: Page, condition: str) -> None:
    """Wait for a JS condition, passed as a function: the page's CSP forbids eval'd strings."""
    page.wait_for_function(f"() => {condition}", timeout=WAIT_MS)


def lag_now(comparison: str) -> str:
    return f"Number(document.getElementById('lag-now').dataset.value) {comparison}"


def test_dashboard_shows_starvation_and_recovery(
    server: ServerThread, loop_name: LoopName, browser: BrowserContext, shots: Path
) -> None:
    """The page names the loop, and its lag figure rises past a /block burst's delay, then falls."""
    delay, concurrency = 0.8, 2
    page = browser.new_page()
    log = PageLog(page, server.url)
    try:
        page.goto(f"{server.url}/")
        expect(page.locator("#loop-name")).to_have_text(loop_name, timeout=WAIT_MS)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        assert page.locator("#pid").inner_text() == str(os.getpid())  # the test server's process
        expect(page.get_by_role("link", name="All endpoints (curl lines)")).to_have_attribute(
            "href", "/endpoints"
        )
        # a few seconds of idle history, with the loop idle: lag far below the coming block
        wait_until(page, "Number(document.getElementById('lag-chart').dataset.points) >= 12")
        wait_until(page, lag_now(f"< {delay * 1000 / 2}"))
        page.screenshot(path=shots / f"dashboard-idle-{loop_name}.png")

        page.get_by_label("Delay per request (s)").fill(str(delay))
        page.get_by_label("Concurrent requests").fill(str(concurrency))
        burst_log = page.locator("#burst-log li")

        # an await burst first: the same delay, and the loop never stops
        page.get_by_role("button", name="Fire /await").click()
        expect(burst_log.first).to_contain_text("all back", timeout=WAIT_MS)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")

        page.get_by_role("button", name="Fire /block").click()
        # while the loop sleeps no update can arrive: the page says so as it happens
        expect(page.locator("#conn")).to_have_attribute("data-state", "stalled", timeout=WAIT_MS)
        # the sampler notices a stall from its next due time, at most one interval into it
        floor_ms = (delay - LagSampler().interval) * 1000
        wait_until(page, lag_now(f">= {floor_ms}"))
        peak = lag_now_ms(page)
        expect(burst_log.first).to_contain_text("all back", timeout=WAIT_MS)
        expect(page.locator("#longest-step")).to_contain_text("/block")
        assert int(page.locator("#lag-chart").get_attribute("data-gaps") or 0) >= 1
        # three more updates, so the picture shows the stall and what came after it
        drawn = int(page.locator("#lag-chart").get_attribute("data-points") or 0)
        wait_until(
            page, f"Number(document.getElementById('lag-chart').dataset.points) >= {drawn + 3}"
        )
        page.screenshot(path=shots / f"dashboard-starved-{loop_name}.png")

        # and back: the figure falls once the stall leaves its one-second window
        wait_until(page, lag_now(f"< {delay * 1000 / 2}"))
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        assert peak >= floor_ms
        assert log.errors == []
        assert log.foreign == []  # self-contained: nothing from a CDN or anywhere else
    finally:
        page.close()


def test_dashboard_reconnects_after_a_server_restart(browser: BrowserContext) -> None:
    """When the server goes away the page says so, and it picks up the new server by itself."""
    page = browser.new_page()
    try:
        with running_server("asyncio") as first:
            page.goto(f"{first.url}/")
            expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
            assert first.server is not None
            port = first.server.port
            first.stop()
            expect(page.locator("#conn")).to_have_attribute(
                "data-state", "reconnecting", timeout=WAIT_MS
            )
        with running_server("uvloop", port=port) as second:
            expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
            expect(page.locator("#loop-name")).to_have_text("uvloop", timeout=WAIT_MS)
            assert second.server is not None
            # the page's history restarts with the new process (pid and loop both shown)
            expect(page.locator("#announce")).to_contain_text("restarted", timeout=WAIT_MS)
    finally:
        page.close()


def _burst_seconds(text: str) -> float:
    """'… : all back in 0.95 s (each at …)' -> 0.95"""
    return float(text.split("all back in ", 1)[1].split(" s", 1)[0])


def test_dashboard_fires_the_real_loop_killers(
    server: ServerThread, browser: BrowserContext
) -> None:
    """The /db and /upstream buttons fire their forms: blocking ones serialise, async overlap."""
    page = browser.new_page()
    log = PageLog(page, server.url)
    try:
        page.goto(f"{server.url}/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        page.get_by_label("Delay per request (s)").fill("0.3")
        page.get_by_label("Concurrent requests").fill("3")
        burst_log = page.locator("#burst-log li")
        seconds = {}
        for name in ("/db sync", "/db async", "/upstream requests", "/upstream aiohttp"):
            page.get_by_role("button", name=f"Fire {name}").click()
            expect(burst_log.first).to_contain_text("all back", timeout=WAIT_MS)
            text = burst_log.first.inner_text()
            assert "failed" not in text, text
            assert f"({name.split()[1]})" in text, text
            seconds[name] = _burst_seconds(text)
        # three blocking calls of 0.3 s take about 0.9 s; three async ones about 0.3 s
        assert seconds["/db sync"] >= 0.85
        assert seconds["/upstream requests"] >= 0.85
        assert seconds["/db async"] < seconds["/db sync"] / 2
        assert seconds["/upstream aiohttp"] < seconds["/upstream requests"] / 2
        assert log.errors == []
    finally:
        page.close()


def _hold(url: str, n: int) -> list[threading.Thread]:
    """`n` requests in flight from threads of this process (the page's own are capped at six)."""

    def get() -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()

    threads = [threading.Thread(target=get, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def test_dashboard_labels_a_stall_and_shows_where_tasks_wait(
    browser: BrowserContext, shots: Path
) -> None:
    """A /block stall band is labelled with its cause and line; the task panel names the await."""
    page = browser.new_page()
    with running_server("asyncio") as server:
        log = PageLog(page, server.url)
        held = _hold(f"{server.url}/await?delay=6", 20)
        try:
            page.goto(f"{server.url}/")
            expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
            row = page.locator("#tasks-table tbody tr", has_text="app/awaiting.py")
            expect(row).to_contain_text("await asyncio.sleep(delay)", timeout=WAIT_MS)
            expect(row.locator("td").first).to_have_text("20")
            expect(row).to_contain_text("/await")
            page.get_by_label("Delay per request (s)").fill("1.5")
            page.get_by_label("Concurrent requests").fill("1")
            page.get_by_role("button", name="Fire /block").click()
            label = page.locator('#lag-chart .stall-label[data-cause="syscall"]')
            expect(label).to_contain_text("syscall (clock_nanosleep)", timeout=WAIT_MS)
            expect(label).to_contain_text("app/blocking.py:")
            wait_until(page, "Number(document.getElementById('cause-chart').dataset.points) >= 8")
            expect(page.locator("#busy-now")).not_to_have_text(
                "\u2013"
            )  # the dash shown before the first update
            page.screenshot(path=shots / "dashboard-why.png")
            assert log.errors == []
            assert log.foreign == []
        finally:
            page.close()
            for thread in held:
                thread.join(timeout=10)

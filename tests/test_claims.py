"""Each claim of the article, pinned to the verdict its experiment supports today.

If Python or uvloop changes behaviour, the experiment's verdict changes and the test says which.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from typing import Any

import pytest

from app.claims import render
from app.claims.article import article_text, normalise
from app.claims.probes import only_loop
from app.claims.registry import VERDICTS, Claim, Outcome, all_claims, get_claim, verdict_of
from app.claims.runner import Result, run_claim


def check(claim_id: str) -> Result:
    result = run_claim(get_claim(claim_id))
    assert result.verdict != "error", result.evidence
    return result


def data(result: Result, key: str) -> Any:
    return result.data[key]


# --- the registry itself -----------------------------------------------------------------------


def test_at_least_fifteen_claims_each_pinned_here() -> None:
    """There are at least 15 claims, ids are unique, and each has its own test in this module."""
    ids = [c.id for c in all_claims()]
    assert len(ids) >= 15
    assert len(set(ids)) == len(ids)
    missing = [i for i in ids if f"test_{i}" not in globals()]
    assert not missing, f"claims without a test: {missing}"


def test_quotes_are_the_articles_exact_words() -> None:
    """Every quote appears verbatim in the article once whitespace is normalised."""
    article = normalise(article_text())
    for c in all_claims():
        assert normalise(c.quote) in article, c.id


def test_verdict_of_all_some_none() -> None:
    """verdict_of gives true when every check holds, false when none does, partly otherwise."""
    assert verdict_of({"a": True, "b": True}) == "true"
    assert verdict_of({"a": False, "b": False}) == "false"
    assert verdict_of({"a": True, "b": False}) == "partly"


def test_runner_turns_a_crash_into_an_error_result() -> None:
    """An experiment that raises yields verdict 'error' with the exception in the evidence."""

    def broken() -> Outcome:
        raise ValueError("boom")

    result = run_claim(Claim("broken", "c", "q", broken, timeout=5))
    assert result.verdict == "error"
    assert "ValueError('boom')" in result.evidence


def test_runner_gives_up_after_the_timeout() -> None:
    """An experiment that hangs yields verdict 'error' once its timeout passes."""
    release = threading.Event()

    def hangs() -> Outcome:
        release.wait(10)
        return Outcome("true", "late")

    try:
        result = run_claim(Claim("hangs", "c", "q", hangs, timeout=0.05))
    finally:
        release.set()
    assert result.verdict == "error"
    assert "timed out" in result.evidence


def test_renderers_show_every_result() -> None:
    """Text, JSON and Markdown each carry every claim, its verdict and its evidence."""
    results = [
        Result("a_id", "claim A", "quote | A", "true", "measured 1 ms", 0.1),
        Result("b_id", "claim B", "quote B", "partly", "asyncio: x; uvloop: y", 0.2),
    ]
    text = render.as_text(results, width=120)
    for shown in ("claim A", "partly", "uvloop: y"):
        assert shown in text
    assert [r["id"] for r in json.loads(render.as_json(results))] == ["a_id", "b_id"]
    markdown = render.as_markdown(results)
    assert "make claims" in markdown
    assert "quote \\| A" in markdown  # a pipe in a cell must not split the table row
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(results)  # header, rule, one row per result
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 6 for row in rows)  # five cells each


# --- one test per claim --------------------------------------------------------------------------


def test_eliminates_race_conditions() -> None:
    """No update is lost inside a step, but read-await-write loses updates on both loops."""
    result = check("eliminates_race_conditions")
    assert result.verdict == "partly"
    for lost_across, lost_sync in data(result, "lost").values():
        assert lost_across > 0
        assert lost_sync == 0


def test_first_example_order() -> None:
    """The first example prints exactly the article's output, in order, on both loops."""
    assert check("first_example_order").verdict == "true"


def test_single_threaded() -> None:
    """Only one callback runs at a time, all on the loop's thread, on both loops."""
    assert check("single_threaded").verdict == "true"


def test_switch_only_at_await() -> None:
    """Synchronous stretches are never interleaved; non-suspending awaits do not switch."""
    assert check("switch_only_at_await").verdict == "true"


def test_asyncio_run_fresh_loop() -> None:
    """asyncio.run makes a new loop per call, cancels leftovers, finalises asyncgens, closes it."""
    assert check("asyncio_run_fresh_loop").verdict == "true"


def test_create_task_next_iteration() -> None:
    """create_task's first step runs after exactly one poll, never inside create_task."""
    assert check("create_task_next_iteration").verdict == "true"


def test_create_task_eager() -> None:
    """eager_task_factory (3.12+): asyncio runs the first step in create_task; uvloop does not."""
    result = check("create_task_eager")
    eager = data(result, "eager")
    if sys.version_info < (3, 12):
        assert result.verdict == "true"
        assert eager is None
        return
    assert eager["asyncio"] == "ran inside create_task()"
    if sys.version_info < (3, 14):  # uvloop passes the factory an eager_start it does not take
        assert eager["uvloop"].startswith("create_task() raised TypeError")
    else:  # uvloop's own create_task ignores the eager factory's eagerness
        assert eager["uvloop"] == "deferred to the next iteration"
    assert result.verdict == ("false" if sys.version_info < (3, 14) else "partly")


def test_get_event_loop_outside() -> None:
    """get_event_loop() with no loop: silent on 3.11, warns on 3.12-3.13, raises on 3.14+."""
    result = check("get_event_loop_outside")
    got, warned = data(result, "get_event_loop"), data(result, "get_event_loop_warnings")
    if sys.version_info < (3, 12):
        assert result.verdict == "true"
        assert got.startswith("returned")
        assert not warned
    elif sys.version_info < (3, 14):
        assert result.verdict == "partly"
        assert got.startswith("returned")
        assert warned[0].startswith("DeprecationWarning")
    else:
        assert result.verdict in ("partly", "false")
        assert got.startswith("raised RuntimeError")


def test_call_soon_next_iteration() -> None:
    """call_soon callbacks run after exactly one poll, in FIFO order, on both loops."""
    assert check("call_soon_next_iteration").verdict == "true"


def test_call_later_after_delay() -> None:
    """asyncio never fires a call_later timer early; uvloop's millisecond rounding does."""
    result = check("call_later_after_delay")
    assert result.verdict == "partly"
    assert data(result, "early")["asyncio"] == 0 < data(result, "early")["uvloop"]


def test_call_at_loop_time() -> None:
    """By the loop's own clock asyncio's call_at is never early; uvloop's can be by < 1 ms."""
    result = check("call_at_loop_time")
    assert result.verdict == "partly"
    assert data(result, "early")["asyncio"] == 0 < data(result, "early")["uvloop"]


def test_gather_all_results() -> None:
    """gather takes about the longest delay, waits for all, returns results in argument order."""
    assert check("gather_all_results").verdict == "true"


def test_loop_time_since_start() -> None:
    """loop.time() is the monotonic clock, not seconds since the loop started, on both loops."""
    assert check("loop_time_since_start").verdict == "false"


def test_soon_before_io_later_after() -> None:
    """asyncio runs call_soon, I/O, then timers; uvloop runs I/O and timers before call_soon."""
    result = check("soon_before_io_later_after")
    assert result.verdict == "partly"
    order = data(result, "order")
    labels = [e for e in order["asyncio"] if e != "poll"]
    assert labels == ["call_soon", "I/O", "call_later(0)", "call_later(1 ms)"]
    assert order["uvloop"].index("I/O") < order["uvloop"].index("call_soon")


def test_asyncio_run_in_thread_raises() -> None:
    """asyncio.run in a thread works; only run_until_complete on the running loop raises."""
    result = check("asyncio_run_in_thread_raises")
    assert result.verdict == "false"
    for fresh, busy in data(result, "results").values():
        assert fresh == "returned 'done'"
        assert busy.startswith("RuntimeError")
        assert "already running" in busy.lower()


def test_run_coroutine_threadsafe_future() -> None:
    """run_coroutine_threadsafe returns a concurrent Future, runs on the loop thread, even early."""
    assert check("run_coroutine_threadsafe_future").verdict == "true"


def test_selector_no_busy_wait() -> None:
    """A loop waiting on a timer uses almost no CPU, on both loops."""
    assert check("selector_no_busy_wait").verdict == "true"


def test_sleep_registers_timer_with_selector() -> None:
    """asyncio.sleep adds nothing to the epoll set: the timer only bounds the poll timeout."""
    assert check("sleep_registers_timer_with_selector").verdict == "false"


@pytest.mark.slow
def test_ten_thousand_connections() -> None:
    """One loop thread serves 10,000 concurrent loopback connections, asyncio and uvloop alike."""
    result = check("ten_thousand_connections")
    assert result.verdict == "true"
    assert data(result, "n") == 10_000


def test_blocking_call_freezes_loop() -> None:
    """During time.sleep on the loop no other task runs, on both loops."""
    assert check("blocking_call_freezes_loop").verdict == "true"


@pytest.mark.host  # a real PostgreSQL from Debian's binaries
def test_sync_database_driver_freezes_loop() -> None:
    """sqlite3 and psycopg (real PostgreSQL) freeze the loop; aiosqlite, psycopg async do not."""
    result = check("sync_database_driver_freezes_loop")
    assert result.verdict == "true", result.evidence
    for by_form in data(result, "runs").values():
        assert set(by_form) == {"sqlite3", "aiosqlite", "psycopg", "psycopg async"}


def test_loop_not_thread_safe() -> None:
    """A foreign call_soon waits for the next wake-up; call_soon_threadsafe wakes the loop."""
    result = check("loop_not_thread_safe")
    assert result.verdict == "true"
    for latency in data(result, "latency_s").values():
        assert latency["call_soon"] > 10 * latency["threadsafe"]


def test_run_in_executor_keeps_loop_free() -> None:
    """While run_in_executor sleeps in a thread, other tasks keep running, on both loops."""
    assert check("run_in_executor_keeps_loop_free").verdict == "true"


def test_one_loop_per_process() -> None:
    """Two loops run at once in two threads, but a thread cannot run a second loop."""
    result = check("one_loop_per_process")
    assert result.verdict == "partly"
    assert data(result, "simultaneous") is True


def test_cross_thread_requires_rct() -> None:
    """call_soon_threadsafe and wrap_future also cross threads; rct is not the only way."""
    assert check("cross_thread_requires_rct").verdict == "partly"


def test_policy_set_debug() -> None:
    """The FAQ's get_event_loop_policy().set_debug(True) raises AttributeError."""
    result = check("policy_set_debug")
    assert result.verdict == "false"
    assert str(data(result, "raised")).startswith("AttributeError")


def test_debug_mode_logs() -> None:
    """Debug mode logs the slow callback but nothing for ordinary task switches."""
    result = check("debug_mode_logs")
    assert result.verdict == "partly"
    assert all(n >= 1 for n in data(result, "slow").values())
    assert all(n == 0 for n in data(result, "other").values())


def test_tasks_cheaper_than_threads() -> None:
    """2000 waiting tasks take less memory and time than 2000 waiting threads."""
    assert check("tasks_cheaper_than_threads").verdict == "true"


def test_cpu_bound_needs_processes() -> None:
    """Pure-Python threads gain nothing, processes do; GIL-releasing hashing gains in threads."""
    result = check("cpu_bound_needs_processes")
    if data(result, "contended"):
        pytest.skip(f"no CPU stood idle, parallelism cannot show: {result.evidence}")
    assert result.verdict == "partly", result.evidence
    used = data(result, "cpu_per_wall")
    assert used["threads"] <= 1.05 < used["processes"]


def test_loop_stop_finishes_iteration() -> None:
    """asyncio's stop halts right after the current batch; uvloop's runs one batch more."""
    result = check("loop_stop_finishes_iteration")
    assert result.verdict == "partly"
    checks = data(result, "checks")
    assert checks["asyncio halted right after"] is True
    assert checks["uvloop halted right after"] is False


def test_cancel_with_cancellederror() -> None:
    """task.cancel() stops a task by delivering CancelledError; raising it elsewhere does not."""
    assert check("cancel_with_cancellederror").verdict == "partly"


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_claims_json_shape() -> None:
    """`python -m app claims --json` prints >= 15 {id, claim, quote, verdict, evidence} items."""
    done = subprocess.run(
        [sys.executable, "-m", "app", "claims", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    items = json.loads(done.stdout)
    assert len(items) >= 15
    article = normalise(article_text())
    for item in items:
        assert set(item) == {"id", "claim", "quote", "verdict", "evidence"}
        assert item["verdict"] in VERDICTS, item
        assert item["evidence"]
        assert normalise(item["quote"]) in article, item["id"]


def test_one_loop_splits_a_verdict_that_differs_by_loop() -> None:
    """`claims --loop` runs per-loop experiments on that loop alone: call_later holds on one."""
    try:
        only_loop("asyncio")
        on_asyncio = check("call_later_after_delay")
        only_loop("uvloop")
        on_uvloop = check("call_later_after_delay")
    finally:
        only_loop(None)
    assert (on_asyncio.verdict, on_uvloop.verdict) == ("true", "false")
    assert set(data(on_asyncio, "early")) == {"asyncio"}
    assert set(data(on_uvloop, "early")) == {"uvloop"}

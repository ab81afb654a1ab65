"""`loop-lab top URL --once`: one frame of the live view, read from /stats and /tasks."""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from app.launch import ROOT, ServerThread, child_env


async def test_top_once_shows_a_stall_and_task_groups(server: ServerThread) -> None:
    """After a /block, one frame names its stall's cause and frame, and lists task groups."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/block?delay=0.3") as response:
            assert response.status == 200

        async def frame() -> str:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "top", server.url, "--once",
                cwd=ROOT, env=child_env({"COLUMNS": "160"}),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            assert proc.returncode == 0, out.decode()
            return out.decode()

        text = await frame()
        for _ in range(10):  # the stall is recorded at the lag tick after it: a frame or two
            if "clock_nanosleep" in text:
                break
            text = await frame()
    for expected in ("busy 1 s", "tasks by where they wait", "longest steps by route", "/block"):
        assert expected in text, text
    assert "syscall (clock_nanosleep)" in text
    assert "app/blocking.py:" in text


async def test_top_reports_an_unreachable_server() -> None:
    """A URL nothing serves: one line on stderr and exit status 1, no traceback."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "top", "http://127.0.0.1:9", "--once",
        cwd=ROOT, env=child_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 1
    assert b"Traceback" not in out
    assert b"127.0.0.1:9" in out

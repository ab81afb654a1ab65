"""scripts/instructions.py: reading callgrind's count, per-request arithmetic, argument checks."""

from __future__ import annotations

import io

import pytest

from scripts import instructions
from scripts.overhead import BenchError

VALGRIND_LOG = """\
==17057== Callgrind, a call-graph generating cache profiler
==17057== Events    : Ir
==17057== Collected : 1416982596
==17057==
==17057== I   refs:      1,416,982,596
"""


def test_collected_reads_the_exit_summary() -> None:
    """The instruction count is callgrind's 'Collected' line, not the formatted 'I refs' one."""
    assert instructions.collected(VALGRIND_LOG) == 1_416_982_596


def test_collected_without_a_summary_is_a_bench_error() -> None:
    """A valgrind log with no summary (the server died early) stops the measurement clearly."""
    with pytest.raises(BenchError, match="Collected"):
        instructions.collected("==1== Callgrind\n")


def test_per_request_cancels_startup_and_shutdown() -> None:
    """Two runs that share a fixed cost: the difference over the request counts is one request."""
    fixed, each = 1_400_000_000, 190_000
    assert instructions.per_request(fixed + 1000 * each, fixed + 5000 * each, 1000, 5000) == each
    with pytest.raises(ValueError, match="more requests"):
        instructions.per_request(1, 2, 5000, 1000)


def test_table_shows_the_extra_and_the_ratio() -> None:
    """The table gives loop-lab's extra instructions (absolute and relative) and bare/loop-lab."""
    table = instructions.markdown_table([instructions.Row("asyncio", "/healthz", 190_000, 200_000)])
    assert "| asyncio | `/healthz` | 190,000 | 200,000 | +10,000 (+5.3%) | 0.950 |" in table


@pytest.mark.parametrize(
    "argv",
    [["--loops", "trio"], ["--requests", "5000,1000"], ["--requests", "x"], ["--connections", "0"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown loops, N1 >= N2, non-numbers or no connections: exit 2 with one line, no run."""
    assert instructions.main(argv, out=io.StringIO()) == 2
    assert "instructions: need" in capsys.readouterr().err

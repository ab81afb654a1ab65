"""`loop-lab`: serve, bench, compare, claims, top."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app import config
from app.loops import LOOP_NAMES


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = config.build_settings(vars(args))
    except config.SettingError as exc:
        print(f"loop-lab serve: {exc}", file=sys.stderr)
        return 2
    level = logging.DEBUG if settings.debug else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.server import serve  # after validation: a bad flag fails fast, before heavy imports

    try:
        return serve(settings)
    except OSError as exc:  # e.g. address in use: one clear line, no traceback
        print(
            f"loop-lab serve: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1


def _claims(args: argparse.Namespace) -> int:
    from app.claims import main as claims_main

    code: int = claims_main(bool(args.json), bool(args.markdown), args.loop)
    return code


def _top(args: argparse.Namespace) -> int:
    try:
        from app.top import run
    except ImportError:  # rich comes with the `load` extra
        print("loop-lab top: needs rich (pip install 'loop-lab[load]')", file=sys.stderr)
        return 2
    return run(args.url, once=bool(args.once), interval=float(args.interval))


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loop-lab", description="See and measure the asyncio event loop under load."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service")
    config.add_arguments(serve)
    serve.set_defaults(func=_serve)

    claims = commands.add_parser("claims", help="check every claim of the article by experiment")
    claims.add_argument("--json", action="store_true", help="print a JSON list")
    claims.add_argument("--markdown", action="store_true", help="print the docs/claims.md table")
    claims.add_argument(
        "--loop",
        choices=LOOP_NAMES,
        default=None,
        help="run the experiments that compare loops on this loop only (default: both)",
    )
    claims.set_defaults(func=_claims)

    top = commands.add_parser("top", help="live terminal view of a running server")
    top.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    top.add_argument("--interval", type=_positive, default=1.0, help="seconds between frames")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=_top)

    # bench/compare live with their orchestration code and add their own subcommands
    try:
        from app.bench.cli import register as register_bench
    except ImportError:
        pass
    else:
        register_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

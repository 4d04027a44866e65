"""The ``streamlayer`` command (also ``python -m streamlayer``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamlayer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the layers side by side against a throwaway redis-server",
    )
    demo.add_argument(
        "--hosts",
        help="a redis:// URL to use instead of starting a throwaway server",
    )
    demo.add_argument("--messages", type=int, default=2000, help="messages per point-to-point run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.messages < 1:
            print("--messages must be at least 1", file=sys.stderr)
            return 2
        return run_demo(hosts=args.hosts, count=args.messages)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())

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
    bench = commands.add_parser(
        "bench",
        help="the benchmark suite: every layer and the raw redis-py floor, side by side",
    )
    bench.add_argument("--hosts", help="a redis:// URL instead of a throwaway server")
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="also draw a PNG chart (matplotlib)")
    bench.add_argument(
        "--only", action="append", metavar="LAYER", help="run only this layer (repeatable)"
    )
    bench.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    bench.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="rounds per layer, taking turns; figures are medians (default 3, quick 1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.messages < 1:
            print("--messages must be at least 1", file=sys.stderr)
            return 2
        return run_demo(hosts=args.hosts, count=args.messages)
    if args.command == "bench":
        from .bench import run_bench

        if args.repeat is not None and args.repeat < 1:
            print("--repeat must be at least 1", file=sys.stderr)
            return 2
        return run_bench(
            hosts=args.hosts,
            quick=args.quick,
            json_path=args.json,
            plot_path=args.plot,
            only=args.only,
            memory=not args.no_memory,
            repeat=args.repeat,
        )
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``streamlayer`` command (also ``python -m streamlayer``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

#: What --help says: plain text (the module docstring is reStructuredText).
_DESCRIPTION = (
    "streamlayer's command line (also python -m streamlayer): the demo and the "
    "benchmark on a throwaway Redis, and doctor and inspect for the Redis your "
    'layers use. In a Django project with "streamlayer" in INSTALLED_APPS, '
    "manage.py streamlayer_doctor and manage.py streamlayer_inspect do the same "
    "for its CHANNEL_LAYERS."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamlayer", description=_DESCRIPTION)
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
    doctor = commands.add_parser(
        "doctor", help="check that a Redis can carry a channel layer (exit 1 on a problem)"
    )
    doctor.add_argument(
        "--hosts",
        action="append",
        default=[],
        metavar="URL",
        help="a redis:// URL of a server, a Cluster node or a Sentinel (repeatable)",
    )
    doctor.add_argument(
        "--settings",
        nargs="?",
        const="",
        metavar="MODULE",
        help="check the streamlayer entries of a Django project's CHANNEL_LAYERS and "
        "every host they name (default: $DJANGO_SETTINGS_MODULE, else the nearest "
        "manage.py's)",
    )
    doctor.add_argument(
        "--layer",
        action="append",
        default=[],
        choices=["Streams", "compat.core", "compat.pubsub"],
        help="with --hosts: check the user's permissions for this layer only "
        "(repeatable; default: all three)",
    )
    doctor.add_argument(
        "--prefix", default="asgi", help="with --hosts: the layers' prefix (default: asgi)"
    )
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    inspect = commands.add_parser(
        "inspect", help="what a StreamsChannelLayer keeps in Redis: inboxes, channels, groups"
    )
    inspect.add_argument(
        "--hosts", action="append", default=[], metavar="URL", help="a redis:// URL (repeatable)"
    )
    inspect.add_argument(
        "--settings",
        nargs="?",
        const="",
        metavar="MODULE",
        help="inspect the hosts and prefix of each StreamsChannelLayer entry of a Django "
        "project's CHANNEL_LAYERS (default: $DJANGO_SETTINGS_MODULE, else the nearest "
        "manage.py's)",
    )
    inspect.add_argument("--prefix", default="asgi", help="the layer's prefix (default: asgi)")
    inspect.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    return parser


def _doctor(
    urls: list[str],
    settings_module: str | None,
    as_json: bool,
    layers: list[str] | None = None,
    prefix: str = "asgi",
) -> int:
    from .doctor import diagnose, scope_of

    reports: list[Any] = []
    if settings_module is not None:
        layers_reports = _doctor_settings(settings_module)
        if layers_reports is None:
            return 2
        reports += layers_reports
    scope = scope_of(layers or (), prefix)
    reports += [report for url in urls for report in diagnose(url, scope)]
    if as_json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        from .console import print_doctor

        print_doctor(reports)
    return 1 if any(r.problems for r in reports) else 0


def _doctor_settings(module: str) -> list[Any] | None:
    """The reports of :func:`~streamlayer.tools.doctor.diagnose_layers` on the Django
    settings ``module`` names, or None (said on stderr) when they cannot be read."""
    from .doctor import diagnose_layers

    read = _read_settings(module)
    if read is None:
        return None
    layers, timeout = read
    reports = diagnose_layers(layers, timeout)
    if not reports:
        print("CHANNEL_LAYERS has no streamlayer entry", file=sys.stderr)
    return reports


def _read_settings(module: str) -> tuple[dict[str, Any], float | None] | None:
    """``CHANNEL_LAYERS`` and ``STREAMLAYER_INTERFACE_TIMEOUT`` of the project's
    settings (see :mod:`streamlayer.tools.project`), or None (said on stderr)."""
    from .project import SettingsNotFound, locate_settings

    try:
        module = locate_settings(module)
    except SettingsNotFound as exc:
        print(f"--settings: {exc}", file=sys.stderr)
        return None
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        layers = dict(getattr(settings, "CHANNEL_LAYERS", {}) or {})
        timeout = getattr(settings, "STREAMLAYER_INTERFACE_TIMEOUT", None)
    except (ImportError, ImproperlyConfigured) as exc:
        print(f"cannot read the Django settings {module!r}: {exc}", file=sys.stderr)
        return None
    return layers, None if timeout is None else float(timeout)


def _inspect(urls: list[str], prefix: str, as_json: bool, settings_module: str | None) -> int:
    from .inspection import connect, inspect_layer

    targets: list[tuple[str, Any, str]] = [
        (url, lambda url=url: connect(url), prefix) for url in urls
    ]
    if settings_module is not None:
        found = _inspect_targets(settings_module)
        if found is None:
            return 2
        targets += found
    snapshots = []
    for where, make_client, layer_prefix in targets:
        client = make_client()
        try:
            snapshots.append(inspect_layer(client, layer_prefix, where))
        finally:
            client.close()
    if as_json:
        print(json.dumps([s.as_dict() for s in snapshots], indent=2))
        return 0
    from .console import print_inspection

    for snapshot in snapshots:
        print_inspection(snapshot)
    return 0


def _inspect_targets(module: str) -> list[tuple[str, Any, str]] | None:
    """Each host and prefix of the project's StreamsChannelLayer entries."""
    from ..backends import backend_of
    from ..config import ConfigError, LayerConfig
    from ..connections import create_sync_client

    read = _read_settings(module)
    if read is None:
        return None
    targets: list[tuple[str, Any, str]] = []
    for alias, entry in read[0].items():
        backend = str(entry.get("BACKEND", ""))
        shipped = backend_of(backend)
        if shipped is None or shipped.name != "Streams":
            if shipped is not None:
                print(f"CHANNEL_LAYERS[{alias!r}] ({backend}): inspect reads the Streams "
                      "layer's keys only", file=sys.stderr)  # fmt: skip
            continue
        try:
            config = LayerConfig.from_options(dict(entry.get("CONFIG", {}) or {}))
        except (TypeError, ValueError, ConfigError) as exc:
            print(f"CHANNEL_LAYERS[{alias!r}]: {exc}", file=sys.stderr)
            return None
        for host in config.hosts:
            where = f"CHANNEL_LAYERS[{alias!r}] on {host.describe()}"
            targets.append((where, lambda host=host: create_sync_client(host), config.prefix))
    if not targets:
        print("CHANNEL_LAYERS has no streamlayer.StreamsChannelLayer entry", file=sys.stderr)
        return None
    return targets


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
    if args.command == "doctor":
        if not args.hosts and args.settings is None:
            print("doctor needs --hosts URL or --settings [MODULE]", file=sys.stderr)
            return 2
        return _doctor(args.hosts, args.settings, args.json, args.layer, args.prefix)
    if args.command == "inspect":
        if not args.hosts and args.settings is None:
            print("inspect needs --hosts URL or --settings [MODULE]", file=sys.stderr)
            return 2
        return _inspect(args.hosts, args.prefix, args.json, args.settings)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())

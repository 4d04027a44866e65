"""``manage.py streamlayer_doctor``: ``python -m streamlayer doctor --settings`` for
this project (its CHANNEL_LAYERS, then every Redis they name); exit 1 on a problem."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...tools.cli import main


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Check this project's streamlayer CHANNEL_LAYERS entries and every Redis they "
        "name (exit status 1 on a problem)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--hosts", action="append", default=[], metavar="URL", help="also check this Redis"
        )
        parser.add_argument("--json", action="store_true", help="print the findings as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        argv = ["doctor", "--settings", ""]
        argv += [arg for url in options["hosts"] for arg in ("--hosts", url)]
        if options["json"]:
            argv.append("--json")
        code = main(argv)
        if code:
            raise CommandError("streamlayer doctor found a problem (see above)", returncode=code)

"""``manage.py streamlayer_inspect``: ``python -m streamlayer inspect --settings`` for
this project: what each StreamsChannelLayer entry keeps in its Redis."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...tools.cli import main


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Show what this project's StreamsChannelLayer entries keep in Redis: process "
        "inboxes, normal channels, groups and their history, memory."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        argv = ["inspect", "--settings", ""] + (["--json"] if options["json"] else [])
        code = main(argv)
        if code:
            raise CommandError("streamlayer inspect could not run (see above)", returncode=code)

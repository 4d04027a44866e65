"""Terminal output of the operator commands (``doctor``, ``inspect``), with rich.

Kept apart from what the commands find (:mod:`streamlayer.tools.doctor`,
:mod:`streamlayer.tools.inspection`), which return plain data that ``--json`` prints as is.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .doctor import ServerReport
from .inspection import LayerSnapshot

__all__ = ["print_doctor", "print_inspection"]

_STATUS_STYLE = {"ok": "green", "warn": "yellow", "problem": "bold red"}


def print_doctor(reports: list[ServerReport], console: Console | None = None) -> None:
    console = console or Console()
    for report in reports:
        table = Table(title=f"{report.address} ({report.role})", title_justify="left")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for finding in report.findings:
            style = _STATUS_STYLE.get(finding.status, "")
            table.add_row(finding.check, f"[{style}]{finding.status}[/]", finding.detail)
        console.print(table)
    problems = sum(r.problems for r in reports)
    if problems:
        console.print(f"[bold red]{problems} problem(s) found[/]")
    else:
        console.print("[green]no problems found[/]")


def print_inspection(snapshot: LayerSnapshot, console: Console | None = None) -> None:
    console = console or Console()
    where = f"{snapshot.source}, " if snapshot.source else ""
    console.print(
        f"{where}prefix {snapshot.prefix!r}: {snapshot.keys} keys, "
        f"{snapshot.memory_bytes:,} bytes of Redis memory"
    )
    inboxes = _table(
        "process inboxes",
        ["process", "backlog", "queued in process", "last message (s ago)", "read up to",
         "reader moved (s ago)"],
        [
            [i["process"], i["backlog"], i["queued_in_process"], _age(i["last_message_age_s"]),
             i["read_up_to"] or "-", _age(i["reader_age_s"])]
            for i in snapshot.inboxes
        ],
    )  # fmt: skip
    channels = _table(
        "normal channels",
        ["channel", "backlog", "pending", "consumers (pending, idle s)", "last message (s ago)"],
        [
            [c["channel"], c["backlog"], c["pending"], _consumers(c["consumers"]),
             _age(c["last_message_age_s"])]
            for c in snapshot.channels
        ],
    )  # fmt: skip
    groups = _table(
        "groups",
        ["group", "members", "history"],
        [[g["group"], g["members"], g["history"]] for g in snapshot.groups],
    )
    for table in (inboxes, channels, groups):
        console.print(table)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def _age(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _consumers(consumers: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['name']} ({c['pending']}, {c['idle_s']:.1f})" for c in consumers) or "-"

"""Finding a Django project's settings from the command line.

``python -m streamlayer doctor --settings`` runs where ``manage.py`` runs: in the
project's directory, often without ``DJANGO_SETTINGS_MODULE`` in the shell (it is
``manage.py`` that sets it). So, as ``manage.py`` would, the settings module is
the one named on the command line, else ``DJANGO_SETTINGS_MODULE``, else the one
the nearest ``manage.py`` (this directory or one above) sets by default, with
that directory importable.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

__all__ = ["SettingsNotFound", "locate_settings"]

#: What ``django-admin startproject`` writes into manage.py (and most projects keep).
_DEFAULT_MODULE = re.compile(
    r"""os\.environ\.setdefault\(\s*["']DJANGO_SETTINGS_MODULE["']\s*,\s*["']([\w.]+)["']"""
)
#: Directories looked through upwards for a manage.py (bounded, like any loop here).
_MAX_LEVELS = 32


class SettingsNotFound(LookupError):
    """No settings module was named and none could be found; the message says how
    to name one."""


def locate_settings(module: str = "") -> str:
    """Set ``DJANGO_SETTINGS_MODULE`` to the project's settings module and make the
    project importable; returns the module's name."""
    if module:
        _importable(Path.cwd())
    elif os.environ.get("DJANGO_SETTINGS_MODULE"):
        module = os.environ["DJANGO_SETTINGS_MODULE"]
        _importable(Path.cwd())
    else:
        module = _from_manage_py(Path.cwd())
    os.environ["DJANGO_SETTINGS_MODULE"] = module
    return module


def _from_manage_py(start: Path) -> str:
    here = start.resolve()
    for directory in [here, *here.parents][:_MAX_LEVELS]:
        manage = directory / "manage.py"
        if not manage.is_file():
            continue
        found = _DEFAULT_MODULE.search(manage.read_text(encoding="utf-8", errors="replace"))
        if found is None:
            raise SettingsNotFound(
                f"{manage} does not name its settings module: pass it, "
                "as in --settings mysite.settings"
            )
        _importable(directory)
        return found[1]
    raise SettingsNotFound(
        f"no settings module given, DJANGO_SETTINGS_MODULE is not set and there is no "
        f"manage.py in {here} or above: run it in your project's directory, or pass "
        "the module, as in --settings mysite.settings"
    )


def _importable(directory: Path) -> None:
    """Put ``directory`` first on sys.path, as running manage.py from it does."""
    path = str(directory)
    if path not in sys.path:
        sys.path.insert(0, path)

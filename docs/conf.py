"""Sphinx configuration for the streamlayer documentation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "streamlayer"
author = "streamlayer contributors"
copyright = "2026, streamlayer contributors"
release = "0.1.0.dev0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
html_theme = "alabaster"
exclude_patterns = ["_build"]
nitpicky = False

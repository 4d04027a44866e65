"""``"streamlayer"`` in ``INSTALLED_APPS``: registers the system checks of
:mod:`streamlayer.checks` (the layers themselves work without it)."""

from __future__ import annotations

from django.apps import AppConfig


class StreamlayerConfig(AppConfig):  # type: ignore[misc]
    name = "streamlayer"
    verbose_name = "streamlayer (Channels layers on Redis)"

    def ready(self) -> None:
        from django.core.checks import register

        from .checks import check_channel_layers

        register(check_channel_layers, "channel_layers")

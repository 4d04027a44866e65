"""Django system checks for ``CHANNEL_LAYERS`` entries that use streamlayer.

Registered when ``"streamlayer"`` is in ``INSTALLED_APPS`` (see
:mod:`streamlayer.apps`), so ``manage.py check``, ``runserver`` and ``migrate``
report a broken layer configuration before the first message is lost to it:

* ``streamlayer.E001``: a ``CONFIG`` the layer would refuse (an unknown or
  misspelt key, with the key it probably meant; a value of the wrong type or out
  of range);
* ``streamlayer.E002``: a ``BACKEND`` under ``streamlayer.`` that does not exist;
* ``streamlayer.W003``: ``group_history`` on a backend that cannot replay (accepted
  there, so switching ``BACKEND`` stays a one-line change: replay is off);
* ``streamlayer.W004``: ``presence_events`` on the Pub/Sub backend, which keeps no
  presence (accepted, no effect);
* ``streamlayer.W001``: an encryption key shorter than 32 bytes;
* ``streamlayer.W002``: ``expiry`` shorter than the interface server's timeouts
  (``STREAMLAYER_INTERFACE_TIMEOUT``, default 20 s: daphne's
  ``websocket_connect_timeout``), so a message can expire while the server still
  waits for the consumer to read it;
* ``streamlayer.W005``: the same of a ``channel_expiry`` pattern that matches the
  channels consumers are given (``specific.…!…``, Channels' ``new_channel()``
  default): a short expiry meant for progress events that catches every consumer.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning

from .backends import BACKENDS as SHIPPED
from .backends import backend_of
from .config import LayerConfig

__all__ = ["BACKENDS", "check_channel_layers", "check_layers"]

#: Every layer class streamlayer ships, by BACKEND path (see streamlayer.backends).
BACKENDS = tuple(backend.path for backend in SHIPPED)
#: daphne's websocket_connect_timeout: the longest an interface server waits by default.
DEFAULT_INTERFACE_TIMEOUT = 20.0
_MIN_KEY_BYTES = 32
#: What a consumer's channel looks like (new_channel()'s default prefix, on any layer).
_CONSUMER_CHANNEL = "specific.0123456789abcdef!1"


def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The check Django runs (registered by :class:`streamlayer.apps.StreamlayerConfig`):
    every streamlayer entry of ``settings.CHANNEL_LAYERS``."""
    layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    timeout = getattr(settings, "STREAMLAYER_INTERFACE_TIMEOUT", DEFAULT_INTERFACE_TIMEOUT)
    return check_layers(layers, interface_timeout=float(timeout))


def check_layers(
    layers: Mapping[str, Mapping[str, Any]],
    interface_timeout: float = DEFAULT_INTERFACE_TIMEOUT,
) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for alias, entry in layers.items():
        backend = str(entry.get("BACKEND", ""))
        if not backend.startswith("streamlayer."):
            continue
        where = f"CHANNEL_LAYERS[{alias!r}]"
        if backend_of(backend) is None:
            messages.append(_unknown_backend(where, backend))
            continue
        options = dict(entry.get("CONFIG", {}) or {})
        try:
            config = LayerConfig.from_options(options)
        except (TypeError, ValueError) as exc:
            messages.append(Error(f"{where}['CONFIG']: {exc}", obj=alias, id="streamlayer.E001"))
            continue
        messages += _check_config(where, alias, backend, options, config, interface_timeout)
    return messages


def _unknown_backend(where: str, backend: str) -> Error:
    close = difflib.get_close_matches(backend, BACKENDS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(BACKENDS)}"
    return Error(
        f"{where}['BACKEND'] is {backend!r}: streamlayer has no such layer",
        hint=hint,
        obj=backend,
        id="streamlayer.E002",
    )


def _check_config(
    where: str,
    alias: str,
    backend: str,
    options: Mapping[str, Any],
    config: LayerConfig,
    interface_timeout: float,
) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    shipped = backend_of(backend)
    if options.get("group_history") and not (shipped and shipped.replays):
        messages.append(
            Warning(
                f"{where}: group_history is set, but {backend} keeps no group history: "
                "replay is off on this backend",
                hint="replay needs BACKEND 'streamlayer.StreamsChannelLayer'",
                obj=alias,
                id="streamlayer.W003",
            )
        )
    if shipped is not None and shipped.pubsub and config.presence_events:
        messages.append(
            Warning(
                f"{where}: presence_events is set, but {backend} keeps no presence "
                "(Redis Pub/Sub knows subscribers, not group members)",
                hint="presence needs BACKEND 'streamlayer.StreamsChannelLayer' or "
                "'streamlayer.compat.core.RedisChannelLayer'",
                obj=alias,
                id="streamlayer.W004",
            )
        )
    for index, key in enumerate(config.symmetric_encryption_keys):
        size = len(key.encode() if isinstance(key, str) else key)
        if size < _MIN_KEY_BYTES:
            messages.append(
                Warning(
                    f"{where}: symmetric_encryption_keys[{index}] is {size} bytes long",
                    hint=f"use at least {_MIN_KEY_BYTES} random bytes, e.g. "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
                    obj=alias,
                    id="streamlayer.W001",
                )
            )
    messages += _check_channel_expiry(where, alias, options, config, interface_timeout)
    if config.expiry < interface_timeout:
        messages.append(
            Warning(
                f"{where}: expiry is {config.expiry:g} s, shorter than the interface "
                f"server's timeout of {interface_timeout:g} s",
                hint="a message can expire while the server still waits for its consumer; "
                "raise expiry, or set STREAMLAYER_INTERFACE_TIMEOUT to your server's",
                obj=alias,
                id="streamlayer.W002",
            )
        )
    return messages


def _check_channel_expiry(
    where: str,
    alias: str,
    options: Mapping[str, Any],
    config: LayerConfig,
    interface_timeout: float,
) -> list[CheckMessage]:
    """W005: a channel_expiry pattern shorter than the interface server's timeout that
    catches consumers' channels (the first matching pattern is the one that applies)."""
    written = list(options.get("channel_expiry") or {})  # as the user wrote them, in order
    for key, (pattern, expiry) in zip(written, config.channel_expiry, strict=True):
        if not pattern.match(_CONSUMER_CHANNEL):
            continue
        if expiry >= interface_timeout:
            return []
        return [
            Warning(
                f"{where}: channel_expiry pattern {getattr(key, 'pattern', key)!r} gives "
                "consumers' "
                f"channels ({_CONSUMER_CHANNEL.split('.')[0]}.…!…) an expiry of {expiry:g} s, "
                f"shorter than the interface server's timeout of {interface_timeout:g} s",
                hint="narrow the pattern to the channels meant to expire early "
                "(e.g. 'progress-*'), or raise its expiry",
                obj=alias,
                id="streamlayer.W005",
            )
        ]
    return []

"""The Django system checks for streamlayer's CHANNEL_LAYERS entries: each rule on
its own, and the whole thing through ``manage.py check`` with ``"streamlayer"`` in
INSTALLED_APPS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import ERROR

from streamlayer.checks import check_layers

STREAMS = "streamlayer.StreamsChannelLayer"
CORE = "streamlayer.compat.core.RedisChannelLayer"
PUBSUB = "streamlayer.compat.pubsub.RedisPubSubChannelLayer"


def ids(layers: dict[str, Any], **kwargs: Any) -> list[str]:
    return [message.id for message in check_layers(layers, **kwargs)]


def test_a_sound_config_passes_and_other_backends_are_not_ours() -> None:
    layers = {
        "default": {"BACKEND": STREAMS, "CONFIG": {"hosts": ["redis://127.0.0.1:6379"]}},
        "memory": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"x": 1}},
    }
    assert check_layers(layers) == []


def test_a_misspelt_key_is_an_error_naming_the_key_it_meant() -> None:
    [message] = check_layers({"default": {"BACKEND": STREAMS, "CONFIG": {"capacty": 10}}})
    assert message.id == "streamlayer.E001"
    assert "'capacty' (did you mean 'capacity'?)" in message.msg
    assert message.obj == "default"


def test_a_wrong_value_is_an_error() -> None:
    assert ids({"default": {"BACKEND": STREAMS, "CONFIG": {"expiry": -1}}}) == ["streamlayer.E001"]


def test_a_misspelt_backend_is_an_error_with_a_hint() -> None:
    [message] = check_layers({"default": {"BACKEND": "streamlayer.StreamChannelLayer"}})
    assert message.id == "streamlayer.E002"
    assert message.hint == "did you mean 'streamlayer.StreamsChannelLayer'?"


def test_group_history_on_a_backend_that_cannot_replay_is_a_warning() -> None:
    """The one-line BACKEND switch: group_history is accepted (no effect) by the compat
    layers, so the checks warn that replay is off instead of stopping the project."""
    config = {"group_history": 100}
    [message] = check_layers({"default": {"BACKEND": CORE, "CONFIG": config}})
    assert message.id == "streamlayer.W003" and message.level < ERROR
    assert "replay is off" in message.msg
    assert ids({"default": {"BACKEND": STREAMS, "CONFIG": config}}) == []


def test_short_encryption_keys_are_flagged_one_by_one() -> None:
    keys = ["short", "x" * 32, b"tiny"]
    found = check_layers(
        {"default": {"BACKEND": STREAMS, "CONFIG": {"symmetric_encryption_keys": keys}}}
    )
    assert [m.id for m in found] == ["streamlayer.W001", "streamlayer.W001"]
    assert "symmetric_encryption_keys[0] is 5 bytes" in found[0].msg
    assert "symmetric_encryption_keys[2] is 4 bytes" in found[1].msg


def test_an_expiry_shorter_than_the_interface_timeout_is_flagged() -> None:
    layers = {"default": {"BACKEND": STREAMS, "CONFIG": {"expiry": 10}}}
    assert ids(layers) == ["streamlayer.W002"]  # daphne waits 20 s by default
    assert ids(layers, interface_timeout=5) == []


def test_channel_expiry_is_checked_like_the_other_keys() -> None:
    """A bad channel_expiry is E001; a short one catching consumers' channels is W005,
    unless an earlier pattern (first match wins) takes them, and a narrow one passes."""
    bad = {"default": {"BACKEND": CORE, "CONFIG": {"channel_expiry": {"progress-*": 0}}}}
    [message] = check_layers(bad)
    assert message.id == "streamlayer.E001"
    assert "channel_expiry['progress-*']" in message.msg
    broad = {"default": {"BACKEND": STREAMS, "CONFIG": {"channel_expiry": {"*": 5}}}}
    [message] = check_layers(broad)
    assert message.id == "streamlayer.W005" and "pattern '*' gives" in message.msg
    assert ids(broad, interface_timeout=5) == []
    config = {"channel_expiry": {"specific.*": 60, "*": 5, "progress-*": 2}}
    assert ids({"default": {"BACKEND": PUBSUB, "CONFIG": config}}) == []


SETTINGS = """
SECRET_KEY = "checks"
INSTALLED_APPS = ["channels", "streamlayer"]
STREAMLAYER_INTERFACE_TIMEOUT = {timeout}
BACKEND = {backend!r}
CHANNEL_LAYERS = {{"default": {{"BACKEND": BACKEND, "CONFIG": {config}}}}}
"""


@pytest.mark.parametrize(
    ("backend", "config", "timeout", "code", "expected"),
    [
        (STREAMS, {"expiry": 60}, 20, 0, "System check identified no issues"),
        (STREAMS, {"hosts": ["redis://127.0.0.1:6379"], "expirey": 60}, 20, 1, "E001"),
        (STREAMS, {"expiry": 30}, 45, 0, "streamlayer.W002"),
        (STREAMS, {"hosts": ("localhost", 6379)}, 20, 1, "hosts=[('localhost', 6379)]"),
        # The compat switch of a project with replay configured still starts.
        (CORE, {"group_history": {"chat-*": 100}}, 20, 0, "streamlayer.W003"),
        (PUBSUB, {"presence_events": True}, 20, 0, "streamlayer.W004"),
        (CORE, {"presence_events": {"chat-*": True}}, 20, 0, "System check identified no"),
        (STREAMS, {"channel_expiry": {"progress-*": 5}}, 20, 0, "System check identified no"),
        (CORE, {"channel_expiry": {"*": 5}}, 20, 0, "streamlayer.W005"),
    ],
)
def test_manage_py_check_runs_them(
    tmp_path: Path, backend: str, config: dict[str, Any], timeout: int, code: int, expected: str
) -> None:
    settings = SETTINGS.format(backend=backend, config=repr(config), timeout=timeout)
    (tmp_path / "check_settings.py").write_text(textwrap.dedent(settings))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "django", "check", "--settings", "check_settings"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert expected in output

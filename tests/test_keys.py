"""Key names (streamlayer.keys): pure functions, so plain unit tests. The classic
layout's names are checked against channels_redis in test_wire_compat.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamlayer import keys


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (keys.stream_inbox_key, "inbox"),
        (keys.stream_inbox_state_key, "state"),
        (keys.stream_channel_key, "chan"),
        (keys.stream_delivered_key, "done"),
        (keys.stream_group_key, "group"),
        (keys.stream_group_digest_key, "gdigest"),
        (keys.stream_history_key, "history"),
        (keys.stream_history_meta_key, "hmeta"),
        (keys.stream_presence_key, "presence"),
        (keys.stream_presence_live_key, "plive"),
    ],
)
@pytest.mark.parametrize("name", ["jobs", "chat-42", "a{b}c", "x:{y}", "specific.1f!2"])
@pytest.mark.parametrize("prefix", ["asgi", "my:app", "p:s:q"])
def test_every_stream_key_parses_back(
    make: Callable[[str, str], str], kind: str, name: str, prefix: str
) -> None:
    assert keys.parse_stream_key(prefix, make(prefix, name)) == (kind, name)


@pytest.mark.parametrize(
    "key",
    [
        "asgi:group:room",  # the classic layout
        "asgispecific.abc!",  # a classic channel
        "asgi:s:other:{x}",  # not a kind of ours
        "other:s:chan:{x}",  # another prefix
        "asgi:s:chan:x",  # no braces
        "asgi:s:chan:{x",  # unterminated
    ],
)
def test_other_keys_are_not_parsed(key: str) -> None:
    assert keys.parse_stream_key("asgi", key) is None


def test_a_streams_key_keeps_its_hash_tag() -> None:
    """Every key of one channel, process or group shares a Cluster hash slot."""
    assert keys.stream_inbox_key("p", "ab12").endswith("{ab12}")
    assert keys.stream_inbox_state_key("p", "ab12").endswith("{ab12}")
    assert keys.stream_history_key("p", "room") != keys.stream_history_meta_key("p", "room")


@pytest.mark.parametrize(
    ("channel", "process"),
    [("specific.ab12!3", "ab12"), ("chat.ab12!", "ab12"), ("x.y.ab12!z", "ab12")],
)
def test_process_id_of(channel: str, process: str) -> None:
    assert keys.process_id_of(channel) == process


def test_process_id_of_a_normal_channel_is_refused() -> None:
    with pytest.raises(ValueError, match="not a process-specific channel"):
        keys.process_id_of("jobs")


def test_every_kind_has_its_key_function() -> None:
    """Each kind parse_stream_key knows is one a key function above makes."""
    made = {keys.parse_stream_key("p", f("p", "x"))[0] for f in _KEY_FUNCTIONS}  # type: ignore[index]
    assert made == set(keys.STREAM_KEY_KINDS)


_KEY_FUNCTIONS = [
    keys.stream_inbox_key,
    keys.stream_inbox_state_key,
    keys.stream_channel_key,
    keys.stream_delivered_key,
    keys.stream_group_key,
    keys.stream_group_digest_key,
    keys.stream_history_key,
    keys.stream_history_meta_key,
    keys.stream_presence_key,
    keys.stream_presence_live_key,
]


def test_a_groups_presence_sits_beside_its_membership() -> None:
    """Same hash slot (Streams), same shard by group name (compat.core), and no name a
    channel could have (channel names hold no colon)."""
    group = keys.stream_group_key("p", "room")
    beside = (
        keys.stream_presence_key("p", "room"),
        keys.stream_presence_live_key("p", "room"),
        keys.stream_group_digest_key("p", "room"),
    )
    for key in beside:
        assert key.endswith("{room}") and group.endswith("{room}")
    assert keys.classic_presence_key("asgi", "room") == "asgi:presence:room"
    assert keys.classic_presence_live_key("asgi", "room") == "asgi:plive:room"

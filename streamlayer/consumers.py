"""Connection notices and resume-from-position for Channels consumers.

:class:`NoticesMixin` asks the layer for its ``on_disconnect`` /
``on_reconnect`` notices on behalf of a consumer that handles them. Only
channels that asked get notices: Channels closes a consumer (WebSocket code
1011) that receives a message type it has no handler for, so ordinary
consumers must never see one.

Mix :class:`ReplayConsumerMixin` into an ``AsyncWebsocketConsumer`` or
``AsyncJsonWebsocketConsumer`` whose layer is a
:class:`~streamlayer.StreamsChannelLayer` with ``group_history``. The browser
keeps the position of the last message it showed and sends it back when it
reconnects (``?since=<position>``); the consumer joins its groups from there,
so the messages sent while the tab slept arrive first, in order, then live
ones. See ``docs/replay.rst`` for the whole recipe, browser side included.

The mixin also:

* drops a message it already handed on (by position), so a resync never shows
  one twice;
* re-joins from the last positions it handed on when the layer reports a
  reconnect with ``recovered=False`` (Redis lost its data: the group membership
  and the inbox with it), so nothing sent meanwhile is missed;
* calls :meth:`~ReplayConsumerMixin.replay_incomplete` when some messages are
  gone for good (history trimmed, expired or lost), for the app to have the
  client reload (:meth:`~ReplayConsumerMixin.load_history` reads the backlog
  and drops the replayed copies of what it holds).

:class:`PresenceConsumerMixin` joins groups with presence (who is here, with a
little info from the connection's scope), answers a client's "who is here" and
forwards the join and leave events of the group to clients that asked. It works
with the replay mixin or on its own; see ``docs/presence.rst``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs

from .history import POSITION_KEY, HistoryPage, Position

__all__ = ["NoticesMixin", "PresenceConsumerMixin", "ReplayConsumerMixin"]

logger = logging.getLogger(__name__)


@dataclass
class _ReplayState:
    """One connection's replay bookkeeping."""

    #: Groups joined with replay (left again on disconnect).
    joined: list[str] = field(default_factory=list)
    #: Per group, the positions recently handed on (oldest first), to drop duplicates.
    seen: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    #: Per group, the last position handed on: where a resync starts.
    last: dict[str, str] = field(default_factory=dict)


class NoticesMixin:
    """Receive the layer's ``on_disconnect`` / ``on_reconnect`` notices: mix it in
    before the consumer class and define the handlers (``redis_reconnect`` for
    ``"redis.reconnect"``). The consumer asks on its first message (a WebSocket's
    connect), before anything it does could be missed."""

    # Provided by the consumer class this is mixed into.
    channel_layer: Any
    channel_name: str
    _notices_asked: bool = False

    async def dispatch(self, message: dict[str, Any]) -> None:
        if not self._notices_asked:
            self._notices_asked = True
            want = getattr(self.channel_layer, "want_notices", None)
            if want is not None:  # other layers send no notices
                want(self.channel_name)
        await super().dispatch(message)  # type: ignore[misc]


class ReplayConsumerMixin(NoticesMixin):
    """Join groups from the client's last position; see the module docstring. It asks
    for notices itself (a reconnect that lost data makes it re-join)."""

    #: Groups to join with replay (or override :meth:`get_replay_groups`).
    replay_groups: ClassVar[list[str]] = []
    #: Query-string parameter carrying the client's last position. With several
    #: groups, each has its own: ``since.<group>``.
    since_parameter: ClassVar[str] = "since"
    #: Positions remembered per group to drop duplicates.
    seen_window: ClassVar[int] = 1024

    # Provided by the consumer class this is mixed into.
    channel_layer: Any
    channel_name: str
    scope: dict[str, Any]
    _replay_state: _ReplayState | None = None

    @property
    def replay_state(self) -> _ReplayState:
        if self._replay_state is None:
            self._replay_state = _ReplayState()
        return self._replay_state

    async def get_replay_groups(self) -> list[str]:
        """The groups this connection joins (override to use the URL, the user...)."""
        return list(self.replay_groups)

    def get_since(self, group: str, groups: list[str]) -> str | None:
        """The client's last position in ``group``, from the query string."""
        query = self.scope.get("query_string", b"")
        params = parse_qs(query.decode("latin-1") if isinstance(query, bytes) else query)
        name = self.since_parameter if len(groups) == 1 else f"{self.since_parameter}.{group}"
        values = params.get(name)
        return values[-1] if values else None

    async def replay_incomplete(self, group: str) -> None:
        """Some messages after the client's position in ``group`` are gone (trimmed,
        expired, or lost with Redis' data). Override to have the client reload, for
        example by sending it the page :meth:`load_history` returns."""

    async def load_history(self, group: str, limit: int = 100) -> HistoryPage:
        """The latest ``limit`` retained messages of ``group``, for the client to show
        instead of what it had. They count as handed on: their replayed copies, already
        queued for this connection, are dropped. Where nothing is retained (a group
        without history, a backend without replay) the page is empty and incomplete:
        the client keeps what it shows."""
        read = getattr(self.channel_layer, "group_history", None)
        if read is None:  # not a streamlayer layer
            return HistoryPage(complete=False)
        page: HistoryPage = await read(group, limit=limit)
        for message in page.messages:
            self._first_time(message[POSITION_KEY])
        return page

    @staticmethod
    def position_of(event: dict[str, Any]) -> str | None:
        """The position a group message carries (None for other messages)."""
        tag = event.get(POSITION_KEY)
        return tag.get("position") if isinstance(tag, dict) else None

    # --- joining -----------------------------------------------------------------------

    async def join_replay_groups(self) -> dict[str, bool | None]:
        """Join every replay group from the client's position; call it in ``connect()``
        (after ``accept()``). Returns, per group, whether the replay was complete
        (None: the client sent no position, so there was nothing to replay)."""
        groups = await self.get_replay_groups()
        results: dict[str, bool | None] = {}
        for group in groups:
            results[group] = await self._join(group, self.get_since(group, groups))
            self.replay_state.joined.append(group)
        return results

    async def _join(self, group: str, since: str | None) -> bool | None:
        layer, channel = self.channel_layer, self.channel_name
        if since is None:
            await layer.group_add(group, channel)
            return None
        if _is_position(since) and hasattr(layer, "group_history"):
            # False where the group or the backend keeps no history (logged once).
            complete = bool(await layer.group_add(group, channel, since=since))
        else:  # a malformed position, or not a streamlayer layer
            await layer.group_add(group, channel)
            complete = False
        if not complete:
            await self.replay_incomplete(group)
        return complete

    async def resync(self) -> None:
        """Re-join every group from the last position handed on (after Redis lost data)."""
        state = self.replay_state
        for group in state.joined:
            await self._join(group, state.last.get(group))

    # --- the message path ----------------------------------------------------------------

    def _first_time(self, tag: dict[str, Any]) -> bool:
        """Remember a group message's position; False if it was handed on before."""
        group, position = tag.get("group"), tag.get("position")
        if not isinstance(group, str) or not isinstance(position, str):
            return True
        state = self.replay_state
        seen = state.seen.setdefault(group, OrderedDict())
        if position in seen:
            return False
        seen[position] = None
        if len(seen) > self.seen_window:
            seen.popitem(last=False)
        state.last[group] = position
        return True

    async def dispatch(self, message: dict[str, Any]) -> None:
        tag = message.get(POSITION_KEY)
        if isinstance(tag, dict) and not self._first_time(tag):
            return  # a duplicate from a resync: the client has it already
        config = getattr(self.channel_layer, "config", None)
        kind = message.get("type")
        if config is not None and kind in (config.on_reconnect, config.on_disconnect):
            if kind == config.on_reconnect and message.get("recovered") is False:
                await self.resync()
            if not hasattr(self, str(kind).replace(".", "_")):
                return  # the app has no handler for the notice: it was for us
        await super().dispatch(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        for group in self.replay_state.joined:
            await self.channel_layer.group_discard(group, self.channel_name)
        await super().websocket_disconnect(message)  # type: ignore[misc]


class PresenceConsumerMixin:
    """Join groups with presence; answer "who is here"; forward who comes and goes.

    Mix it in before an ``AsyncJsonWebsocketConsumer``; call
    :meth:`join_presence_groups` in ``connect()`` (after ``accept()``) and, first
    thing in ``receive_json``, ``if await self.answer_presence_request(content):
    return``. A client sending ``{"presence": "who"}`` gets ``{"presence": "here",
    "group": ..., "members": [{"channel", "info", "joined"}...]}`` and from then on
    ``{"presence": "join" | "leave", "group", "channel", "info"}`` as members come and
    go (with ``presence_events`` on for the group); clients that never ask get no
    presence frames. Leaving is group_discard on disconnect; a crashed process's
    members leave by ``presence_timeout``.
    """

    #: Groups to join with presence (or override :meth:`get_presence_groups`).
    presence_groups: ClassVar[list[str]] = []

    # Provided by the consumer class this is mixed into.
    channel_layer: Any
    channel_name: str
    scope: dict[str, Any]
    _presence_joined: list[str] | None = None
    _presence_watching: bool = False

    async def get_presence_groups(self) -> list[str]:
        """The groups this connection is present in (override to use the URL...)."""
        return list(self.presence_groups)

    def get_presence_info(self) -> dict[str, Any]:
        """What others see of this connection: the authenticated user's id and name
        (``AuthMiddlewareStack`` puts the user in the scope), else ``{"user": None}``.
        Override to add a device, a display name...; keep it small."""
        user = self.scope.get("user")
        if user is not None and getattr(user, "is_authenticated", False):
            return {"user": user.pk, "name": user.get_username()}
        return {"user": None}

    async def join_presence_groups(self) -> None:
        """Join every presence group with this connection's info."""
        info = self.get_presence_info()
        joined = self._presence_joined = []
        for group in await self.get_presence_groups():
            await self.channel_layer.group_add(group, self.channel_name, presence=info)
            joined.append(group)

    async def answer_presence_request(self, content: Any) -> bool:
        """Answer ``{"presence": "who"}`` (True: it was one; the client now watches)."""
        if not isinstance(content, dict) or content.get("presence") != "who":
            return False
        self._presence_watching = True
        for group in self._presence_joined or []:
            members = await self.channel_layer.presence(group)
            await self.send_json({"presence": "here", "group": group, "members": members})  # type: ignore[attr-defined]
        return True

    async def presence_join(self, event: dict[str, Any]) -> None:
        await self.forward_presence(event)

    async def presence_leave(self, event: dict[str, Any]) -> None:
        await self.forward_presence(event)

    async def forward_presence(self, event: dict[str, Any]) -> None:
        """Send a join or leave to the client, if it asked who is here."""
        if not self._presence_watching:
            return
        kind = str(event.get("type", "")).rpartition(".")[2]
        frame = {key: event.get(key) for key in ("group", "channel", "info")}
        await self.send_json({"presence": kind, **frame})  # type: ignore[attr-defined]

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        for group in self._presence_joined or []:
            await self.channel_layer.group_discard(group, self.channel_name)
        await super().websocket_disconnect(message)  # type: ignore[misc]


def _is_position(value: str) -> bool:
    try:
        Position.parse(value)
    except ValueError as exc:
        logger.info("ignored a malformed position from a client: %s", exc)
        return False
    return True

"""Where streamlayer leans on redis-py beyond its documented client API.

Everything else calls redis-py's clients, pools and commands as its docs show them;
what follows reaches into a connection or a pool, which redis-py may change in any
release. Kept in one module so that an upgrade is checked here, and so that CI's run
on the oldest redis-py ``pyproject.toml`` allows (``.ci/run``) covers each use:

- :func:`make_writes_lean`: a connection class whose writes are bounded by
  ``asyncio.timeout`` instead of redis-py's ``wait_for`` (a task per command),
  for redis-py's own connection classes (a user's class writing its own way is
  left alone).
- :func:`open_own_connection` and :func:`read_push`: the Pub/Sub subscriber's own
  connection, outside the pool's lending, read with a heartbeat timeout without
  redis-py closing it on a timeout.
- :func:`lend_connection` and :class:`KeptConnection`: an asyncio pool's connection
  kept by its borrower.
- :func:`exchange`: commands written to a connection of one's own as one write, and
  their replies read back, as a pipeline does without a pipeline's cost (the inbox
  reader's blocking reads, the batcher's calls): packed by
  ``_LeanWrites.pack_commands``, read straight from the connection's ``_parser``,
  bounded by a :class:`_Watch` that fails a silent server's read through the
  connection's ``_reader`` (asyncio's ``StreamReader``).
- :func:`lend_sync_connection`: a synchronous pool's connection, to send a command in
  one thread and read its reply later (the sync-caller path, doctor's transaction).
  Its signature changed in redis-py 5.3: the command name was required before and is
  deprecated since.
- :func:`key_slot`: Redis Cluster's slot of a key, from redis-py's own CRC16.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import redis
from redis import asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "KeptConnection",
    "evalsha",
    "exchange",
    "give_back",
    "key_slot",
    "lend_connection",
    "lend_sync_connection",
    "make_writes_lean",
    "open_own_connection",
    "read_push",
    "read_replies",
    "write_now",
]


def _find_hiredis_pack() -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis' packer, if hiredis is installed (it is optional: redis-py's own packer
    then) and has one (2.0+)."""
    try:
        import hiredis
    except ImportError:
        return None
    return cast(
        "Callable[[tuple[Any, ...]], bytes] | None", getattr(hiredis, "pack_command", None)
    )


_hiredis_pack = _find_hiredis_pack()


class _LeanWrites:
    """Bounds a socket write by ``socket_timeout`` the cheap way (or not at all when
    it cannot wait), and packs commands with hiredis in one call.

    redis-py wraps every write in ``asyncio.wait_for``, which runs it as a task of
    its own: measured here at 20-35 us of CPU per command, a third of what a PING
    costs. ``asyncio.timeout`` sets the same bound on the current task for next to
    nothing. Errors are reported exactly as redis-py reports them.

    redis-py, even with hiredis, encodes each argument in Python before hiredis packs
    them: a dozen function calls per argument, the largest single cost of a script
    call in the profile of a request/reply exchange (``docs/performance.rst``).
    hiredis takes the arguments as they are (str as UTF-8, int, float, bytes); anything
    else, a multi-word command name, or another encoding than UTF-8 goes to
    redis-py's packer, which also reports a bad argument as redis-py does.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        pack = _hiredis_packer(cast(Connection, self), [args]) if args else None
        if pack is not None:
            try:
                return [pack(args)]
            except TypeError:
                pass
        return cast(list[bytes], super().pack_command(*args))  # type: ignore[misc]

    def pack_commands(self, commands: Iterable[tuple[Any, ...]]) -> list[bytes]:
        """Several commands for one write (:func:`exchange`'s): each packed by hiredis
        in one call, as :meth:`pack_command` does; redis-py's packer when any of them
        needs it. Kept as one chunk per command, not joined: a large message is not
        copied once more."""
        commands = list(commands)
        pack = _hiredis_packer(cast(Connection, self), commands)
        if pack is not None:
            try:
                return [pack(command) for command in commands]
            except TypeError:
                pass
        return cast(list[bytes], super().pack_commands(commands))  # type: ignore[misc]

    def write_now(self, commands: list[tuple[Any, ...]]) -> bool:
        """Write ``commands`` as one write, at once and without awaiting, if that
        cannot wait (see :func:`_write_cannot_wait`); False, writing nothing, if it
        could or the connection is not up. What lets a script call ride with the
        inbox reader's next read from the caller's own task (no other task can run
        between the check and the write)."""
        connection = cast(Connection, self)
        if not connection.is_connected:
            return False
        packed = self.pack_commands(commands)
        if not _write_cannot_wait(connection, packed):
            return False
        try:
            _write_at_once(connection, packed)
        except OSError:
            return False  # closing: nothing was written
        return True

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        connection = cast(Connection, self)
        if not connection.socket_timeout or not connection.is_connected:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if check_health and connection.health_check_interval:
            await connection.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        elif not isinstance(command, list):
            command = list(command)
        try:
            if _write_cannot_wait(connection, command):
                _write_at_once(connection, command)
            else:
                async with asyncio.timeout(connection.socket_timeout):
                    await connection._send_packed_command(command)
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await connection.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await connection.disconnect(nowait=True)
            raise


def _hiredis_packer(
    connection: Connection, commands: Sequence[tuple[Any, ...]]
) -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis' packer if it may pack ``commands`` for ``connection`` as they are: it
    is installed, the connection encodes as hiredis does, and every command name is
    one word (redis-py splits "CLIENT LIST" in two)."""
    if _hiredis_pack is None or not _packs_utf8(connection):
        return None
    return _hiredis_pack if all(_one_word(command[0]) for command in commands) else None


def _one_word(name: Any) -> bool:
    return not (b" " in name if isinstance(name, bytes) else " " in str(name))


def _write_at_once(connection: Connection, command: list[bytes]) -> None:
    """Write ``command`` to the transport, which sends or buffers it at once (see
    :func:`_write_cannot_wait`): redis-py's write is this plus ``drain()``, which has
    nothing to wait for here and would only report a lost connection, which the
    reply's read reports as well (the transport keeps nothing of a write after it
    lost its connection)."""
    writer = connection._writer
    if writer is None or writer.transport.is_closing():
        raise ConnectionResetError("Connection closed by the server before write")
    writer.writelines(command)


#: A write this small to an empty transport buffer cannot wait (asyncio pauses a writer
#: only past its high-water mark, 64 KiB by default).
_WRITE_THAT_CANNOT_WAIT = 16 * 1024


def _write_cannot_wait(connection: Connection, command: list[bytes]) -> bool:
    """Whether writing ``command`` returns at once: the transport hands it to the socket
    or buffers it, and ``drain()`` has nothing to wait for. Such a write needs no
    timeout, and arming and cancelling one costs 15-20 us of CPU per command here."""
    writer = connection._writer
    if writer is None:
        return False
    if writer.transport.get_write_buffer_size():
        return False
    return sum(len(chunk) for chunk in command) < _WRITE_THAT_CANNOT_WAIT


def _packs_utf8(connection: Connection) -> bool:
    """Whether the connection encodes str as hiredis does (UTF-8, strict); decided once
    per connection (its encoder is fixed when it is made), not at every command."""
    known: bool | None = connection.__dict__.get("_streamlayer_utf8")
    if known is None:
        encoder = connection.encoder
        name = encoder.encoding.lower().replace("-", "").replace("_", "")
        known = name == "utf8" and encoder.encoding_errors == "strict"
        connection.__dict__["_streamlayer_utf8"] = known
    return known


_lean_classes: dict[type[Any], type[Any]] = {}


def lean_connection_class(cls: type[Any]) -> type[Any]:
    """``cls`` (plain, TLS, unix socket or Sentinel-managed) with :class:`_LeanWrites`."""
    lean = _lean_classes.get(cls)
    if lean is None:
        lean = _lean_classes[cls] = type(f"Lean{cls.__name__}", (_LeanWrites, cls), {})
    return lean


def make_writes_lean(pool: aioredis.ConnectionPool) -> None:
    """Have ``pool`` make connections with :class:`_LeanWrites` from now on, unless its
    connection class writes its own way: a ``connection_class`` given in ``hosts``
    that overrides ``send_packed_command`` (to count or trace writes, say) keeps
    every write going through its override."""
    cls = pool.connection_class
    if cls.send_packed_command is AbstractConnection.send_packed_command:
        pool.connection_class = lean_connection_class(cls)


async def open_own_connection(pool: aioredis.ConnectionPool) -> AbstractConnection:
    """A new, connected connection made as ``pool`` makes its own, but not lent by it:
    its owner reads from it for as long as it lives and closes it itself."""
    connection: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
    await connection.connect()  # type: ignore[no-untyped-call]
    return connection


async def open_node_connection(client: Any, node_name: str) -> AbstractConnection:
    """A new, connected connection to the node ``node_name`` of the cluster ``client``,
    made as the node makes its own (same options), owned by the caller."""
    node = client.get_node(node_name=node_name)
    if node is None:  # gone from the map (a failed master): ask the map again
        raise ConnectionError(f"cluster node {node_name} is not in the cluster's map")
    connection: AbstractConnection = node.connection_class(**node.connection_kwargs)
    await connection.connect()  # type: ignore[no-untyped-call]
    return connection


def cluster_node_of(client: Any, name: str) -> Any:
    """The node of the cluster ``client`` owning ``name``'s slot (its map must be
    loaded: see refresh_cluster_map)."""
    return client.get_node_from_key(name)


async def load_cluster_map(client: Any) -> None:
    """Load the cluster's map of slots to nodes, unless ``client`` has it already."""
    await client.initialize()


async def refresh_cluster_map(client: Any) -> None:
    """Ask the cluster again which node owns which slot (after a failover or a
    resharding)."""
    await client.nodes_manager.initialize()


async def read_push(connection: AbstractConnection, quiet_for: float) -> Any:
    """The next message pushed on a subscribed ``connection`` (a reply, a published
    message), or None once ``quiet_for`` seconds passed without one; the connection
    stays open either way (a quiet channel is no broken connection)."""
    return await connection.read_response(
        timeout=quiet_for, disconnect_on_error=False, push_request=True
    )


async def exchange(connection: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` to ``connection`` (one of the caller's own) as one write and
    return their replies in order, an error reply as its exception: a pipeline
    without redis-py's pipeline object, command stack and reply callbacks, which
    cost the inbox reader about 100 us per read.

    Any failure, a cancellation included, leaves replies unread on the connection:
    it is closed (a :class:`KeptConnection` connects it again at its next use)."""
    try:
        await connection.send_packed_command(connection.pack_commands(commands), False)
        return await _read_replies(connection, len(commands))
    except BaseException:
        await connection.disconnect(nowait=True)
        raise


def write_now(connection: AbstractConnection, commands: list[tuple[Any, ...]]) -> bool:
    """``connection.write_now(commands)`` on a connection whose writes are lean
    (:func:`make_writes_lean`); False, writing nothing, on any other."""
    write = getattr(connection, "write_now", None)
    return bool(write(commands)) if write is not None else False


async def read_replies(
    connection: AbstractConnection, count: int, each: Callable[[int, Any], None]
) -> list[Any]:
    """The ``count`` replies to a write made with :func:`write_now`, as :func:`exchange`
    reads them, telling ``each`` of every reply (its index, the reply) as it comes:
    a ride's caller has its answer without waiting for the blocking read behind it.
    Any failure closes the connection (replies may be left unread)."""
    try:
        return await _read_replies(connection, count, each)
    except BaseException:
        await connection.disconnect(nowait=True)
        raise


async def _read_replies(
    connection: AbstractConnection,
    count: int,
    each: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``count`` replies, straight from the connection's parser, each within
    ``socket_timeout`` of the one before (as redis-py gives each reply).

    ``Connection.read_response`` arms and cancels an ``asyncio.timeout`` for every
    reply and wraps it in redis-py's error handling. Here a :class:`_Watch` kept with
    the connection bounds the wait instead, for two clock reads per reply: in a
    request/reply exchange the timers were 15% of the Streams layer's latency
    (docs/performance.rst). Errors are reported as redis-py reports them: an error
    reply as its exception in the list, a closed or failed socket as
    ``ConnectionError``, a silent one as ``TimeoutError``. The caller closes the
    connection on any of them (replies may be left unread)."""
    parse = connection._parser.read_response  # type: ignore[attr-defined]  # redis-py reads with it
    if each is None:
        read = parse
    else:

        async def read() -> Any:
            reply = await parse()
            each(len(replies), reply)
            return reply

    replies: list[Any] = []
    watch = _Watch.of(connection)
    try:
        if watch is None:  # no socket_timeout: wait for as long as it takes
            for _ in range(count):
                replies.append(await read())
            return replies
        watch.begin()
        try:
            replies.append(await read())
            while len(replies) < count:
                watch.moved_on()
                replies.append(await read())
        finally:
            fired = watch.end()
        if fired:  # the replies came as the timer fired: the stream holds its error
            raise _Expired
        return replies
    except OSError as exc:
        where = connection._host_error()
        if isinstance(exc, _Expired):
            raise RedisTimeoutError(f"Timeout reading from {where}") from None
        raise RedisConnectionError(f"Error while reading from {where}: {exc}") from exc


class _Expired(TimeoutError):
    """What a :class:`_Watch` makes a silent connection's read raise."""


class _Watch:
    """The timer bounding the replies read on one connection: one timer, armed at the
    first read and moved on only when it fires, not one armed and cancelled per
    reply (``asyncio.timeout`` asks for the running loop three times, each a system
    call on Python 3.11, and leaves a cancelled handle in the loop's heap).

    While a read is under way, each reply moves the deadline ``socket_timeout``
    ahead; when the timer fires before the deadline it is set again for it, and past
    it the read fails: the connection's stream is given an error, which the waiting
    read raises at once (no task is cancelled, so nothing has to tell a timeout from
    a cancellation). A timer that finds no read under way is dropped; the next read
    arms one."""

    __slots__ = ("_connection", "_deadline", "_handle", "_loop", "_reading", "_timeout", "fired")

    def __init__(self, connection: AbstractConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()  # a connection serves one loop
        self._handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._reading = False
        self.fired = False

    @staticmethod
    def of(connection: AbstractConnection) -> _Watch | None:
        """The connection's watch, made at its first read (None: no socket_timeout)."""
        watch: _Watch | None = connection.__dict__.get("_streamlayer_watch")
        timeout = connection.socket_timeout
        if watch is None or watch._timeout != timeout:
            if not timeout:
                return None
            watch = connection.__dict__["_streamlayer_watch"] = _Watch(connection, timeout)
        return watch

    def begin(self) -> None:
        self._reading, self.fired = True, False
        self._deadline = self._loop.time() + self._timeout
        if self._handle is None:
            self._handle = self._loop.call_at(self._deadline, self._check)

    def moved_on(self) -> None:
        """A reply came: the next one has ``socket_timeout`` from now."""
        self._deadline = self._loop.time() + self._timeout

    def end(self) -> bool:
        """The read is over; whether the timer fired during it."""
        self._reading = False
        return self.fired

    def _check(self) -> None:
        self._handle = None
        if not self._reading:
            return
        if self._loop.time() < self._deadline:
            self._handle = self._loop.call_at(self._deadline, self._check)
            return
        self.fired = True
        stream = getattr(self._connection, "_reader", None)
        if stream is not None:
            stream.set_exception(_Expired())


_COMMAND_NAME_REQUIRED = (
    inspect.signature(redis.ConnectionPool.get_connection).parameters["command_name"].default
    is inspect.Parameter.empty
)


_ASYNC_COMMAND_NAME_REQUIRED = (
    inspect.signature(aioredis.ConnectionPool.get_connection).parameters["command_name"].default
    is inspect.Parameter.empty
)


async def lend_connection(pool: aioredis.ConnectionPool) -> AbstractConnection:
    """A connection lent by the asyncio ``pool`` for as long as the caller keeps it (an
    inbox reader's, a batcher's lone calls'); hand it back with ``pool.release``. A
    pool lends the connections it made before making more, so a reader started again
    reuses the last one's instead of opening its own. Return it with :func:`give_back`."""
    if _ASYNC_COMMAND_NAME_REQUIRED:  # redis-py < 5.3
        connection: AbstractConnection = await pool.get_connection("XREAD")  # type: ignore[no-untyped-call]
    else:
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    return connection


def evalsha(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
    """An EVALSHA command as :func:`exchange` takes it."""
    return ("EVALSHA", sha, len(keys), *keys, *args)


class KeptConnection:
    """One connection borrowed from ``client``'s pool at its first use and kept until
    :meth:`give_back`: the inbox reader's for its reads, a batcher's for its lone
    calls. A failed :func:`exchange` closed it; the next :meth:`get` connects it again.
    Nothing is touched before the first use (a cluster client has no pool of its own,
    and its users never call :meth:`get`)."""

    def __init__(self, client: Callable[[], aioredis.Redis]) -> None:
        self._client = client
        self._pool: aioredis.ConnectionPool | None = None
        self._connection: AbstractConnection | None = None

    def ready(self) -> AbstractConnection | None:
        """The connection if it is kept and connected: the per-call path needs no await."""
        connection = self._connection
        if connection is not None and connection.is_connected:
            return connection
        return None

    async def get(self) -> AbstractConnection:
        connection = self._connection
        if connection is None:
            self._pool = self._client().connection_pool
            connection = self._connection = await lend_connection(self._pool)
        elif not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        return connection

    async def give_back(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._pool is not None:
            await give_back(self._pool, connection)


async def give_back(pool: aioredis.ConnectionPool, connection: AbstractConnection) -> None:
    """Return a connection :func:`lend_connection` lent (closed or not: the pool
    connects it again before lending it out)."""
    released: Any = pool.release(connection)
    if inspect.isawaitable(released):  # a coroutine since redis-py 5.0; a plain call before
        await released


def lend_sync_connection(pool: redis.ConnectionPool, command: str) -> Any:
    """A connection lent by a synchronous ``pool`` for ``command`` (a
    ``redis.Connection``, whose methods redis-py leaves untyped); hand it back with
    ``pool.release``, disconnected first if a reply may still be on its way."""
    if _COMMAND_NAME_REQUIRED:  # redis-py < 5.3
        return pool.get_connection(command)
    return pool.get_connection()

"""Message serializers, their registry, and symmetric encryption.

The bytes produced here are the wire format shared with channels_redis 4.x:
msgpack (or JSON) of the message dict, optionally Fernet-encrypted with a key
derived as ``urlsafe_b64encode(sha256(key))``, optionally behind a run of
random bytes (the sorted-set layer needs unique members). Keep it so: a
mixed deployment of old and new processes depends on it.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import msgpack

__all__ = [
    "BaseMessageSerializer",
    "JSONSerializer",
    "MsgPackSerializer",
    "SerializerDoesNotExist",
    "SerializersRegistry",
    "registry",
]


class SerializerDoesNotExist(KeyError):
    """No serializer is registered for the requested format."""

    def __str__(self) -> str:
        return f"no serializer registered for format {self.args[0]!r}"


@runtime_checkable
class MessageSerializer(Protocol):
    """What a layer needs from a serializer (any class with these two methods)."""

    def serialize(self, message: dict[str, Any]) -> bytes: ...

    def deserialize(self, message: bytes) -> dict[str, Any]: ...


class Crypter:
    """Fernet encryption with key rotation: the first key encrypts, every key decrypts."""

    def __init__(self, keys: Iterable[str | bytes]) -> None:
        try:
            from cryptography.fernet import Fernet, MultiFernet
        except ImportError as exc:
            raise ImportError(
                "symmetric_encryption_keys needs the 'cryptography' package: "
                "pip install 'streamlayer[cryptography]'"
            ) from exc
        self._fernet = MultiFernet([Fernet(derive_fernet_key(key)) for key in keys])

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, data: bytes, ttl: int | None = None) -> bytes:
        return self._fernet.decrypt(data, ttl)


def derive_fernet_key(key: str | bytes) -> bytes:
    """Any string becomes a Fernet key through SHA-256 (as channels_redis does)."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest())


class BaseMessageSerializer(abc.ABC):
    """Turns message dicts into bytes and back; subclasses say how (``as_bytes``/``from_bytes``).

    Encryption and the random prefix are handled here so every format gets them.
    """

    def __init__(
        self,
        symmetric_encryption_keys: Iterable[str | bytes] | None = None,
        random_prefix_length: int = 0,
        expiry: float | None = None,
    ) -> None:
        if isinstance(symmetric_encryption_keys, (str, bytes)):
            raise TypeError("symmetric_encryption_keys must be a list of keys")
        self.random_prefix_length = random_prefix_length
        self.expiry = expiry
        keys = list(symmetric_encryption_keys or ())
        self.crypter: Crypter | None = Crypter(keys) if keys else None

    @abc.abstractmethod
    def as_bytes(self, message: Any) -> bytes:
        """Encode a message dict."""

    @abc.abstractmethod
    def from_bytes(self, data: bytes) -> Any:
        """Decode what :meth:`as_bytes` produced."""

    def serialize(self, message: dict[str, Any]) -> bytes:
        data = self.as_bytes(message)
        if self.crypter is not None:
            data = self.crypter.encrypt(data)
        if self.random_prefix_length > 0:
            data = os.urandom(self.random_prefix_length) + data
        return data

    def deserialize(self, message: bytes) -> dict[str, Any]:
        if self.random_prefix_length > 0:
            message = message[self.random_prefix_length :]
        if self.crypter is not None:
            # Fernet tokens carry their creation time; a token older than the
            # message expiry (plus clock slack) is refused, like channels_redis.
            ttl = None if self.expiry is None else int(self.expiry) + 10
            message = self.crypter.decrypt(message, ttl)
        result: dict[str, Any] = self.from_bytes(message)
        return result


class JSONSerializer(BaseMessageSerializer):
    """UTF-8 JSON: readable in ``redis-cli``, but no bytes values."""

    def as_bytes(self, message: Any) -> bytes:
        return json.dumps(message).encode("utf-8")

    def from_bytes(self, data: bytes) -> Any:
        return json.loads(data)


class MsgPackSerializer(BaseMessageSerializer):
    """msgpack, the default: compact and keeps bytes values as bytes."""

    def as_bytes(self, message: Any) -> bytes:
        return msgpack.packb(message)

    def from_bytes(self, data: bytes) -> Any:
        return msgpack.unpackb(data)


class SerializersRegistry:
    """Maps a ``serializer_format`` name to a serializer class."""

    def __init__(self) -> None:
        self._registry: dict[str, type] = {}

    def register_serializer(self, format: str, serializer_class: type) -> None:
        """Register (or replace) the class used for ``format``.

        ``serializer_class`` is a :class:`BaseMessageSerializer` subclass or any
        class with ``serialize``/``deserialize`` methods whose constructor takes
        the keyword arguments ``symmetric_encryption_keys``,
        ``random_prefix_length`` and ``expiry``.
        """
        if not isinstance(format, str) or not format:
            raise TypeError(f"format must be a non-empty string, got {format!r}")
        if not isinstance(serializer_class, type) or not (
            issubclass(serializer_class, BaseMessageSerializer)
            or (
                callable(getattr(serializer_class, "serialize", None))
                and callable(getattr(serializer_class, "deserialize", None))
            )
        ):
            raise TypeError(
                "serializer_class must be a BaseMessageSerializer subclass or a class "
                f"with serialize() and deserialize() methods, got {serializer_class!r}"
            )
        self._registry[format] = serializer_class

    def get_serializer(self, format: str, **kwargs: Any) -> MessageSerializer:
        """Instantiate the serializer registered for ``format`` with ``kwargs``."""
        try:
            serializer_class = self._registry[format]
        except KeyError:
            raise SerializerDoesNotExist(format) from None
        serializer: MessageSerializer = serializer_class(**kwargs)
        return serializer

    def formats(self) -> list[str]:
        return sorted(self._registry)


registry = SerializersRegistry()
registry.register_serializer("json", JSONSerializer)
registry.register_serializer("msgpack", MsgPackSerializer)

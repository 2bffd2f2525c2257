"""One generic registry for everything users vary by name (layer maps, bridges, filters, distances, ...).

YAML and CLI values name registry keys, never import paths: a search space cannot import arbitrary code.
Imports only kdsearch.core.errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdsearch.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


class UnknownName(ConfigError):
    """A name that no registry entry carries; the message lists the choices."""


class Registry(Generic[T]):
    """A named table of entries; duplicate names raise, unknown names list the choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                              f"choose one of: {', '.join(self.names())}") from None

    def check(self, name: str, *, key: str) -> None:
        """Raise UnknownName quoting the config key when `name` is not registered."""
        if name not in self._entries:
            raise UnknownName(f"{key}={name}: unknown {self.kind}{did_you_mean(str(name), self.names())}; "
                              f"choose one of: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

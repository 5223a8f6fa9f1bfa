"""A small generic registry: register by decorator, duplicate names are errors, unknown names list
the closest matches. Instantiated for merge methods, reward models and architectures."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from automerge.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Named entries of one kind (``what``: e.g. "merge method")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(entry: T) -> T:
            return self.register(name, entry)

        return wrap

    def get(self, name: str, *, where: str | None = None) -> T:
        """The entry called ``name``; else a ``ConfigError`` that starts with ``where`` (e.g. the file
        and field that named it) and suggests the closest name."""
        try:
            return self._entries[name]
        except KeyError:
            prefix = f"{where}: " if where else ""
            raise ConfigError(prefix + self._unknown(name)) from None

    def require(self, name: str) -> str:
        """``name`` when it is registered, else a ``ValueError`` suggesting the closest name: for
        pydantic validators, whose errors then name the file and the field."""
        if name not in self._entries:
            raise ValueError(self._unknown(name))
        return name

    def _unknown(self, name: str) -> str:
        return (
            f"unknown {self.what} '{name}'{did_you_mean(name, self._entries.keys())}; "
            f"known: {', '.join(sorted(self._entries))}"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

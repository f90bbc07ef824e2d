"""The one shape of every registry in the house (genome kinds, evaluator kinds, model kinds): named entries in
registration order, a lookup whose error names the spec key and the known names."""

from __future__ import annotations

from typing import Generic, TypeVar

from hf_m2n2.errors import SpecError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind of thing.

    Args:
        what: what an entry is, for errors (`genome kind`).
        path: the spec key that names an entry, for errors (`genome.kind`).

    Example:
        >>> kinds = Registry[str]("colour", "paint.colour")
        >>> kinds.add("red", "#f00")
        '#f00'
        >>> kinds.get("red")
        '#f00'
    """

    def __init__(self, what: str, path: str):
        self.what = what
        self.path = path
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register an entry (replacing one of the same name)."""
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called `name`.

        Raises:
            SpecError: no such entry (naming `path` and the known names).
        """
        if name not in self._entries:
            known = ", ".join(self._entries)
            raise SpecError(self.path, f"unknown {self.what} {name!r} (known: {known})")
        return self._entries[name]

    def remove(self, name: str) -> T | None:
        """Unregister an entry (tests that register one of their own)."""
        return self._entries.pop(name, None)

    def all(self) -> dict[str, T]:
        """Every entry, by name, in registration order."""
        return dict(self._entries)

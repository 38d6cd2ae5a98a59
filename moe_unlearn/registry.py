"""`Registry`: the one shape of every string-keyed choice (methods, scopes, adapters, projections, ...).

A registry maps a name to an entry that describes the choice (what it needs, what it allows), so
code asks the entry instead of comparing strings, and an unknown name fails in one place with
the list of valid ones. It is a read-only `Mapping` in registration order, so `name in REG`,
`", ".join(REG)` and argparse's `choices=REG` work as with the tuples it replaces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from moe_unlearn.errors import BadInputError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind; `noun` / `plural` word the error of an unknown name."""

    def __init__(self, noun: str, plural: str | None = None) -> None:
        self.noun = noun
        self.plural = plural or f"{noun}s"
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add `entry` under `name` (a name is registered once); returns the entry."""
        if name in self._entries:
            raise ValueError(f"{self.noun} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def lookup(self, name: object) -> T:
        """The entry of `name`, else BadInputError naming the valid ones."""
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise BadInputError(f"unknown {self.noun} {name!r}; valid {self.plural}: {', '.join(self._entries)}")
        return entry

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.noun!r}: {', '.join(self._entries)})"


@dataclass(frozen=True)
class Choice:
    """An entry of a registry whose choices differ only in what they need: retain data, target experts."""

    name: str
    help: str = ""
    needs_retain: bool = False
    needs_targets: bool = False


def registry_of(noun: str, *choices: Choice, plural: str | None = None) -> Registry[Choice]:
    """A registry holding `choices` under their names."""
    reg: Registry[Choice] = Registry(noun, plural)
    for c in choices:
        reg.register(c.name, c)
    return reg


__all__ = ["Choice", "Registry", "registry_of"]

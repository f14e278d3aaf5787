"""String options that select code (engine, precision, hint, reader, blend): enums whose
members are their own strings, so they compare, print and serialise to JSON as the text a
user types, while code branches on members rather than on free strings."""
from __future__ import annotations

from enum import Enum

from h2g.core.errors import ConfigError


class Choice(str, Enum):
    """A string option that selects code (engine, precision, hint, reader, blend): its
    members compare equal to their values, print as them and serialise to JSON as them."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:  # Enum hashes the member's name; a key must find its text's entry
        return hash(self.value)

    @classmethod
    def parse(cls, value, what: str):
        """``value`` (a member or its text) as a member; :class:`ConfigError` listing the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{what} must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

"""The field list a hook sees and edits: names and values as str, in order,
duplicates kept, names compared without case.  Every value set is checked,
so a hook cannot put CR, LF or NUL (or a malformed name) on the wire."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["Headers", "check_name", "check_value"]

# RFC 9110 §5.6.2 tchar
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_BAD_VALUE = frozenset("\r\n\0")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name or any(ch not in _TCHAR for ch in name):
        raise ValueError(f"invalid field name {name!r}")
    return name


def check_value(value: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field value must be str, not {type(value).__name__}")
    if any(ch in _BAD_VALUE for ch in value):
        raise ValueError(f"field value {value!r} contains CR, LF or NUL")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"field value {value!r} is not latin-1") from None
    return value.strip(" \t")


class Headers:
    """An ordered multi-map of fields.  `protected` names (lower-case) are the
    core's own (framing); setting or removing them raises ValueError."""

    __slots__ = ("_items", "_protected", "changed")

    def __init__(self, items: Iterable[tuple[str, str]] = (), protected: frozenset[str] = frozenset()):
        self._items: list[tuple[str, str]] = list(items)
        self._protected = protected
        self.changed = False

    def _guard(self, name: str) -> str:
        check_name(name)
        if name.lower() in self._protected:
            raise ValueError(f"field {name!r} is the proxy's own (framing); hooks cannot change it")
        return name

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of name, or default."""
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self._items if k.lower() == low]

    def set(self, name: str, value: str) -> None:
        """Replace every field called name with one (at the first one's place)."""
        self._guard(name)
        value = check_value(value)
        low = name.lower()
        out, placed = [], False
        for k, v in self._items:
            if k.lower() == low:
                if not placed:
                    out.append((name, value))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            out.append((name, value))
        self._items = out
        self.changed = True

    def add(self, name: str, value: str) -> None:
        """Append one more field called name."""
        self._guard(name)
        self._items.append((name, check_value(value)))
        self.changed = True

    def remove(self, name: str) -> None:
        """Remove every field called name (no error when there is none)."""
        self._guard(name)
        low = name.lower()
        kept = [(k, v) for k, v in self._items if k.lower() != low]
        if len(kept) != len(self._items):
            self._items = kept
            self.changed = True

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __setitem__(self, name: str, value: str) -> None:
        self.set(name, value)

    def __delitem__(self, name: str) -> None:
        self.remove(name)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

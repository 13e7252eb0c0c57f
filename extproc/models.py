"""The HTTP message model shared by the proxy, the ext_proc core and the codecs.

A message head is a :class:`Headers` map in HTTP/2 style, as Envoy keeps it: lower-case names,
pseudo-headers (``:method``, ``:path``, ``:authority``, ``:scheme`` on requests, ``:status`` on
responses) first, repeated names kept as separate entries in arrival order. Keeping the HTTP/1.1
request line and status line as pseudo-headers lets one mutation algorithm serve both phases; the
I/O layer maps them back onto the wire. Must not import anything that does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

Header = tuple[bytes, bytes]


class Headers:
    """An ordered multi-map of header names to values, both ``bytes``."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[Header] = ()) -> None:
        self._items: list[Header] = [(name.lower(), value) for name, value in items]

    def __iter__(self) -> Iterator[Header]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and other._items == self._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def __contains__(self, name: object) -> bool:
        return any(n == name for n, _ in self._items)

    def copy(self) -> Headers:
        new = Headers()
        new._items = list(self._items)
        return new

    def get(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower-case), or None."""
        for n, v in self._items:
            if n == name:
                return v
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self._items if n == name]

    def add(self, name: bytes, value: bytes) -> None:
        self._items.append((name.lower(), value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of ``name`` by one.

        As in Envoy's header maps, a regular header moves to the end and a pseudo-header keeps
        its place (or joins the other pseudo-headers ahead of the regular ones).
        """
        name = name.lower()
        if not name.startswith(b":"):
            self.remove(name)
            self._items.append((name, value))
            return
        for i, (n, _) in enumerate(self._items):
            if n == name:
                self._items[i] = (name, value)
                self._items[i + 1 :] = [h for h in self._items[i + 1 :] if h[0] != name]
                return
        at = sum(1 for n, _ in self._items if n.startswith(b":"))
        self._items.insert(at, (name, value))

    def remove(self, name: bytes) -> int:
        """Remove every entry of ``name``; return how many there were."""
        before = len(self._items)
        self._items = [h for h in self._items if h[0] != name]
        return before - len(self._items)

    def byte_size(self) -> int:
        """Bytes of names and values, the measure Envoy's header size limits use."""
        return sum(len(n) + len(v) for n, v in self._items)

    def regular(self) -> list[Header]:
        """The entries that are not pseudo-headers."""
        return [h for h in self._items if not h[0].startswith(b":")]

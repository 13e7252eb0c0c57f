from __future__ import annotations

from extproc.models import Headers


def test_headers_lowercases_names_and_keeps_order() -> None:
    h = Headers([(b"X-A", b"1"), (b"x-b", b"2"), (b"X-A", b"3")])
    assert list(h) == [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")]
    assert h.get(b"x-a") == b"1"
    assert h.get_all(b"x-a") == [b"1", b"3"]
    assert h.get(b"missing") is None


def test_headers_set_moves_a_regular_header_to_the_end() -> None:
    h = Headers([(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")])
    h.set(b"x-a", b"new")
    assert list(h) == [(b"x-b", b"2"), (b"x-a", b"new")]


def test_headers_set_keeps_a_pseudo_header_in_place() -> None:
    h = Headers([(b":path", b"/"), (b":method", b"GET"), (b"x-a", b"1")])
    h.set(b":path", b"/new")
    h.set(b":scheme", b"http")
    assert list(h) == [
        (b":path", b"/new"),
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"x-a", b"1"),
    ]


def test_headers_remove_counts_and_byte_size() -> None:
    h = Headers([(b"x-a", b"1"), (b"x-a", b"22")])
    assert h.byte_size() == 3 + 1 + 3 + 2
    assert h.remove(b"x-a") == 2
    assert len(h) == 0
    assert h.remove(b"x-a") == 0


def test_headers_regular_and_copy() -> None:
    h = Headers([(b":status", b"200"), (b"x-a", b"1")])
    c = h.copy()
    c.add(b"x-b", b"2")
    assert h.regular() == [(b"x-a", b"1")]
    assert b"x-b" in c and b"x-b" not in h
    assert h != c and h == Headers([(b":status", b"200"), (b"x-a", b"1")])

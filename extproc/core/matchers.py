"""Envoy's StringMatcher and the header forwarding rules built on it.

``forward_rules`` decide which header names the processor sees (headers and trailers,
pseudo-headers included); the HTTP message itself is never changed by them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from extproc.errors import ConfigError
from extproc.models import Header


@dataclass(frozen=True, slots=True)
class StringMatcher:
    kind: str
    value: bytes
    ignore_case: bool = False
    regex: re.Pattern[bytes] | None = None

    @classmethod
    def from_proto(cls, matcher: Any, where: str) -> StringMatcher:
        kind = matcher.WhichOneof("match_pattern")
        if kind == "safe_regex":
            return cls(kind, b"", regex=re.compile(matcher.safe_regex.regex.encode()))
        if kind not in ("exact", "prefix", "suffix", "contains"):
            raise ConfigError(where, f"{kind or 'an empty matcher'} is not supported by extproc")
        value = str(getattr(matcher, kind)).encode()
        return cls(kind, value.lower() if matcher.ignore_case else value, matcher.ignore_case)

    def matches(self, text: bytes) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(text) is not None
        if self.ignore_case:
            text = text.lower()
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "suffix":
            return text.endswith(self.value)
        return self.value in text


def _any(matchers: tuple[StringMatcher, ...], name: bytes) -> bool:
    return any(m.matches(name) for m in matchers)


@dataclass(frozen=True, slots=True)
class ForwardRules:
    """HeaderForwardingRules: None for a list means "not set"."""

    allowed: tuple[StringMatcher, ...] | None = None
    disallowed: tuple[StringMatcher, ...] | None = None

    @classmethod
    def from_proto(cls, rules: Any, where: str) -> ForwardRules:
        def patterns(field: str) -> tuple[StringMatcher, ...] | None:
            if not rules.HasField(field):
                return None
            return tuple(
                StringMatcher.from_proto(p, f"{where}.{field}.patterns[{i}]")
                for i, p in enumerate(getattr(rules, field).patterns)
            )

        return cls(patterns("allowed_headers"), patterns("disallowed_headers"))

    def filter(self, headers: Iterable[Header]) -> list[Header]:
        """The headers the processor may see; disallowed wins over allowed."""
        allowed, disallowed = self.allowed, self.disallowed
        return [
            (name, value)
            for name, value in headers
            if (allowed is None or _any(allowed, name))
            and (disallowed is None or not _any(disallowed, name))
        ]

"""Header mutation rules and the algorithm that applies a processor's HeaderMutation.

Rules this module keeps (Envoy 1.40; docs/protocol.md, What the processor sees):
1. Only ``raw_value`` is read; ``value`` is ignored.
2. Only the legacy ``append`` bool decides append vs overwrite (unset = overwrite), unless the
   extproc-only ``honor_append_action`` option is on.
3. All removals run before all sets; each operation is checked against the mutation rules.
4. Invalid characters in a name or value are always an error, whatever the rules say.
   Leading and trailing whitespace is not part of a field value (RFC 9110 §5.5): it is
   dropped, which is what the peer of Envoy's HTTP/1 codec reads from the same mutation.
5. Count and size limits are checked before (operation count) and after (result) applying.
Errors are returned, never raised: the caller decides the local reply (status_on_error).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.models import Headers

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
# HTAB, SP, visible ASCII and obs-text: what Envoy's header value validator lets through.
_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_AUTHORITY = re.compile(rb"^[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]%]+$")
_ROUTING = frozenset({b"host", b":authority", b":method", b":scheme"})
_PSEUDO = frozenset({b":authority", b":path", b":method", b":scheme", b":status"})

ERR_COUNT = "header_mutation_operation_count_exceeds_limit"
ERR_REMOVE_INVALID = "header_mutation_remove_contains_invalid_character"
ERR_SET_INVALID = "header_mutation_set_contains_invalid_character"
ERR_REMOVE_FAILED = "header_mutation_remove_headers_failed"
ERR_SET_FAILED = "header_mutation_set_headers_failed"
ERR_RESULT_LIMIT = "header_mutation_result_exceeds_limit"


class Op(enum.Enum):
    SET = "set"
    APPEND = "append"
    REMOVE = "remove"


class Verdict(enum.Enum):
    OK = "ok"
    IGNORE = "ignore"
    FAIL = "fail"


def name_is_valid(name: bytes) -> bool:
    return bool(_TOKEN.match(name[1:] if name.startswith(b":") else name))


def value_is_valid(value: bytes) -> bool:
    return bool(_VALUE.match(value))


@dataclass(frozen=True, slots=True)
class MutationRules:
    """HeaderMutationRules, compiled once. The defaults are Envoy's."""

    allow_all_routing: bool = False
    allow_envoy: bool = False
    disallow_system: bool = False
    disallow_all: bool = False
    allow_expression: re.Pattern[bytes] | None = None
    disallow_expression: re.Pattern[bytes] | None = None
    disallow_is_error: bool = False

    @classmethod
    def from_proto(cls, rules: mutation_rules_pb2.HeaderMutationRules) -> MutationRules:
        def regex(field_name: str) -> re.Pattern[bytes] | None:
            if not rules.HasField(field_name):
                return None
            return re.compile(getattr(rules, field_name).regex.encode())

        return cls(
            allow_all_routing=rules.allow_all_routing.value,
            allow_envoy=rules.allow_envoy.value,
            disallow_system=rules.disallow_system.value,
            disallow_all=rules.disallow_all.value,
            allow_expression=regex("allow_expression"),
            disallow_expression=regex("disallow_expression"),
            disallow_is_error=rules.disallow_is_error.value,
        )

    def check(self, op: Op, name: bytes, value: bytes = b"") -> Verdict:
        """Whether the operation on ``name`` (lower-case) may be applied."""
        if self._allowed(op, name) and (op is Op.REMOVE or _value_fits(name, value)):
            return Verdict.OK
        return Verdict.FAIL if self.disallow_is_error else Verdict.IGNORE

    def _allowed(self, op: Op, name: bytes) -> bool:
        if op is Op.REMOVE and (name.startswith(b":") or name == b"host"):
            return False
        if self.disallow_expression is not None and self.disallow_expression.fullmatch(name):
            return False
        if self.allow_expression is not None and self.allow_expression.fullmatch(name):
            return True
        if self.disallow_all:
            return False
        if not self.allow_all_routing and name in _ROUTING:
            return False
        if name.startswith(b":") and (op is Op.APPEND or self.disallow_system):
            return False
        return self.allow_envoy or not name.startswith(b"x-envoy")


def _value_fits(name: bytes, value: bytes) -> bool:
    if name in (b"host", b":authority"):
        return bool(_AUTHORITY.match(value))
    if name == b":scheme":
        return value in (b"http", b"https")
    if name == b":status":
        # Envoy takes any code from 200 on; an HTTP/1.1 status line has three digits.
        return value.isdigit() and 200 <= int(value) < 1000
    return True


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    """Envoy's HCM defaults: 100 headers, 60 KiB of names and values."""

    max_count: int = 100
    max_bytes: int = 60 * 1024


@dataclass(slots=True)
class MutationResult:
    rejected: int = 0
    error: str | None = None


_Action = base_pb2.HeaderValueOption


def apply_header_mutation(
    headers: Headers,
    mutation: ep.HeaderMutation,
    rules: MutationRules,
    limits: HeaderLimits,
    *,
    replacing: bool = False,
    drop_content_length: bool = False,
    honor_append_action: bool = False,
) -> MutationResult:
    """Apply ``mutation`` to ``headers`` in place, as Envoy's ext_proc filter does.

    ``replacing`` is CONTINUE_AND_REPLACE, which may change ``:method`` whatever the rules;
    ``drop_content_length`` silently skips content-length sets in modes that strip it.
    """
    result = MutationResult()
    _apply(
        headers,
        mutation,
        rules,
        limits,
        result,
        replacing,
        drop_content_length,
        honor_append_action,
    )
    if result.error in _COUNTED_ERRORS:
        # Envoy counts these in rejected_header_mutations too, not only rule refusals.
        result.rejected += 1
    return result


_COUNTED_ERRORS = frozenset({ERR_COUNT, ERR_REMOVE_INVALID, ERR_SET_INVALID, ERR_RESULT_LIMIT})


def _apply(
    headers: Headers,
    mutation: ep.HeaderMutation,
    rules: MutationRules,
    limits: HeaderLimits,
    result: MutationResult,
    replacing: bool,
    drop_content_length: bool,
    honor_append_action: bool,
) -> None:
    if max(len(mutation.remove_headers), len(mutation.set_headers)) > limits.max_count:
        result.error = ERR_COUNT
        return
    for raw_name in mutation.remove_headers:
        name = raw_name.encode("latin-1", "replace").lower()
        if not name_is_valid(name):
            result.error = ERR_REMOVE_INVALID
            return
        if not _permit(rules, Op.REMOVE, name, b"", result, ERR_REMOVE_FAILED):
            if result.error:
                return
            continue
        headers.remove(name)
    for option in mutation.set_headers:
        _apply_set(
            headers, option, rules, result, replacing, drop_content_length, honor_append_action
        )
        if result.error:
            return
    if len(headers) > limits.max_count or headers.byte_size() > limits.max_bytes:
        result.error = ERR_RESULT_LIMIT


def _permit(
    rules: MutationRules, op: Op, name: bytes, value: bytes, result: MutationResult, error: str
) -> bool:
    verdict = rules.check(op, name, value)
    if verdict is Verdict.OK:
        return True
    result.rejected += 1
    if verdict is Verdict.FAIL:
        result.error = error
    return False


def _apply_set(
    headers: Headers,
    option: base_pb2.HeaderValueOption,
    rules: MutationRules,
    result: MutationResult,
    replacing: bool,
    drop_content_length: bool,
    honor_append_action: bool,
) -> None:
    if not option.HasField("header"):
        return
    name = option.header.key.encode("latin-1", "replace").lower()
    value = option.header.raw_value.strip(b" \t")
    if not name or (drop_content_length and name == b"content-length"):
        return
    if name.startswith(b":") and name not in _PSEUDO:
        # Envoy's header map has no slot for an unknown pseudo-header: dropped, not counted.
        return
    if not name_is_valid(name) or not value_is_valid(value):
        result.error = ERR_SET_INVALID
        return
    exists = name in headers
    append = _decide_append(option, exists, honor_append_action)
    if append is None:
        return
    op = Op.APPEND if append and exists else Op.SET
    if not (replacing and name == b":method") and not _permit(
        rules, op, name, value, result, ERR_SET_FAILED
    ):
        return
    if name == b"host":
        # Envoy's header map keeps an HTTP/1 Host as :authority: setting one sets the other.
        name = b":authority"
    if append:
        headers.add(name, value)
    else:
        headers.set(name, value)


def _decide_append(option: base_pb2.HeaderValueOption, exists: bool, honor: bool) -> bool | None:
    """True to append, False to overwrite, None to skip the operation."""
    if not honor or option.HasField("append"):
        return bool(option.append.value)
    if not option.keep_empty_value and not option.header.raw_value:
        return None
    action = option.append_action
    if action == _Action.APPEND_IF_EXISTS_OR_ADD:
        return True
    if action == _Action.ADD_IF_ABSENT:
        return None if exists else True
    if action == _Action.OVERWRITE_IF_EXISTS:
        return False if exists else None
    return False

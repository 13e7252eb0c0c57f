"""The header mutation algorithm and rules (docs/protocol.md, What the processor sees),
table-driven."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.mutations import (
    ERR_COUNT,
    ERR_REMOVE_FAILED,
    ERR_REMOVE_INVALID,
    ERR_RESULT_LIMIT,
    ERR_SET_FAILED,
    ERR_SET_INVALID,
    HeaderLimits,
    MutationResult,
    MutationRules,
    Op,
    Verdict,
    apply_header_mutation,
)
from extproc.models import Headers


def option(name: str, value: bytes, append: bool | None = None, **kw: object) -> Any:
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, raw_value=value), **kw)
    if append is not None:
        opt.append.value = append
    return opt


def request() -> Headers:
    return Headers(
        [
            (b":authority", b"example.com"),
            (b":path", b"/"),
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b"x-a", b"1"),
            (b"x-b", b"2"),
        ]
    )


def apply(
    headers: Headers,
    rules: MutationRules | None = None,
    limits: HeaderLimits | None = None,
    *,
    sets: Sequence[Any] = (),
    removes: Sequence[str] = (),
    replacing: bool = False,
    drop_content_length: bool = False,
    honor_append_action: bool = False,
) -> MutationResult:
    mutation = ep.HeaderMutation(set_headers=sets, remove_headers=removes)
    return apply_header_mutation(
        headers,
        mutation,
        rules or MutationRules(),
        limits or HeaderLimits(),
        replacing=replacing,
        drop_content_length=drop_content_length,
        honor_append_action=honor_append_action,
    )


DEFAULT = MutationRules()

RULE_CASES = [
    # (rules, op, name, value, verdict)
    (DEFAULT, Op.SET, b"x-foo", b"v", Verdict.OK),
    (DEFAULT, Op.REMOVE, b":path", b"", Verdict.IGNORE),
    (
        MutationRules(allow_all_routing=True, allow_envoy=True),
        Op.REMOVE,
        b"host",
        b"",
        Verdict.IGNORE,
    ),
    (DEFAULT, Op.SET, b":path", b"/x", Verdict.OK),
    (DEFAULT, Op.SET, b":status", b"201", Verdict.OK),
    (DEFAULT, Op.SET, b":status", b"99", Verdict.IGNORE),
    (DEFAULT, Op.SET, b":status", b"abc", Verdict.IGNORE),
    (DEFAULT, Op.SET, b"host", b"a.example", Verdict.IGNORE),
    (DEFAULT, Op.SET, b":authority", b"a.example", Verdict.IGNORE),
    (DEFAULT, Op.SET, b":method", b"POST", Verdict.IGNORE),
    (DEFAULT, Op.SET, b":scheme", b"https", Verdict.IGNORE),
    (MutationRules(allow_all_routing=True), Op.SET, b"host", b"a.example:80", Verdict.OK),
    (MutationRules(allow_all_routing=True), Op.SET, b"host", b"bad host", Verdict.IGNORE),
    (MutationRules(allow_all_routing=True), Op.SET, b":scheme", b"ftp", Verdict.IGNORE),
    (DEFAULT, Op.SET, b"x-envoy-foo", b"1", Verdict.IGNORE),
    (MutationRules(allow_envoy=True), Op.SET, b"x-envoy-foo", b"1", Verdict.OK),
    (DEFAULT, Op.APPEND, b":path", b"/x", Verdict.IGNORE),
    (MutationRules(disallow_system=True), Op.SET, b":path", b"/x", Verdict.IGNORE),
    (MutationRules(disallow_all=True), Op.SET, b"x-foo", b"1", Verdict.IGNORE),
    (
        MutationRules(disallow_all=True, allow_expression=re.compile(b"x-ok.*")),
        Op.SET,
        b"x-ok-1",
        b"1",
        Verdict.OK,
    ),
    (
        MutationRules(
            allow_expression=re.compile(b"x-.*"), disallow_expression=re.compile(b"x-no")
        ),
        Op.SET,
        b"x-no",
        b"1",
        Verdict.IGNORE,
    ),
    (
        MutationRules(allow_expression=re.compile(b"x-envoy-ok")),
        Op.SET,
        b"x-envoy-ok",
        b"1",
        Verdict.OK,
    ),
    (MutationRules(disallow_is_error=True), Op.SET, b"x-envoy-a", b"1", Verdict.FAIL),
]


@pytest.mark.parametrize(
    ("rules", "op", "name", "value", "verdict"),
    RULE_CASES,
    ids=[f"{c[1].value}-{c[2].decode()}-{c[4].value}-{i}" for i, c in enumerate(RULE_CASES)],
)
def test_rules_check(
    rules: MutationRules, op: Op, name: bytes, value: bytes, verdict: Verdict
) -> None:
    assert rules.check(op, name, value) is verdict


def test_removals_run_before_sets() -> None:
    h = request()
    result = apply(h, sets=[option("x-a", b"z")], removes=["x-a"])
    assert result.error is None
    assert h.get_all(b"x-a") == [b"z"]


def test_set_overwrites_and_append_adds() -> None:
    h = request()
    apply(
        h,
        sets=[
            option("x-a", b"new"),
            option("x-b", b"3", append=True),
            option("x-c", b"4", append=True),
        ],
    )
    assert h.regular() == [(b"x-b", b"2"), (b"x-a", b"new"), (b"x-b", b"3"), (b"x-c", b"4")]


def test_only_raw_value_is_read() -> None:
    h = request()
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-v", value="ignored"))
    apply(h, sets=[opt])
    assert h.get(b"x-v") == b""


def test_uppercase_names_are_lowercased() -> None:
    h = request()
    apply(h, sets=[option("X-Up", b"1")], removes=["X-A"])
    assert h.get(b"x-up") == b"1" and h.get(b"x-a") is None


def test_rejected_operations_are_counted_and_skipped() -> None:
    h = request()
    result = apply(
        h, sets=[option("x-envoy-a", b"1"), option(":method", b"PUT")], removes=[":path", "host"]
    )
    assert result.rejected == 4 and result.error is None
    assert h == request()


def test_replacing_may_change_method() -> None:
    h = request()
    apply(h, sets=[option(":method", b"PUT")], replacing=True)
    assert h.get(b":method") == b"PUT"


def test_unknown_pseudo_header_and_empty_name_are_dropped_uncounted() -> None:
    h = request()
    result = apply(h, sets=[option(":foo", b"1"), option("", b"1")])
    assert result.rejected == 0 and result.error is None and h == request()


@pytest.mark.parametrize(
    ("sets", "removes", "error"),
    [
        ([option("x-a", b"a\r\nb")], [], ERR_SET_INVALID),
        ([option("x-a", b"a\0b")], [], ERR_SET_INVALID),
        ([option("bad name", b"1")], [], ERR_SET_INVALID),
        ([], ["bad name"], ERR_REMOVE_INVALID),
    ],
    ids=["crlf-value", "nul-value", "space-in-name", "remove-space-in-name"],
)
def test_invalid_characters_are_errors_whatever_the_rules(
    sets: list[Any], removes: list[str], error: str
) -> None:
    result = apply(
        request(),
        MutationRules(allow_all_routing=True, allow_envoy=True),
        sets=sets,
        removes=removes,
    )
    assert result.error == error


def test_disallow_is_error_fails_the_mutation() -> None:
    rules = MutationRules(disallow_is_error=True)
    assert apply(request(), rules, sets=[option("x-envoy-a", b"1")]).error == ERR_SET_FAILED
    assert apply(request(), rules, removes=[":path"]).error == ERR_REMOVE_FAILED


def test_operation_count_limit() -> None:
    limits = HeaderLimits(max_count=2)
    result = apply(request(), limits=limits, removes=["a", "b", "c"])
    assert result.error == ERR_COUNT


def test_result_size_limit_keeps_what_was_applied() -> None:
    h = request()
    result = apply(h, limits=HeaderLimits(max_bytes=200), sets=[option("x-big", b"v" * 300)])
    assert result.error == ERR_RESULT_LIMIT
    assert h.get(b"x-big") == b"v" * 300


def test_content_length_dropped_when_the_mode_strips_it() -> None:
    h = request()
    apply(h, sets=[option("content-length", b"5")], drop_content_length=True)
    assert h.get(b"content-length") is None


HVO = base_pb2.HeaderValueOption
APPEND_ACTION_CASES = [
    # (action, keep_empty, value, header exists, expected x-a values)
    (HVO.APPEND_IF_EXISTS_OR_ADD, False, b"n", True, [b"1", b"n"]),
    (HVO.APPEND_IF_EXISTS_OR_ADD, False, b"n", False, [b"n"]),
    (HVO.ADD_IF_ABSENT, False, b"n", True, [b"1"]),
    (HVO.ADD_IF_ABSENT, False, b"n", False, [b"n"]),
    (HVO.OVERWRITE_IF_EXISTS_OR_ADD, False, b"n", True, [b"n"]),
    (HVO.OVERWRITE_IF_EXISTS_OR_ADD, False, b"n", False, [b"n"]),
    (HVO.OVERWRITE_IF_EXISTS, False, b"n", True, [b"n"]),
    (HVO.OVERWRITE_IF_EXISTS, False, b"n", False, []),
    (HVO.OVERWRITE_IF_EXISTS_OR_ADD, False, b"", True, [b"1"]),
    (HVO.OVERWRITE_IF_EXISTS_OR_ADD, True, b"", True, [b""]),
]


@pytest.mark.parametrize(
    ("action", "keep_empty", "value", "exists", "expected"),
    APPEND_ACTION_CASES,
    ids=[str(i) for i in range(len(APPEND_ACTION_CASES))],
)
def test_honor_append_action(
    action: int, keep_empty: bool, value: bytes, exists: bool, expected: list[bytes]
) -> None:
    h = Headers([(b"x-a", b"1")] if exists else [])
    opt = option("x-a", value, append_action=action, keep_empty_value=keep_empty)
    apply(h, sets=[opt], honor_append_action=True)
    assert h.get_all(b"x-a") == expected


def test_append_action_ignored_by_default_as_in_envoy() -> None:
    h = Headers([(b"x-a", b"1")])
    apply(h, sets=[option("x-a", b"n", append_action=HVO.ADD_IF_ABSENT)])
    assert h.get_all(b"x-a") == [b"n"]


def test_legacy_append_wins_over_append_action_when_honoring() -> None:
    h = Headers([(b"x-a", b"1")])
    apply(
        h,
        sets=[option("x-a", b"n", append=True, append_action=HVO.OVERWRITE_IF_EXISTS)],
        honor_append_action=True,
    )
    assert h.get_all(b"x-a") == [b"1", b"n"]

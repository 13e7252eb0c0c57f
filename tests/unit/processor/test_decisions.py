"""Decisions render to the ProcessingResponse Envoy expects for each phase."""

from __future__ import annotations

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.processor import (
    Continue,
    ModeOverride,
    Mutate,
    ReplaceAndContinue,
    Respond,
    RespondError,
    with_metadata,
    with_mode,
)
from extproc.processor.decisions import PHASES


@pytest.mark.parametrize("phase", PHASES)
def test_continue_answers_its_own_phase(phase):
    reply = Continue().render(phase)
    assert reply.WhichOneof("response") == phase
    assert reply == ep.ProcessingResponse(**{phase: getattr(ep.ProcessingResponse(), phase)})


def test_mutate_sets_raw_value_and_legacy_append():
    reply = Mutate(
        set_headers={"X-A": "1"},
        append_headers=[("x-b", b"\xff")],
        remove_headers=["X-C"],
        body=b"new",
    ).render("request_headers")
    common = reply.request_headers.response
    set_a, append_b = common.header_mutation.set_headers
    assert (set_a.header.key, set_a.header.raw_value, set_a.header.value) == ("x-a", b"1", "")
    assert set_a.HasField("append") and not set_a.append.value
    assert (append_b.header.raw_value, append_b.append.value) == (b"\xff", True)
    assert list(common.header_mutation.remove_headers) == ["x-c"]
    assert common.body_mutation.body == b"new"
    assert common.status == ep.CommonResponse.CONTINUE


def test_clear_body_and_trailers():
    assert Mutate(clear_body=True).render("response_body").response_body.response.body_mutation
    trailers = Mutate(set_headers={"t": "v"}).render("request_trailers").request_trailers
    assert trailers.header_mutation.set_headers[0].header.raw_value == b"v"
    with pytest.raises(ValueError, match="trailers"):
        Mutate(body=b"x").render("response_trailers")


def test_replace_and_continue_only_on_headers():
    reply = ReplaceAndContinue(set_headers={":method": "POST"}, body=b"b").render("request_headers")
    assert reply.request_headers.response.status == ep.CommonResponse.CONTINUE_AND_REPLACE
    with pytest.raises(ValueError, match="headers phase"):
        ReplaceAndContinue().render("request_body")


def test_respond_is_an_immediate_response():
    reply = Respond(403, "no", headers={"www-authenticate": "Bearer"}, details="d").render(
        "response_headers"
    )
    immediate = reply.immediate_response
    assert immediate.status.code == 403 and immediate.body == b"no" and immediate.details == "d"
    assert immediate.headers.set_headers[0].header.raw_value == b"Bearer"
    assert not immediate.HasField("grpc_status")
    assert (
        Respond(200, grpc_status=7).render("request_body").immediate_response.grpc_status.status
        == 7
    )


def test_respond_error_carries_a_respond():
    err = RespondError(401, b"x", details="auth")
    assert err.response == Respond(status=401, body=b"x", details="auth")


def test_mode_override_and_metadata():
    reply = ModeOverride(response_body_mode="BUFFERED").render("response_headers")
    assert reply.mode_override.response_body_mode == reply.mode_override.BUFFERED
    decision = with_metadata(with_mode(Mutate(), request_trailer_mode="SEND"), "ns", {"k": "v"})
    reply = decision.render("request_headers")
    assert reply.mode_override.request_trailer_mode == reply.mode_override.SEND
    assert reply.dynamic_metadata.fields["ns"].struct_value.fields["k"].string_value == "v"


def test_unknown_phase():
    with pytest.raises(ValueError, match="unknown phase"):
        Continue().render("headers")

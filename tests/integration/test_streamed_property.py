"""Property: in STREAMED mode the upstream gets exactly the bytes the processor decided."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.demo.upstream import EchoUpstream
from tests.support.processor import ProcessorStream, ScriptedProcessor, matching_reply
from tests.support.proxy import Client, running_proxy

pytestmark = pytest.mark.integration

ACTIONS = ["keep", "upper", "clear", "replace"]


class Decider:
    """The processor's per-chunk decisions for one example, and what they produced."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.actions: itertools.cycle[str] = itertools.cycle(["keep"])
        self.produced: list[bytes] = []

    def reset(self, actions: list[str]) -> None:
        with self.lock:
            self.actions = itertools.cycle(actions)
            self.produced = []

    def decide(self, data: bytes) -> tuple[bytes, ep.CommonResponse]:
        with self.lock:
            action = next(self.actions)
            out = {
                "keep": data,
                "upper": data.upper(),
                "clear": b"",
                "replace": b"<" + data[:3] + b">",
            }[action]
            self.produced.append(out)
        if action == "keep":
            return out, ep.CommonResponse()
        if action == "clear":
            return out, ep.CommonResponse(body_mutation=ep.BodyMutation(clear_body=True))
        return out, ep.CommonResponse(body_mutation=ep.BodyMutation(body=out))


def test_streamed_upstream_receives_exactly_what_the_processor_decided() -> None:
    decider = Decider()

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_body":
                _, common = decider.decide(message.request_body.body)
                stream.send(matching_reply(message, common))
            else:
                stream.send(matching_reply(message))

    with (
        EchoUpstream() as upstream,
        ScriptedProcessor(handler) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="streamed") as proxy,
        Client(proxy.address) as client,
    ):

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            body=st.binary(min_size=0, max_size=3000),
            cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
            actions=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=5),
            chunked=st.booleans(),
        )
        def check(body: bytes, cuts: list[int], actions: list[str], chunked: bool) -> None:
            decider.reset(actions)
            before = len(upstream.requests)
            points = sorted({c for c in cuts if 0 < c < len(body)})
            pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
            sent: Any = [p for p in pieces if p] if chunked else body
            reply = client.request("POST", "/", body=sent)
            assert reply.status == 200
            assert len(upstream.requests) == before + 1
            with decider.lock:
                expected = b"".join(decider.produced)
            assert upstream.requests[-1].body == expected

        check()

"""The v3alpha API: a processor that registers only the v3alpha Process method, reached with
--processor-api v3alpha; the hint when the API is wrong; the SDK serving both names; a v3alpha
config starting the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import structlog
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from structlog.testing import LogCapture

from extproc.apis import process_method, service_name
from extproc.demo.upstream import EchoUpstream
from extproc.io import processor as processor_client
from extproc.io import request_loop
from extproc.processor import Headers, Mutate, Processor, StreamContext
from extproc.processor.service import serve
from extproc.v3alpha import FILTER_TYPE as V3ALPHA_TYPE
from tests.support.processor import immediate, matching_reply, mutate_headers
from tests.support.proxy import request, running_proxy
from tests.support.proxyproc import COLD_START, ProxyProcess

RPC_TIMEOUT_S = 10.0


def _old_processor(
    requests: Iterator[ep.ProcessingRequest], context: object
) -> Iterator[ep.ProcessingResponse]:
    """A processor from the v3alpha days: /deny is answered 403, the rest tagged."""
    for message in requests:
        if message.HasField("request_headers"):
            path = next(
                h.raw_value for h in message.request_headers.headers.headers if h.key == ":path"
            )
            if path == b"/deny":
                yield immediate(403, b"old says no")
                return
            yield matching_reply(message, mutate_headers(set_headers=[("x-v3alpha", "yes")]))
        else:
            yield matching_reply(message)


@contextmanager
def v3alpha_only_processor() -> Iterator[str]:
    """A gRPC server with only /envoy.service.ext_proc.v3alpha.ExternalProcessor/Process, over
    the v3 message classes (the wire is the same)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(
        _old_processor,
        request_deserializer=ep.ProcessingRequest.FromString,
        response_serializer=ep.ProcessingResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_name("v3alpha"), {"Process": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(RPC_TIMEOUT_S)


@pytest.mark.parametrize("client", ["direct", "stub"])
def test_a_v3alpha_processor_behind_processor_api_v3alpha(
    upstream: EchoUpstream, client: str
) -> None:
    with (
        v3alpha_only_processor() as target,
        running_proxy(
            upstream.address, target, processor_api="v3alpha", grpc_client=client
        ) as proxy,
    ):
        tagged = request(proxy.address, "GET", "/hello")
        denied = request(proxy.address, "GET", "/deny")
    assert tagged.status == 200
    assert ("x-v3alpha", "yes") in upstream.requests[0].headers
    assert (denied.status, denied.body) == (403, b"old says no")
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("client", ["direct", "stub"])
def test_the_default_api_fails_with_a_hint(
    upstream: EchoUpstream, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The v3 method is UNIMPLEMENTED there: the configured failure (500), the usual stream
    error per request, and one line that names the way out."""
    capture = LogCapture()
    # The session's loggers are cached at warning level: these two are swapped for capturing ones.
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[capture], wrapper_class=structlog.BoundLogger
    )
    monkeypatch.setattr(processor_client, "log", logger)
    monkeypatch.setattr(request_loop, "fault_log", logger)
    with (
        v3alpha_only_processor() as target,
        running_proxy(upstream.address, target, grpc_client=client) as proxy,
    ):
        replies = [request(proxy.address, "GET", "/hello") for _ in range(2)]
    assert [r.status for r in replies] == [500, 500]
    assert upstream.requests == []
    hints = [e for e in capture.entries if e["event"] == "processor_api_mismatch"]
    assert len(hints) == 1, capture.entries
    assert hints[0]["method"] == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    assert "--processor-api v3alpha" in hints[0]["hint"]
    errors = [e for e in capture.entries if e["event"] == "processor_stream_error"]
    assert [e["grpc_status"] for e in errors] == [12, 12]


class Tagger(Processor):
    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> Mutate:
        return Mutate(set_headers={"x-sdk": "yes"})


@pytest.mark.parametrize(
    ("apis", "served"), [(("v3", "v3alpha"), ("v3", "v3alpha")), (("v3",), ("v3",))]
)
def test_the_sdk_serves_both_names_unless_told(
    apis: tuple[str, ...], served: tuple[str, ...]
) -> None:
    running = serve(Tagger, "127.0.0.1:0", apis=apis)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for api in ("v3", "v3alpha"):
                call = channel.stream_stream(
                    process_method(api),
                    request_serializer=ep.ProcessingRequest.SerializeToString,
                    response_deserializer=ep.ProcessingResponse.FromString,
                )
                message = ep.ProcessingRequest(request_headers=ep.HttpHeaders(end_of_stream=True))
                if api in served:
                    (reply,) = call(iter([message]), timeout=RPC_TIMEOUT_S)
                    assert reply.WhichOneof("response") == "request_headers"
                else:
                    with pytest.raises(grpc.RpcError) as info:
                        list(call(iter([message]), timeout=RPC_TIMEOUT_S))
                    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.stop(grace=1.0)


@pytest.mark.parametrize("api", ["v3", "v3alpha"])
def test_one_sdk_processor_behind_either_setting(upstream: EchoUpstream, api: str) -> None:
    running = serve(Tagger, "127.0.0.1:0")
    try:
        with running_proxy(
            upstream.address, f"127.0.0.1:{running.port}", processor_api=api
        ) as proxy:
            assert request(proxy.address, "GET", "/").status == 200
    finally:
        running.stop(grace=1.0)
    assert ("x-sdk", "yes") in upstream.requests[0].headers


def test_the_seed_config_starts_the_proxy(upstream: EchoUpstream, tmp_path: Path) -> None:
    """The minimal config the project was founded on: grpc_service under the v3alpha @type,
    as an Envoy http_filters entry, run by the command with the v3alpha API."""
    with v3alpha_only_processor() as target:
        entry = {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": V3ALPHA_TYPE,
                "grpc_service": {"google_grpc": {"target_uri": target, "stat_prefix": "ext_proc"}},
                "async_mode": False,
            },
        }
        path = tmp_path / "filter.yaml"
        path.write_text(yaml.safe_dump(entry))
        host, port = upstream.address
        args = ("--listen", "127.0.0.1:0", "--upstream", f"{host}:{port}", "--config", str(path))
        with ProxyProcess(*args, *COLD_START, "--processor-api", "v3alpha") as proxy:
            reply = request(("127.0.0.1", proxy.port()), "GET", "/seed")
    assert reply.status == 200
    assert ("x-v3alpha", "yes") in upstream.requests[0].headers

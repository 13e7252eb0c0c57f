"""Serve a :class:`Processor` over gRPC: the ``ExternalProcessor`` servicer and :func:`serve`.

A synchronous gRPC server: each ``Process`` stream (one HTTP request) holds one pool thread
for its lifetime, so ``workers`` bounds the requests processed at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.apis import API_VERSIONS, DEFAULT_API, service_name
from extproc.processor.dispatch import StreamDispatcher
from extproc.processor.targets import ProcessorSource, processor_factory

_log = logging.getLogger("extproc.processor")


class ProcessorServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Runs a Processor on every ``Process`` stream, with a fresh StreamContext each."""

    def __init__(self, processor: ProcessorSource) -> None:
        self._new_processor = processor_factory(processor)

    def Process(  # noqa: N802 (the gRPC method name)
        self, request_iterator: Iterator[ep.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[ep.ProcessingResponse]:
        metadata = tuple(
            (key, value.decode("latin-1") if isinstance(value, bytes) else value)
            for key, value in context.invocation_metadata() or ()
        )
        dispatcher = StreamDispatcher(self._new_processor(), metadata)
        for request in request_iterator:
            try:
                reply = dispatcher.handle(request)
            except Exception as err:  # noqa: BLE001 (any hook failure ends only this stream)
                _log.exception("processor hook failed")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
            if reply is not None:
                yield reply
            if dispatcher.finished:
                # The request is answered: ending the stream is what Envoy expects next.
                return


@dataclass
class RunningServer:
    """A started processor server; ``stop`` it (or use it as a context manager)."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new streams, let open ones finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(timeout=None if grace is None else grace + 5.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; False if ``timeout`` passed first."""
        # grpc's wait_for_termination returns True when it *timed out*.
        return not self.server.wait_for_termination(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def _enable_reflection(server: grpc.Server, services: tuple[str, ...]) -> bool:
    # Reflection is a convenience (grpcurl); grpcio-reflection is not a dependency.
    if importlib.util.find_spec("grpc_reflection") is None:
        return False
    reflection = importlib.import_module("grpc_reflection.v1alpha.reflection")
    names = (*services, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return True


def _add_servicer(servicer: ProcessorServicer, server: grpc.Server, api: str) -> None:
    if api == DEFAULT_API:
        ep_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
        return
    # Another version's service name over the same messages (extproc.apis): what the generated
    # registration does, under that name.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Process,
        request_deserializer=ep.ProcessingRequest.FromString,
        response_serializer=ep.ProcessingResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_name(api), {"Process": handler}),)
    )


def serve(
    processor: ProcessorSource,
    address: str,
    *,
    workers: int = 16,
    apis: tuple[str, ...] = API_VERSIONS,
) -> RunningServer:
    """Start serving ``processor`` on ``address`` ("127.0.0.1:0" picks a port).

    The processor is registered under the service name of each API version in ``apis``
    (extproc.apis; by default v3 and v3alpha), so Envoy 1.40, an Envoy from before 1.20 and
    extproc with either ``--processor-api`` all reach it. Also registers the standard
    ``grpc.health.v1.Health`` service, SERVING overall ("") and for each ExternalProcessor
    service. Raises RuntimeError if the address cannot be bound, ValueError for an unknown API.
    """
    unknown = sorted(set(apis) - set(API_VERSIONS))
    if unknown or not apis:
        raise ValueError(f"apis must be some of {', '.join(API_VERSIONS)}, got {apis!r}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    servicer = ProcessorServicer(processor)
    for api in apis:
        _add_servicer(servicer, server, api)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = tuple(service_name(api) for api in apis)
    _enable_reflection(server, services)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    return RunningServer(server, port, health_servicer)

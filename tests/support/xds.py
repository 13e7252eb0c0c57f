"""A small, real xDS control plane: an ADS server that steers ``xds:///NAME`` to processors.

gRPC's xds resolver asks, over one Aggregated Discovery Service stream, for the Listener
``NAME`` (an API listener whose HttpConnectionManager holds the route table inline, routing
everything to cluster ``NAME``), then the Cluster ``NAME`` (EDS over ADS, round robin), then
its ClusterLoadAssignment: the processors' addresses. :meth:`ControlPlane.set_endpoints`
pushes a new assignment to every client, as a real control plane does when hosts change.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any, Self

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2

_TYPE = "type.googleapis.com/"
LISTENER = _TYPE + "envoy.config.listener.v3.Listener"
CLUSTER = _TYPE + "envoy.config.cluster.v3.Cluster"
ENDPOINTS = _TYPE + "envoy.config.endpoint.v3.ClusterLoadAssignment"
_STOP_S = 5.0


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class ControlPlane:
    """ADS on 127.0.0.1 for the one service ``name``."""

    def __init__(self, name: str, endpoints: list[int]) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._endpoints = list(endpoints)
        self._eds_version = 1
        self._nonces = itertools.count(1)
        self._streams: list[queue.Queue[discovery_pb2.DiscoveryResponse | None]] = []
        self._acked = threading.Condition(self._lock)
        self.acked: dict[str, str] = {}  # type URL -> last version a client accepted
        self.nacks: list[str] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), self._server)
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def bootstrap(self) -> str:
        """The GRPC_XDS_BOOTSTRAP file's content, pointing at this server."""
        return json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{self.port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": "extproc-test", "cluster": "extproc", "locality": {}},
            }
        )

    def set_endpoints(self, endpoints: list[int]) -> str:
        """Send every client a new ClusterLoadAssignment; returns its version."""
        with self._lock:
            self._endpoints = list(endpoints)
            self._eds_version += 1
            streams = list(self._streams)
            response = self._response(ENDPOINTS)
        for out in streams:
            out.put(response)
        return str(response.version_info)

    def wait_acked(self, type_url: str, version: str, timeout: float = 30.0) -> None:
        with self._acked:
            if not self._acked.wait_for(lambda: self.acked.get(type_url) == version, timeout):
                raise TimeoutError(f"{type_url} version {version} not acked: {self.nacks}")

    def stop(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for out in streams:
            out.put(None)
        self._server.stop(grace=None).wait(_STOP_S)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # Resources (under self._lock) --------------------------------------------------------

    def _response(self, type_url: str) -> discovery_pb2.DiscoveryResponse:
        version = str(self._eds_version) if type_url == ENDPOINTS else "1"
        resources = [_pack(r) for r in self._resources(type_url)]
        return discovery_pb2.DiscoveryResponse(
            type_url=type_url,
            version_info=version,
            nonce=str(next(self._nonces)),
            resources=resources,
        )

    def _resources(self, type_url: str) -> list[Any]:
        if type_url == LISTENER:
            return [self._listener()]
        if type_url == CLUSTER:
            cluster = cluster_pb2.Cluster(
                name=self.name,
                type=cluster_pb2.Cluster.EDS,
                lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
            )
            cluster.eds_cluster_config.eds_config.ads.SetInParent()
            return [cluster]
        if type_url == ENDPOINTS:
            return [self._assignment()]
        return []

    def _listener(self) -> listener_pb2.Listener:
        route = route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix=""),
            route=route_components_pb2.RouteAction(cluster=self.name),
        )
        manager = hcm.HttpConnectionManager(
            route_config=route_pb2.RouteConfiguration(
                name=self.name,
                virtual_hosts=[
                    route_components_pb2.VirtualHost(name="all", domains=["*"], routes=[route])
                ],
            ),
            http_filters=[hcm.HttpFilter(name="router", typed_config=_pack(router_pb2.Router()))],
        )
        return listener_pb2.Listener(
            name=self.name,
            api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager)),
        )

    def _assignment(self) -> endpoint_pb2.ClusterLoadAssignment:
        hosts = []
        for port in self._endpoints:
            host = endpoint_components_pb2.LbEndpoint()
            host.endpoint.address.socket_address.address = "127.0.0.1"
            host.endpoint.address.socket_address.port_value = port
            hosts.append(host)
        locality = endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(region="test"),
            lb_endpoints=hosts,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
        )
        return endpoint_pb2.ClusterLoadAssignment(cluster_name=self.name, endpoints=[locality])

    # The ADS stream ---------------------------------------------------------------------

    def _serve(
        self, requests: Iterator[discovery_pb2.DiscoveryRequest]
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        out: queue.Queue[discovery_pb2.DiscoveryResponse | None] = queue.Queue()
        with self._lock:
            self._streams.append(out)
        reader = threading.Thread(target=self._read, args=(requests, out), daemon=True)
        reader.start()
        while (response := out.get()) is not None:
            yield response

    def _read(
        self,
        requests: Iterator[discovery_pb2.DiscoveryRequest],
        out: queue.Queue[discovery_pb2.DiscoveryResponse | None],
    ) -> None:
        try:
            for request in requests:
                with self._lock:
                    if request.error_detail.message:
                        self.nacks.append(request.error_detail.message)
                    elif request.response_nonce:
                        self.acked[request.type_url] = request.version_info
                        self._acked.notify_all()
                    else:  # a new subscription: answer with what there is
                        out.put(self._response(request.type_url))
        except grpc.RpcError:
            pass
        out.put(None)


class _Ads:
    """Duck-typed AggregatedDiscoveryServiceServicer."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    def StreamAggregatedResources(  # noqa: N802 - the gRPC method name
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        return self._plane._serve(requests)

    def DeltaAggregatedResources(  # noqa: N802 - the gRPC method name
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "state of the world ADS only")

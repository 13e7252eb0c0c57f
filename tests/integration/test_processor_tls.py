"""google_grpc channel_credentials.ssl_credentials: the processor behind TLS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.demo.processor import DemoProcessor
from extproc.demo.upstream import EchoUpstream
from tests.support.proxy import request, running_proxy

pytestmark = pytest.mark.integration


def make_cert(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


@pytest.fixture
def tls_processor(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The demo processor behind TLS: its port and the certificate to trust."""
    key, cert = make_cert(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ep_grpc.add_ExternalProcessorServicer_to_server(DemoProcessor(), server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port, cert
    server.stop(grace=None).wait(10)


def test_processor_over_tls_with_root_certs_from_a_file(
    tls_processor: tuple[int, Path], upstream: EchoUpstream
) -> None:
    port, cert = tls_processor
    ext_proc = {
        "grpc_service": {
            "google_grpc": {
                "target_uri": f"127.0.0.1:{port}",
                "stat_prefix": "tls",
                "channel_credentials": {"ssl_credentials": {"root_certs": {"filename": str(cert)}}},
            }
        }
    }
    with running_proxy(upstream.address, None, ext_proc=ext_proc) as proxy:
        reply = request(proxy.address, "GET", "/hello")
    assert reply.status == 200
    assert reply.header("x-extproc-demo") == "response-seen"


def test_plaintext_client_cannot_talk_to_a_tls_processor(
    tls_processor: tuple[int, Path], upstream: EchoUpstream
) -> None:
    port, _ = tls_processor
    with running_proxy(upstream.address, f"127.0.0.1:{port}") as proxy:
        reply = request(proxy.address, "GET", "/hello")
    assert reply.status == 500
    assert upstream.requests == []

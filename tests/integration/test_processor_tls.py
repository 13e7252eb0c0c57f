"""TLS and mTLS to the processor: google_grpc channel_credentials.ssl_credentials in the
config, and the --processor-ca/-cert/-key/-authority flags."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.demo.processor import DemoProcessor
from extproc.demo.upstream import EchoUpstream
from tests.support.certs import CertAuthority, Issued
from tests.support.proxy import Reply, request, running_proxy

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


# mTLS with a CA the test makes -----------------------------------------------------------


@dataclass
class Pki:
    ca: CertAuthority
    server: Issued
    client: Issued
    other_ca: CertAuthority


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertAuthority(tmp_path / "ca")
    return Pki(
        ca=ca,
        server=ca.issue("processor", dns=("localhost", "processor.internal")),
        client=ca.issue("proxy", client=True),
        other_ca=CertAuthority(tmp_path / "other", name="someone else"),
    )


@contextmanager
def mtls_processor(server: Issued, client_ca: Path) -> Iterator[int]:
    """The demo processor requiring a client certificate signed by ``client_ca``."""
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ep_grpc.add_ExternalProcessorServicer_to_server(DemoProcessor(), grpc_server)
    credentials = grpc.ssl_server_credentials(
        [server.pem()], root_certificates=client_ca.read_bytes(), require_client_auth=True
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    try:
        yield port
    finally:
        grpc_server.stop(grace=None).wait(10)


def processed(reply: Reply) -> bool:
    return reply.status == 200 and reply.header("x-extproc-demo") == "response-seen"


def ssl_credentials(pki: Pki, inline: bool) -> dict[str, Any]:
    if inline:
        return {
            "root_certs": {"inline_string": pki.ca.cert.read_text()},
            "cert_chain": {"inline_string": pki.client.cert.read_text()},
            "private_key": {"inline_bytes": base64.b64encode(pki.client.key.read_bytes()).decode()},
        }
    return {
        "root_certs": {"filename": str(pki.ca.cert)},
        "cert_chain": {"filename": str(pki.client.cert)},
        "private_key": {"filename": str(pki.client.key)},
    }


@pytest.mark.parametrize("inline", [False, True], ids=["filename", "inline"])
def test_mtls_from_the_config_file(pki: Pki, upstream: EchoUpstream, inline: bool) -> None:
    with mtls_processor(pki.server, pki.ca.cert) as port:
        google = {
            "target_uri": f"localhost:{port}",
            "channel_credentials": {"ssl_credentials": ssl_credentials(pki, inline)},
        }
        ext_proc = {"grpc_service": {"google_grpc": google}}
        with running_proxy(upstream.address, None, ext_proc=ext_proc) as proxy:
            assert processed(request(proxy.address, "GET", "/hello"))


def mtls_flags(pki: Pki, trusted: CertAuthority) -> dict[str, Any]:
    """The --processor-ca/-cert/-key options: trust ``trusted``, show the client's pair."""
    return {
        "processor_ca": str(trusted.cert),
        "processor_cert": str(pki.client.cert),
        "processor_key": str(pki.client.key),
    }


def test_mtls_from_flags(pki: Pki, upstream: EchoUpstream) -> None:
    flags = mtls_flags(pki, pki.ca)
    with (
        mtls_processor(pki.server, pki.ca.cert) as port,
        running_proxy(upstream.address, f"127.0.0.1:{port}", **flags) as proxy,
    ):
        assert processed(request(proxy.address, "GET", "/hello"))


def test_authority_flag_names_the_certificate_to_expect(pki: Pki, upstream: EchoUpstream) -> None:
    """The processor's certificate names only processor.internal; the proxy dials an IP."""
    server = pki.ca.issue("internal", dns=("processor.internal",), loopback=False)
    tls = mtls_flags(pki, pki.ca)
    with mtls_processor(server, pki.ca.cert) as port:
        target = f"127.0.0.1:{port}"
        named = {**tls, "processor_authority": "processor.internal"}
        with running_proxy(upstream.address, target, **named) as proxy:
            assert processed(request(proxy.address, "GET", "/hello"))
        with running_proxy(upstream.address, target, **tls) as proxy:
            assert request(proxy.address, "GET", "/hello").status == 500


def test_mtls_without_a_client_certificate_fails(pki: Pki, upstream: EchoUpstream) -> None:
    flags: dict[str, Any] = {"processor_ca": str(pki.ca.cert)}
    with (
        mtls_processor(pki.server, pki.ca.cert) as port,
        running_proxy(upstream.address, f"127.0.0.1:{port}", **flags) as proxy,
    ):
        assert request(proxy.address, "GET", "/hello").status == 500
    assert upstream.requests == []


@pytest.mark.parametrize("allow", [False, True], ids=["fail-closed", "failure-mode-allow"])
def test_wrong_ca_gets_the_configured_failure_behaviour(
    pki: Pki, upstream: EchoUpstream, allow: bool
) -> None:
    flags = mtls_flags(pki, pki.other_ca)
    with (
        mtls_processor(pki.server, pki.ca.cert) as port,
        running_proxy(
            upstream.address,
            f"127.0.0.1:{port}",
            **flags,
            failure_mode_allow=allow,
        ) as proxy,
    ):
        reply = request(proxy.address, "GET", "/hello")
    stats = proxy.stats.snapshot()  # once stopped: every request is counted
    if allow:
        assert reply.status == 200 and not processed(reply)  # through, unprocessed
        assert len(upstream.requests) == 1
    else:
        assert reply.status == 500
        assert upstream.requests == []
    assert stats["http.ingress.ext_proc.streams_failed"] == 1
    assert stats["http.ingress.ext_proc.failure_mode_allowed"] == int(allow)

"""Bearer token on both transports, TLS and mutual TLS with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
    OTLPLogExporter as GrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import (
    OTLPLogExporter as HttpLogExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.conftest import Daemon, make_span
from tests.test_receivers import grpc_call, new_trace, post, request_bytes, usage
from tests.test_signal_receivers import sdk_log_records, sdk_metrics

StartDaemon = Callable[..., Daemon]
TOKEN = "s3cr3t-t0ken-value"


def test_bearer_token_is_required_on_both_transports(start_daemon: StartDaemon,
                                                     tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    daemon = start_daemon(f'[auth]\ntoken_file = "{token_file}"\n')
    body = request_bytes(make_span(trace_id=new_trace(), attrs=usage("auth")))

    status, headers, payload = post(daemon, body)
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert b"missing Authorization" in payload
    status, _, payload = post(daemon, body, headers={"Authorization": "Bearer wrong-guess"})
    assert status == 401 and b"invalid bearer token" in payload
    assert post(daemon, body, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(daemon, body)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "auth" not in daemon.rows()

    headers = {"authorization": f"Bearer {TOKEN}"}
    http_exporter = daemon.http_exporter(headers=headers)
    grpc_exporter = daemon.grpc_exporter(headers=headers)
    try:
        assert http_exporter.export([make_span(trace_id=new_trace(), attrs=usage("auth"))]) == \
            SpanExportResult.SUCCESS
        assert grpc_exporter.export([make_span(trace_id=new_trace(), attrs=usage("auth"))]) == \
            SpanExportResult.SUCCESS
    finally:
        http_exporter.shutdown()
        grpc_exporter.shutdown()
    assert daemon.row("auth")["turns"] == 2
    daemon.stop()
    assert TOKEN not in daemon.log and "wrong-guess" not in daemon.log


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
           server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(autouse=True)
def _exporter_uses_our_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override the exporter's own CA file
    (a known requests quirk); machines that set them would hide our test CA."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca_cert = _issue("test ca", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    pki = Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
              d / "client.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(_issue("localhost", server_key, ca_name, ca_key, server=True)
                         .public_bytes(serialization.Encoding.PEM))
    pki.client_cert.write_bytes(_issue("agent", client_key, ca_name, ca_key)
                                .public_bytes(serialization.Encoding.PEM))
    _write_key(pki.key, server_key)
    _write_key(pki.client_key, client_key)
    return pki


def test_tls_on_both_transports(start_daemon: StartDaemon, pki: Pki) -> None:
    daemon = start_daemon(f'[tls]\ncert_file = "{pki.cert}"\nkey_file = "{pki.key}"\n')
    http_exporter = HttpExporter(endpoint=f"https://127.0.0.1:{daemon.http_port}/v1/traces",
                                 certificate_file=str(pki.ca), timeout=20)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    grpc_exporter = GrpcExporter(endpoint=f"localhost:{daemon.grpc_port}",
                                 credentials=credentials, timeout=20)
    try:
        for exporter in (http_exporter, grpc_exporter):
            result = exporter.export([make_span(trace_id=new_trace(), attrs=usage("tls"))])
            assert result == SpanExportResult.SUCCESS, daemon.log
    finally:
        http_exporter.shutdown()
        grpc_exporter.shutdown()
    assert daemon.row("tls")["turns"] == 2
    # The logs and metrics services are behind the same TLS.
    records = sdk_log_records("tls", 2)
    log_exporters = (
        HttpLogExporter(endpoint=f"https://127.0.0.1:{daemon.http_port}/v1/logs",
                        certificate_file=str(pki.ca), timeout=20),
        GrpcLogExporter(endpoint=f"localhost:{daemon.grpc_port}", credentials=credentials,
                        timeout=20))
    metric_exporters = (
        HttpMetricExporter(endpoint=f"https://127.0.0.1:{daemon.http_port}/v1/metrics",
                           certificate_file=str(pki.ca), timeout=20),
        GrpcMetricExporter(endpoint=f"localhost:{daemon.grpc_port}", credentials=credentials,
                           timeout=20))
    try:
        for log_exporter in log_exporters:
            assert log_exporter.export(records) == LogRecordExportResult.SUCCESS, daemon.log
        for metric_exporter in metric_exporters:
            assert metric_exporter.export(sdk_metrics("tls")) == MetricExportResult.SUCCESS
    finally:
        for exporter in (*log_exporters, *metric_exporters):
            exporter.shutdown()
    # Plain HTTP to the TLS port is not served.
    with pytest.raises(Exception):  # noqa: B017 - any connection-level failure will do
        post(daemon, request_bytes(make_span(trace_id=new_trace(), attrs=usage("plain"))))
    assert "plain" not in daemon.rows()


def test_mutual_tls_requires_a_client_certificate(start_daemon: StartDaemon, pki: Pki) -> None:
    daemon = start_daemon(f'[tls]\ncert_file = "{pki.cert}"\nkey_file = "{pki.key}"\n'
                          f'client_ca_file = "{pki.ca}"\n')
    url = f"https://127.0.0.1:{daemon.http_port}/v1/traces"
    anonymous = HttpExporter(endpoint=url, certificate_file=str(pki.ca), timeout=5)
    with_cert = HttpExporter(endpoint=url, certificate_file=str(pki.ca), timeout=20,
                             client_certificate_file=str(pki.client_cert),
                             client_key_file=str(pki.client_key))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes())
    grpc_with_cert = GrpcExporter(endpoint=f"localhost:{daemon.grpc_port}",
                                  credentials=credentials, timeout=20)
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        import http.client

        conn = http.client.HTTPSConnection("127.0.0.1", daemon.http_port, context=context,
                                           timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            conn.request("POST", "/v1/traces", body=b"",
                         headers={"Content-Type": "application/x-protobuf"})
            conn.getresponse()
        conn.close()
        for exporter in (with_cert, grpc_with_cert):
            result = exporter.export([make_span(trace_id=new_trace(), attrs=usage("mtls"))])
            assert result == SpanExportResult.SUCCESS, daemon.log
    finally:
        anonymous.shutdown()
        with_cert.shutdown()
        grpc_with_cert.shutdown()
    assert daemon.row("mtls")["turns"] == 2

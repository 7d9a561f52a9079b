"""Bearer-token checks and TLS material, shared by both receivers so they cannot disagree."""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass, field

from collector.config import TlsConfig
from collector.receivers.errors import ExportError, Refusal

BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class Security:
    token: bytes | None = field(default=None, repr=False)
    tls: TlsConfig | None = None

    def check(self, authorization: str | None) -> None:
        """Raise UNAUTHENTICATED unless the header carries the token (constant-time compare).

        The message never echoes what was sent: a wrong token must not end up in a log.
        """
        if self.token is None:
            return
        if not authorization:
            raise ExportError(Refusal.UNAUTHENTICATED, "missing Authorization: Bearer token")
        scheme, _, credential = authorization.strip().partition(" ")
        given = credential.strip().encode("utf-8", "replace")
        if scheme.lower() != BEARER or not hmac.compare_digest(given, self.token):
            raise ExportError(Refusal.UNAUTHENTICATED, "invalid bearer token")

    def server_ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        if self.tls.client_ca_file is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.tls.client_ca_file)
        return context

    def grpc_material(self) -> tuple[bytes, bytes, bytes | None] | None:
        """(key, certificate chain, client CA) for grpc.ssl_server_credentials."""
        if self.tls is None:
            return None
        ca = self.tls.client_ca_file.read_bytes() if self.tls.client_ca_file else None
        return self.tls.key_file.read_bytes(), self.tls.cert_file.read_bytes(), ca

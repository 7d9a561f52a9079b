"""Who may call what, and TLS material: shared by both receivers and the fleet view so they
cannot disagree.

`Credentials` holds the named tokens in effect (collector.config.auth), looked up by the
SHA-256 of what a request presents: no comparison runs over the secret itself, so its timing
says nothing about it, and a reload swaps the whole set at once. `Security.check` answers with
the token's name (the credential label of what the request carries) or refuses: 401 /
UNAUTHENTICATED for no or an unknown token, 403 / PERMISSION_DENIED for a token without the
role. Without tokens, `HostCheck` keeps browsers on other sites out (DNS rebinding): only
requests naming the listener's own address, localhost or a configured name are answered.
"""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from collector.config import Endpoint, TlsConfig
from collector.config.auth import (
    LOCAL_HOST_NAMES,
    ROLE_INGEST,
    AuthConfig,
    TokenSpec,
    token_digest,
)
from collector.receivers.errors import ExportError, Refusal

BEARER = "bearer"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


class ReloadRefused(Exception):
    """A reload that would turn authentication on or off (that needs a restart)."""


class Credentials:
    """The tokens in effect; replaced whole by `replace` (a reload)."""

    def __init__(self, auth: AuthConfig) -> None:
        self._by_digest: dict[bytes, TokenSpec] = {}
        self.enabled = auth.enabled
        self.generation = 0  # moves on every replace: web sessions re-check their token
        self._install(auth)

    def _install(self, auth: AuthConfig) -> None:
        self._by_digest = {token.digest: token for token in auth.tokens}
        self.generation += 1

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(t.name for t in self._by_digest.values()))

    def replace(self, auth: AuthConfig) -> None:
        if auth.enabled != self.enabled:
            raise ReloadRefused("a reload cannot turn authentication "
                                f"{'on' if auth.enabled else 'off'}; restart the collector")
        self._install(auth)

    def identify(self, token: str) -> TokenSpec | None:
        """The token presented as `token`, if it is one in effect."""
        digest = token_digest(token)
        found = self._by_digest.get(digest)
        # The lookup compared digests only; compare again in constant time all the same.
        if found is None or not hmac.compare_digest(found.digest, digest):
            return None
        return found

    def still_valid(self, name: str, digest: bytes, role: str) -> bool:
        """Whether the token a web session was made from is still in effect with `role`."""
        found = self._by_digest.get(digest)
        return found is not None and found.name == name and role in found.roles


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header, or None."""
    if not authorization:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != BEARER:
        return None
    return credential.strip() or None


@dataclass(frozen=True, slots=True)
class HostCheck:
    """The Host names a listener answers while it has no tokens."""

    names: frozenset[str]
    any_ip: bool = False  # bound to a wildcard: every address literal is one of ours

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return True  # no browser omits it; a rebinding page cannot
        host = host_name(host_header)
        if host in self.names:
            return True
        # An address literal cannot be rebound: the browser's origin is the address itself.
        return self.any_ip and _is_address(host)


def host_name(host_header: str) -> str:
    """The host of a Host header, lower case, without port, brackets or a final dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def host_check(endpoint: Endpoint, allowed: Iterable[str]) -> HostCheck:
    """The listener's own address, localhost (and, on loopback, its addresses), and the
    configured names."""
    own = endpoint.host.lower()
    names = {own, *LOCAL_HOST_NAMES, *(h.lower() for h in allowed)}
    if own == "localhost" or (_is_address(own) and ipaddress.ip_address(own).is_loopback):
        names.update(LOOPBACK_ADDRESSES)
    return HostCheck(frozenset(names), any_ip=own in WILDCARD_HOSTS)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Security:
    credentials: Credentials | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    # Checked only while there are no tokens (a token is what a rebinding page lacks).
    hosts: HostCheck | None = None

    @property
    def authenticating(self) -> bool:
        return self.credentials is not None and self.credentials.enabled

    def check(self, authorization: str | None, role: str = ROLE_INGEST) -> str | None:
        """The name of the token the header carries, when it has `role`; None when there are
        no tokens. Raises UNAUTHENTICATED for no or an unknown token, PERMISSION_DENIED for
        a token without the role.

        The message never echoes what was sent: a wrong token must not end up in a log.
        """
        if self.credentials is None or not self.credentials.enabled:
            return None
        if not authorization:
            raise ExportError(Refusal.UNAUTHENTICATED, "missing Authorization: Bearer token")
        token = bearer_token(authorization)
        found = None if token is None else self.credentials.identify(token)
        if found is None:
            raise ExportError(Refusal.UNAUTHENTICATED, "invalid bearer token")
        if role not in found.roles:
            raise ExportError(Refusal.PERMISSION_DENIED,
                              f"token {found.name!r} does not have the {role} role")
        return found.name

    def check_host(self, host_header: str | None) -> None:
        """Without tokens: refuse a Host that is none of the listener's names."""
        if self.authenticating or self.hosts is None or self.hosts.allows(host_header):
            return
        raise ExportError(Refusal.HOST_NOT_ALLOWED,
                          "Host is not a name of this collector; add it to "
                          "receivers.otlp.allowed_hosts if it is")

    def server_ssl_context(self) -> ssl.SSLContext | None:
        return server_ssl_context(self.tls)

    def grpc_material(self) -> tuple[bytes, bytes, bytes | None] | None:
        """(key, certificate chain, client CA) for grpc.ssl_server_credentials."""
        if self.tls is None:
            return None
        ca = self.tls.client_ca_file.read_bytes() if self.tls.client_ca_file else None
        return self.tls.key_file.read_bytes(), self.tls.cert_file.read_bytes(), ca


def server_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls.client_ca_file)
    return context
